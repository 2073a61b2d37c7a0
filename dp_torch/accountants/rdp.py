"""The Renyi-DP accountant (Opacus' ``opacus.accountants.rdp``): :class:`dpcore.accounting.RDPAccountant`."""

from dpcore.accounting.rdp import DEFAULT_ALPHAS
from dpcore.accounting.rdp import RDPAccountant

__all__ = ["DEFAULT_ALPHAS", "RDPAccountant"]
