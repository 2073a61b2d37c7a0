"""The Gaussian-DP accountant (Opacus' ``opacus.accountants.gdp``).

:class:`GaussianAccountant` is :class:`dpcore.accounting.GDPAccountant`: the
central-limit approximation, which may under-report epsilon and therefore warns
(``GDPApproximationWarning``) on every query.
"""

from dpcore.accounting.gdp import GaussianAccountant
from dpcore.accounting.gdp import GDPAccountant
from dpcore.accounting.gdp import GDPApproximationWarning
from dpcore.accounting.gdp import GDPUnderReportWarning

__all__ = [
    "GDPAccountant",
    "GDPApproximationWarning",
    "GDPUnderReportWarning",
    "GaussianAccountant",
]
