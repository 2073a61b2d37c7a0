"""Privacy accountants under Opacus' names (``opacus.accountants`` -> ``dp_torch.accountants``).

Every class here *is* the :mod:`dpcore.accounting` accountant of the same kind,
so a history recorded by ``dp_torch`` is the same ledger the JAX backend and the
``dpcore`` command line read:

- :class:`RDPAccountant` (``"rdp"``, the default of :class:`~dp_torch.PrivacyEngine`);
- :class:`PRVAccountant` (``"prv"``) and :class:`PLDAccountant` (``"pld"``): tight upper bounds;
- :class:`GaussianAccountant` (``"gdp"``, also :class:`GDPAccountant`): the CLT
  approximation, which may under-report and warns on every query.

:data:`IAccountant` is dpcore's abstract base class
:class:`dpcore.accounting.Accountant`; subclass it and register the subclass with
:func:`register_accountant` to add a kind.
"""

from dp_torch.accountants.accountant import IAccountant
from dp_torch.accountants.gdp import GaussianAccountant
from dp_torch.accountants.gdp import GDPAccountant
from dp_torch.accountants.pld import PLDAccountant
from dp_torch.accountants.prv import PRVAccountant
from dp_torch.accountants.rdp import RDPAccountant
from dp_torch.accountants.registry import create_accountant
from dp_torch.accountants.registry import register_accountant

__all__ = [
    "GDPAccountant",
    "GaussianAccountant",
    "IAccountant",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
    "register_accountant",
]
