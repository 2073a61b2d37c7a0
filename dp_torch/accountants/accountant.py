"""The accountant base class (Opacus' ``opacus.accountants.accountant``).

``IAccountant`` is :class:`dpcore.accounting.Accountant` itself. It differs from
Opacus' ``IAccountant`` where Opacus is not correct:

- every mutating method validates its input before changing the history, so a
  rejected ``step`` or ``load_state_dict`` leaves the ledger intact;
- ``len(accountant)`` is the number of recorded steps (Opacus returns the number
  of merged history entries although its docstring promises steps);
- the base class does not import the optimizer (the step hook duck-types it).
"""

from dpcore.accounting import Accountant as IAccountant

__all__ = ["IAccountant"]
