"""Renyi-DP accountant for the Poisson-subsampled Gaussian mechanism.

Guarantee: the history is ``(epsilon, delta)``-DP under add/remove-one neighbours for the
returned epsilon (RDP of the sampled Gaussian, Mironov, Talwar, Zhang 2019, composed over steps
and converted with Canonne, Kamath, Steinke 2020 / Balle et al. 2020). How fractional orders
are summed, and why that differs from dp-accounting: docs/design.md ("The RDP accountant").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import special

from dpcore.checks import check_delta, check_noise_multiplier, check_num_steps, check_sample_rate
from dpcore.accounting._base import Accountant
from dpcore.accounting._registry import register_accountant

__all__ = [
    "DEFAULT_ALPHAS",
    "RDPAccountant",
    "RDPOrderWarning",
    "compute_rdp",
    "get_privacy_spent",
]

#: Opacus' default list of RDP orders: 1.1, 1.2, ..., 10.9, then 12, 13, ..., 63.
DEFAULT_ALPHAS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

_SERIES_MAX_TERMS = 1000
_SERIES_LOG_TOL = 30.0
#: Fractional orders evaluated together: each order's series is a row of ``1001`` terms in a
#: dozen temporaries, so a chunk bounds them (~1 MB) instead of growing with the order list.
_ORDERS_PER_CHUNK = 16


class RDPOrderWarning(UserWarning):
    """The optimal RDP order is at the edge of the orders searched."""


# ---------------------------------------------------------------------------- A_alpha
def _log_binom(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log |binom(n, k)| for real ``n`` and integer ``k`` (broadcasting)."""
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)), accurate far into both tails."""
    return math.log(2.0) + special.log_ndtr(-x * math.sqrt(2.0))


def _log_a_integer(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log A_alpha for integer orders: a binomial mixture of Gaussian moments."""
    top = int(orders.max())
    i = np.arange(top + 1, dtype=np.float64)[None, :]
    alpha = orders[:, None]
    terms = (
        _log_binom(alpha, np.minimum(i, alpha))
        + i * math.log(q)
        + (alpha - i) * math.log1p(-q)
        + (i * i - i) / (2.0 * sigma**2)
    )
    terms = np.where(i <= alpha, terms, -np.inf)
    return special.logsumexp(terms, axis=1)


