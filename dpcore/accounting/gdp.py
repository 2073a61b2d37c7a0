"""Gaussian-DP accountant: the central-limit approximation of Bu, Dong, Long, Su (2020).

Each Poisson-subsampled Gaussian step with noise multiplier ``sigma`` and rate
``q`` is approximated, as the number of steps grows, by a mu-GDP mechanism
with ``mu^2 = sum_t q_t^2 (exp(1/sigma_t^2) - 1)`` (Poisson sampling), or with
``mu^2 = sum_t 2 q_t^2 (exp(1/sigma_t^2) Phi(1.5/sigma_t) + 3 Phi(-0.5/sigma_t) - 2)``
(uniform sampling without replacement; both agree, ``mu^2 ~ sum_t q_t^2 / sigma_t^2``, as
the noise grows). mu-GDP converts exactly to
``(epsilon, delta)`` through ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.

Guarantee: none. The CLT is an *approximation*, and it under-reports epsilon,
badly so for small sampling rates and small noise (for sigma 0.5, q 0.002,
5000 steps, delta 1e-7 it gives ~5.6 where the tight value is ~9.6). Every
query therefore warns; when a certified lower bound on the true epsilon (from
the PRV accountant) exceeds the GDP figure, it warns louder with both numbers.
Use ``"prv"`` or ``"pld"`` for a guaranteed upper bound.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from scipy import optimize, special

from dpcore.checks import check_delta
from dpcore.accounting._base import Accountant
from dpcore.accounting._registry import register_accountant

__all__ = [
    "GDPAccountant",
    "GDPApproximationWarning",
    "GDPUnderReportWarning",
    "GaussianAccountant",
    "compute_mu",
    "eps_from_mu",
]


class GDPApproximationWarning(UserWarning):
    """The GDP (CLT) accountant is an approximation and may under-report epsilon."""


class GDPUnderReportWarning(GDPApproximationWarning):
    """The GDP epsilon is below a certified lower bound on the true epsilon."""


def _mu_sq_per_step(sigma: float, q: float, poisson: bool) -> float:
    if sigma == 0.0:
        return math.inf
    if poisson:
        return q * q * math.expm1(sigma**-2)
    inner = (
        math.exp(sigma**-2) * special.ndtr(1.5 / sigma) + 3.0 * special.ndtr(-0.5 / sigma) - 2.0
    )
    return 2.0 * q * q * inner


def compute_mu(history: list[tuple[float, float, int]], *, poisson: bool = True) -> float:
    """The CLT ``mu`` of a history of ``(noise_multiplier, sample_rate, num_steps)``."""
    total = sum(n * _mu_sq_per_step(sigma, q, poisson) for sigma, q, n in history)
    return math.sqrt(total)


def _delta_of(eps: float, mu: float) -> float:
    return float(
        special.ndtr(-eps / mu + mu / 2.0) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2.0)
    )


def eps_from_mu(mu: float, delta: float) -> float:
    """The epsilon of a mu-GDP mechanism at ``delta`` (exact conversion).

    Args:
        mu: The GDP parameter, ``>= 0``.
        delta: Target delta, ``0 < delta < 1``.

    Returns:
        The smallest ``epsilon >= 0`` with ``delta(epsilon) <= delta``.
    """
    delta = check_delta(delta)
    if mu == 0.0 or _delta_of(0.0, mu) <= delta:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    high = max(1.0, mu * mu)
    while _delta_of(high, mu) > delta:
        high *= 2.0
    return float(optimize.brentq(lambda e: _delta_of(e, mu) - delta, 0.0, high, xtol=1e-12))


class GDPAccountant(Accountant):
    """Gaussian-DP (CLT) accountant; Opacus' ``GaussianAccountant``.

    Unlike Opacus' version, histories whose noise or sampling rate change are
    accepted: the CLT composes them by adding ``mu^2``.

    Warns:
        GDPApproximationWarning: On every query (the CLT may under-report).
        GDPUnderReportWarning: When the PRV accountant certifies that the true
            epsilon is larger than the GDP figure.
    """

    name = "gdp"

    def get_mu(self, *, poisson: bool = True) -> float:
        """The CLT ``mu`` of the recorded history."""
        return compute_mu(self._history, poisson=poisson)

    def get_epsilon(self, delta: float, poisson: bool = True, check: bool = True, **_: Any) -> float:
        """Return the CLT epsilon of the history at ``delta``.

        Args:
            delta: Target delta, ``0 < delta < 1``.
            poisson: True for Poisson sampling (the default in DP-SGD), False for
                uniform sampling without replacement.
            check: Compare against a certified PRV lower bound (Poisson only) and
                warn louder when the GDP figure is below it.

        Returns:
            The approximate epsilon (not guaranteed to be an upper bound).
        """
        delta = check_delta(delta)
        if not self._history:
            return 0.0
        eps = eps_from_mu(self.get_mu(poisson=poisson), delta)
        lower = self._certified_lower_bound(delta) if (check and poisson) else None
        _warn(eps, lower)
        return eps

    def _certified_lower_bound(self, delta: float) -> float | None:
        try:
            from dpcore.accounting.prv import PRVAccountant
        except ImportError:  # prv is part of dpcore; tolerate a trimmed install
            return None
        prv = PRVAccountant()
        prv.history = self._history
        lower, _, _ = prv.get_epsilon_bounds(delta, eps_error=0.05)
        return lower


def _warn(eps: float, lower: float | None) -> None:
    if lower is not None and math.isfinite(eps) and lower > eps:
        warnings.warn(
            f"the GDP (CLT) accountant reports epsilon={eps:.4g}, but the true epsilon is at "
            f"least {lower:.4g} (certified by the PRV accountant): GDP under-reports here. "
            f"Use accountant='prv' or 'pld' for a guaranteed upper bound.",
            GDPUnderReportWarning,
            stacklevel=3,
        )
        return
    warnings.warn(
        f"the GDP (CLT) accountant's epsilon={eps:.4g} is an approximation that may "
        f"under-report, especially for small sampling rates and noise; use accountant='prv' "
        f"or 'pld' for a guaranteed upper bound.",
        GDPApproximationWarning,
        stacklevel=3,
    )


#: Opacus' name for the GDP accountant.
GaussianAccountant = GDPAccountant

register_accountant("gdp", GDPAccountant)
