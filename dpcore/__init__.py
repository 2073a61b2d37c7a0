"""dpcore: what differentially private SGD *is*, in numpy and scipy only.

Accountants (RDP, GDP, PRV, PLD), noise calibration, Poisson sampling plans,
clipping and noise specs with their reference math, the privacy ledger and a
command-line interface. This package never imports a deep-learning framework.
"""

__version__ = "0.1.0"

from dpcore import accounting

__all__ = [
    "__version__",
    "accounting",
]