def _series_terms(q: float, sigma: float, alpha: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Log-magnitudes of the two families of terms of the fractional-order series."""
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    j = alpha - i
    log_coef = _log_binom(alpha, i)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    scale = math.sqrt(2.0) * sigma
    low = (
        log_coef + i * log_q + j * log_1mq + (i * i - i) / (2.0 * sigma**2)
        + math.log(0.5) + _log_erfc((i - z0) / scale)
    )
    high = (
        log_coef + j * log_q + i * log_1mq + (j * j - j) / (2.0 * sigma**2)
        + math.log(0.5) + _log_erfc((z0 - j) / scale)
    )
    return np.stack([low, high])


def _binom_sign(alpha: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Sign of binom(alpha, i) for fractional alpha: (-1)^max(0, i - floor(alpha) - 1)."""
    flips = np.maximum(0.0, i - np.floor(alpha) - 1.0)
    return np.where(flips % 2 == 0, 1.0, -1.0)


def _log_a_fractional(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log A_alpha for fractional orders by the convergent series, vectorised.

    Both families are summed with their signs (the binomial coefficients of a
    fractional order alternate in sign beyond ``floor(alpha) + 1``). The sum
    stops at the first index where both families decrease in magnitude and the
    larger term is below ``exp(-30)`` of the running total. Beyond that point
    the series alternates with decreasing terms, so the truncation error is at
    most the next term. An order whose series has not reached that point within
    1000 terms gets the alternating-series upper bound: the partial sum plus the
    magnitude of the next term of each family.
    """
    alpha = orders[:, None]
    i = np.arange(_SERIES_MAX_TERMS + 1, dtype=np.float64)[None, :]
    log_mag = _series_terms(q, sigma, alpha, i)
    peak = np.max(log_mag, axis=(0, 2))[:, None]
    signed = _binom_sign(alpha, i) * (np.exp(log_mag[0] - peak) + np.exp(log_mag[1] - peak))
    partial = np.cumsum(signed[:, :-1], axis=1)
    low, high = log_mag[0, :, :-1], log_mag[1, :, :-1]
    decreasing = np.zeros_like(low, dtype=bool)
    decreasing[:, 1:] = (low[:, 1:] < low[:, :-1]) & (high[:, 1:] < high[:, :-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_partial = np.log(partial) + peak
    done = decreasing & (np.maximum(low, high) < log_partial - _SERIES_LOG_TOL)
    rows = np.arange(len(orders))
    stop = np.argmax(done, axis=1)
    converged = done[rows, stop]
    tail = np.exp(log_mag[0, :, -1] - peak[:, 0]) + np.exp(log_mag[1, :, -1] - peak[:, 0])
    value = np.where(converged, partial[rows, stop], partial[:, -1] + tail)
    return np.log(value) + peak[:, 0]


def _rdp_one_step(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at each order."""
    if sigma == 0.0:
        return np.full(orders.shape, np.inf)
    if q == 1.0:
        return orders / (2.0 * sigma**2)
    rdp = np.empty(orders.shape, dtype=np.float64)
    integer = np.array([float(a).is_integer() for a in orders], dtype=bool)
    if integer.any():
        rdp[integer] = _log_a_integer(q, sigma, orders[integer])
    if (~integer).any():
        fractional = orders[~integer]
        rdp[~integer] = np.concatenate([
            _log_a_fractional(q, sigma, fractional[start:start + _ORDERS_PER_CHUNK])
            for start in range(0, len(fractional), _ORDERS_PER_CHUNK)
        ])
    return np.maximum(rdp, 0.0) / (orders - 1.0)


@lru_cache(maxsize=4096)
def _rdp_cached(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    result = _rdp_one_step(q, sigma, np.asarray(orders, dtype=np.float64))
    result.setflags(write=False)
    return result


def _check_orders(orders: Sequence[float] | np.ndarray, name: str = "alphas") -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in np.atleast_1d(np.asarray(orders, dtype=np.float64)))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers > 1, got {orders!r}.") from None
    if not values or any(not (a > 1.0) or math.isnan(a) for a in values):
        raise ValueError(
            f"{name} must be a non-empty sequence of RDP orders > 1, got {orders!r}; "
            f"e.g. dpcore.accounting.rdp.DEFAULT_ALPHAS."
        )
    return values


def compute_rdp(
    *, q: float, noise_multiplier: float, steps: int, orders: Sequence[float] | float
) -> np.ndarray:
    """RDP of ``steps`` Poisson-subsampled Gaussian steps at each order.

    Args:
        q: Sampling rate, ``0 < q <= 1``.
        noise_multiplier: Noise standard deviation over sensitivity, ``>= 0``.
        steps: Number of steps, ``>= 1``.
        orders: RDP orders (each ``> 1``), a float or a sequence.

    Returns:
        An array of RDP values, one per order (``inf`` for zero noise).
    """
    q = check_sample_rate(q, "q")
    sigma = check_noise_multiplier(noise_multiplier)
    steps = check_num_steps(steps, "steps")
    orders_t = _check_orders(orders, "orders")
    return steps * _rdp_cached(q, sigma, orders_t)


# ---------------------------------------------------------------------------- conversion
def _epsilon_per_order(orders: np.ndarray, rdp: np.ndarray, delta: float) -> np.ndarray:
    """The (epsilon, delta) conversion of each order's RDP (Balle et al. 2020)."""
    rdp = np.maximum(rdp, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        eps = rdp + np.log1p(-1.0 / orders) - np.log(delta * orders) / (orders - 1.0)
        tv_zero = delta**2 + np.expm1(-rdp) > 0
    eps = np.where(orders > 1.01, eps, np.inf)
    eps = np.where(tv_zero, 0.0, eps)
    return np.where(np.isnan(eps), np.inf, eps)


def _warn_if_edge(orders: np.ndarray, best: float, eps: float) -> None:
    if len(orders) < 2 or not math.isfinite(eps) or eps == 0.0:
        return
    lo, hi = float(orders.min()), float(orders.max())
    if best in (lo, hi):
        side = "largest" if best == hi else "smallest"
        warnings.warn(
            f"the optimal RDP order {best:g} is the {side} of the orders searched "
            f"({lo:g}..{hi:g}), so epsilon={eps:.6g} may be loose; pass alphas that extend "
            f"beyond {best:g} to get a tighter bound.",
            RDPOrderWarning,
            stacklevel=3,
        )


def get_privacy_spent(
    *, orders: Sequence[float] | float, rdp: Sequence[float] | float, delta: float
) -> tuple[float, float]:
    """Convert RDP at several orders to ``(epsilon, best_order)`` for ``delta``.

    Args:
        orders: RDP orders (each ``> 1``).
        rdp: RDP value at each order.
        delta: Target delta, ``0 < delta < 1``.

    Returns:
        ``(epsilon, best_order)``; ``(inf, nan)`` when every order is infinite.

    Warns:
        RDPOrderWarning: When the optimum is the smallest or largest order.
    """
    delta = check_delta(delta)
    orders_arr = np.asarray(_check_orders(orders, "orders"))
    rdp_arr = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if rdp_arr.shape != orders_arr.shape:
        raise ValueError(
            f"rdp must have one value per order: got {rdp_arr.size} values for "
            f"{orders_arr.size} orders."
        )
    eps_vec = _epsilon_per_order(orders_arr, rdp_arr, delta)
    idx = int(np.argmin(eps_vec))
    eps = max(0.0, float(eps_vec[idx]))
    if not math.isfinite(eps):
        return math.inf, math.nan
    best = float(orders_arr[idx])
    _warn_if_edge(orders_arr, best, eps)
    return eps, best


# ---------------------------------------------------------------------------- accountant
class RDPAccountant(Accountant):
    """Renyi-DP accountant (Opacus' default), with an O(orders) epsilon query.

    The RDP of the history at the default orders is kept as a running total,
    updated as steps are recorded, so a query costs a few microseconds whatever
    the length of the history. Custom orders are computed per entry of the
    history (with the per-step RDP cached per ``(noise_multiplier, sample_rate)``).

    Example:
        >>> acc = RDPAccountant()
        >>> acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000)
        >>> eps, alpha = acc.get_privacy_spent(delta=1e-5)
    """

    name = "rdp"
    DEFAULT_ALPHAS = DEFAULT_ALPHAS

    def __init__(self) -> None:
        self._closed = np.zeros(len(DEFAULT_ALPHAS))
        super().__init__()

    def _on_record(self, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        _rdp_cached(sample_rate, noise_multiplier, DEFAULT_ALPHAS)  # fail before any change
        if self._history and self._history[-1][:2] != (noise_multiplier, sample_rate):
            self._closed = self._closed + self._entry_rdp(self._history[-1], DEFAULT_ALPHAS)

    def _on_reset(self) -> None:
        self._closed = np.zeros(len(DEFAULT_ALPHAS))

    @staticmethod
    def _entry_rdp(entry: tuple[float, float, int], orders: tuple[float, ...]) -> np.ndarray:
        sigma, q, n = entry
        return n * _rdp_cached(q, sigma, orders)

    def _rdp_at(self, orders: tuple[float, ...]) -> np.ndarray:
        """Total RDP of the history: a left fold over its entries, in order.

        For the default orders the fold over all entries but the last (which
        can still grow by merging) is kept up to date as steps arrive, so a
        query costs O(len(orders)) whatever the length of the history. The
        result depends only on the history, not on how it was recorded.
        """
        if orders == DEFAULT_ALPHAS:
            return self._closed + self._entry_rdp(self._history[-1], orders)
        total = np.zeros(len(orders))
        for entry in self._history:
            total = total + self._entry_rdp(entry, orders)
        return total

    def get_privacy_spent(
        self, *, delta: float, alphas: Sequence[float] | None = None
    ) -> tuple[float, float]:
        """Return ``(epsilon, best_alpha)`` of the history for ``delta``.

        Args:
            delta: Target delta, ``0 < delta < 1``.
            alphas: RDP orders to optimise over; Opacus' default list if None.

        Returns:
            ``(epsilon, best_alpha)``; ``(0.0, nan)`` for an empty history.
        """
        delta = check_delta(delta)
        orders = DEFAULT_ALPHAS if alphas is None else _check_orders(alphas)
        if not self._history:
            return 0.0, math.nan
        return get_privacy_spent(orders=orders, rdp=self._rdp_at(orders), delta=delta)

    def get_epsilon(self, delta: float, alphas: Sequence[float] | None = None) -> float:
        """Return the epsilon of the history for ``delta`` (see :meth:`get_privacy_spent`)."""
        eps, _ = self.get_privacy_spent(delta=delta, alphas=alphas)
        return eps


register_accountant("rdp", RDPAccountant)
