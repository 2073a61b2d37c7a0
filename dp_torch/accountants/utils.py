"""Noise calibration (Opacus' ``opacus.accountants.utils``).

:func:`get_noise_multiplier` is :func:`dpcore.accounting.get_noise_multiplier`:
the same bisection and arguments as Opacus, with the result guaranteed to give
``epsilon <= target_epsilon`` under the named accountant.
"""

from dpcore.accounting.calibration import MAX_SIGMA
from dpcore.accounting.calibration import get_noise_multiplier

__all__ = ["MAX_SIGMA", "get_noise_multiplier"]
