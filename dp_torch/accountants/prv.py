"""The privacy-random-variable accountant (Opacus' ``opacus.accountants.prv``).

:class:`PRVAccountant` is :class:`dpcore.accounting.prv.PRVAccountant` (Gopi, Lee and
Wutschitz 2021); importing this module registers it under ``"prv"``.
"""

from dpcore.accounting.prv import PRVAccountant

__all__ = ["PRVAccountant"]
