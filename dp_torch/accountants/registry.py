"""Accountant registry with Opacus' signatures (``opacus.accountants.registry``).

Both functions act on :mod:`dpcore.accounting`'s one registry, so a kind
registered here is also known to ``dpcore.accounting.create_accountant``,
:func:`dpcore.accounting.get_noise_multiplier` and the ledger.
"""

from __future__ import annotations

from typing import Any

import dpcore.accounting.pld  # noqa: F401  (registers "pld")
import dpcore.accounting.prv  # noqa: F401  (registers "prv")
from dpcore.accounting import Accountant
from dpcore.accounting import available_accountants
from dpcore.accounting import create_accountant as _core_create
from dpcore.accounting import register_accountant as _core_register

__all__ = ["available_accountants", "create_accountant", "register_accountant"]


def register_accountant(mechanism: str, accountant: type[Accountant], force: bool = False) -> None:
    """Register an accountant class under the name ``mechanism``.

    Args:
        mechanism: The name users pass as ``PrivacyEngine(accountant=...)``.
        accountant: A subclass of :class:`dp_torch.accountants.IAccountant`.
        force: Replace an existing registration instead of raising.

    Raises:
        ValueError: If ``mechanism`` is already registered to another class and
            ``force`` is False, or is not a non-empty string.
        TypeError: If ``accountant`` is not an ``IAccountant`` subclass.
    """
    if not isinstance(force, bool):
        raise TypeError(f"force must be a bool, got {force!r}.")
    _core_register(mechanism, accountant, overwrite=force)


def create_accountant(mechanism: str, **kwargs: Any) -> Accountant:
    """Create an empty accountant of the registered kind ``mechanism``.

    Args:
        mechanism: ``"rdp"``, ``"prv"``, ``"pld"``, ``"gdp"`` or a registered custom name.
        **kwargs: Passed to the accountant's constructor (e.g.
            ``value_discretization_interval`` for ``"pld"``).

    Returns:
        The new accountant.

    Raises:
        ValueError: If ``mechanism`` is not registered; the message lists the known names.
    """
    return _core_create(mechanism, **kwargs)
