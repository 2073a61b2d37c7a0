"""Privacy accountants for DP-SGD: RDP, GDP, PRV and PLD, a registry, calibration.

Every accountant records the same history of ``(noise_multiplier, sample_rate,
num_steps)`` events and turns it into an ``(epsilon, delta)`` guarantee:

- ``"rdp"`` (:class:`RDPAccountant`, the default): Renyi DP, an upper bound that
  over-reports the tight value by roughly 7-25% in typical settings.
- ``"prv"`` (:class:`PRVAccountant`) and ``"pld"`` (:class:`PLDAccountant`):
  numerical composition of privacy loss distributions; tight upper bounds.
- ``"gdp"`` (:class:`GDPAccountant`, also :data:`GaussianAccountant`): the CLT
  approximation; it can under-report and warns on every query.
"""

from dpcore.accounting._base import Accountant
from dpcore.accounting._base import HistoryEntry
from dpcore.accounting._base import validate_history
from dpcore.accounting._registry import available_accountants
from dpcore.accounting._registry import create_accountant
from dpcore.accounting._registry import register_accountant
from dpcore.accounting.calibration import get_noise_multiplier
from dpcore.accounting.gdp import GaussianAccountant
from dpcore.accounting.gdp import GDPAccountant
from dpcore.accounting.gdp import GDPApproximationWarning
from dpcore.accounting.gdp import GDPUnderReportWarning
from dpcore.accounting.pld import PLDAccountant
from dpcore.accounting.prv import PRVAccountant
from dpcore.accounting.rdp import RDPAccountant
from dpcore.accounting.rdp import RDPOrderWarning

__all__ = [
    "Accountant",
    "GDPAccountant",
    "GDPApproximationWarning",
    "GDPUnderReportWarning",
    "GaussianAccountant",
    "HistoryEntry",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "RDPOrderWarning",
    "available_accountants",
    "create_accountant",
    "get_noise_multiplier",
    "register_accountant",
    "validate_history",
]
