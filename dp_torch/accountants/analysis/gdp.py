"""Gaussian-DP (central limit) formulas (mirrors ``opacus.accountants.analysis.gdp``).

``T`` steps of the subsampled Gaussian mechanism with noise multiplier ``sigma`` and
sampling rate ``q`` are, as ``T`` grows with ``q * sqrt(T)`` fixed, ``mu``-GDP with
(Dong, Roth and Su, "Gaussian Differential Privacy", 2022, Corollary 5.4; Bu, Dong,
Long and Su, "Deep Learning with Gaussian Differential Privacy", 2020):

* Poisson sampling: ``mu = q * sqrt(T * (exp(1 / sigma**2) - 1))``;
* uniform sampling without replacement:
  ``mu = q * sqrt(2 * T * (exp(1 / sigma**2) * Phi(1.5 / sigma) + 3 * Phi(-0.5 / sigma) - 2))``.

Both tend to ``q * sqrt(T) / sigma`` for large ``sigma``. ``mu``-GDP converts exactly to
``(epsilon, delta(epsilon))`` with
``delta = Phi(-epsilon / mu + mu / 2) - exp(epsilon) * Phi(-epsilon / mu - mu / 2)``.

Guarantee: none. The central limit is an approximation that can under-report epsilon
(see :class:`dpcore.accounting.GDPAccountant`); use the ``"prv"`` or ``"pld"``
accountant for an upper bound.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from scipy import special

from dpcore.accounting.gdp import compute_mu
from dpcore.accounting.gdp import eps_from_mu as _eps_from_mu

__all__ = [
    "compute_eps_poisson",
    "compute_eps_uniform",
    "compute_mu_poisson",
    "compute_mu_uniform",
    "delta_eps_mu",
    "eps_from_mu",
]


def _check(steps: Any, noise_multiplier: Any, sample_rate: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
    if not isinstance(noise_multiplier, numbers.Real) or not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be a number > 0, got {noise_multiplier!r}.")
    if not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")


def compute_mu_poisson(*, steps: int, noise_multiplier: float, sample_rate: float) -> float:
    """``mu`` of ``steps`` Poisson-subsampled Gaussian steps.

    Args:
        steps: Number of steps ``T``.
        noise_multiplier: ``sigma > 0``.
        sample_rate: ``q`` in ``(0, 1]``.
    """
    _check(steps, noise_multiplier, sample_rate)
    return compute_mu([(float(noise_multiplier), float(sample_rate), int(steps))], poisson=True)


def compute_mu_uniform(*, steps: int, noise_multiplier: float, sample_rate: float) -> float:
    """``mu`` of ``steps`` Gaussian steps on uniformly sampled (without replacement) batches.

    Args:
        steps: Number of steps ``T``.
        noise_multiplier: ``sigma > 0``.
        sample_rate: Batch size over data set size ``q`` in ``(0, 1]``.
    """
    _check(steps, noise_multiplier, sample_rate)
    sigma = float(noise_multiplier)
    inner = math.exp(sigma**-2) * special.ndtr(1.5 / sigma) + 3.0 * special.ndtr(-0.5 / sigma) - 2.0
    return float(sample_rate) * math.sqrt(2.0 * steps * inner)


def delta_eps_mu(*, eps: float, mu: float) -> float:
    """``delta`` at ``epsilon = eps`` of a ``mu``-GDP mechanism.

    Args:
        eps: ``epsilon >= 0``.
        mu: ``mu > 0``.
    """
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu!r}.")
    return float(special.ndtr(-eps / mu + mu / 2.0) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2.0))


def eps_from_mu(*, mu: float, delta: float) -> float:
    """The smallest ``epsilon >= 0`` of a ``mu``-GDP mechanism at ``delta``.

    Args:
        mu: ``mu >= 0``.
        delta: ``0 < delta < 1``.
    """
    return _eps_from_mu(mu, delta)


def compute_eps_poisson(*, steps: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """``epsilon`` at ``delta`` of :func:`compute_mu_poisson`'s ``mu``."""
    mu = compute_mu_poisson(steps=steps, noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return eps_from_mu(mu=mu, delta=delta)


def compute_eps_uniform(*, steps: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """``epsilon`` at ``delta`` of :func:`compute_mu_uniform`'s ``mu``."""
    mu = compute_mu_uniform(steps=steps, noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return eps_from_mu(mu=mu, delta=delta)
