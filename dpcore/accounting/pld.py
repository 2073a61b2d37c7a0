"""Privacy-loss-distribution (PLD) accountant for the Poisson-subsampled Gaussian mechanism.

Guarantee: :meth:`PLDAccountant.get_epsilon` returns an epsilon for which the recorded history
is ``(epsilon, delta)``-DP under add/remove-one neighbours, up to floating-point rounding that is
itself bounded and charged to delta. Every approximation (discretisation, truncation, both
neighbouring directions, FFT rounding) is pessimistic; docs/design.md ("The PLD accountant")
explains each and how to choose the discretisation interval.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np
from scipy import fft as sp_fft
from scipy import special

from dpcore.checks import check_delta, check_positive
from dpcore.accounting._base import Accountant, HistoryEntry
from dpcore.accounting._registry import register_accountant

_DEFAULT_INTERVAL = 1e-4

__all__ = ["PLDAccountant"]

#: Probability budget for everything truncated (single-step tails, composed tails).
_TAIL_BUDGET = 1e-16
#: Largest number of grid points of one discretised step or of the composed PLD.
_MAX_BINS = 2**22
#: Grid points per step of the cheap probe that sizes the composed window.
_PROBE_BINS = 4096
#: exp() overflows above ~709.78; above this, products with exp(x) go through logs.
_EXP_SAFE = 700.0
#: Unit roundoff scale of float64 (2**-52).
_DOUBLE_EPS = float(np.finfo(np.float64).eps)
#: exp(-800) is far below the smallest double that matters next to a probability 1.
_LOG_NEGLIGIBLE = 800.0


@dataclasses.dataclass(frozen=True)
class _Pmf:
    """A discrete PLD: ``probs[j]`` is the mass at loss ``(offset + j) * interval``.

    ``infinity_mass`` is the mass of the atom at loss ``+inf``. The masses are
    those of the "upper" distribution of the pair; the "lower" mass of an atom
    at loss ``l`` is ``mass * exp(-l)``.
    """

    offset: int
    probs: np.ndarray
    infinity_mass: float


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` without BLAS, whose thread pool stalls on a busy machine."""
    return float(np.multiply(a, b).sum())


# ---------------------------------------------------------------------------- one step
def _remove_loss(y: float, sigma: float, q: float) -> float:
    """Loss of outcome ``y`` for the remove pair ``((1-q)N(0,s^2) + qN(1,s^2), N(0,s^2))``."""
    a = (y - 0.5) / sigma**2
    if q == 1.0:
        return a
    return float(np.logaddexp(math.log1p(-q), math.log(q) + a))


def _remove_threshold(eps: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """The outcome ``y`` at which the remove loss equals ``eps`` (``-inf`` below its range).

    Solves ``log(1 - q + q exp((y - 1/2) / sigma^2)) = eps`` for ``y``.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inner = q * np.exp(-eps) - np.expm1(-eps)  # = (e^eps - 1 + q) e^-eps
        log_inner = np.log(np.maximum(inner, 0.0))
        return 0.5 + sigma**2 * (eps - math.log(q) + log_inner)


def _grid_range(sigma: float, q: float, interval: float, step_tail: float) -> tuple[int, int]:
    """Lowest and highest grid index of one step's remove PLD."""
    z = -float(special.ndtri(step_tail))  # N(0,1) upper tail beyond z is step_tail
    top = _remove_loss(1.0 + sigma * z, sigma, q)
    if q < 1.0:
        bottom = math.log1p(-q)
    else:
        bottom = _remove_loss(1.0 - sigma * z, sigma, q)
    k_lo = math.floor(bottom / interval)
    k_hi = max(math.ceil(top / interval), k_lo + 1)
    return k_lo, k_hi


def _node_cdfs(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Phi(z)`` and ``Phi(-z)``, each accurate in its own small tail."""
    return special.ndtr(z), special.ndtr(-z)


def _interval_masses(z: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Standard-normal mass between consecutive increasing nodes ``z``.

    Returns the masses, the mass below ``z[0]`` and the mass above ``z[-1]``.
    The difference is taken on whichever side of zero keeps full precision.
    """
    cdf, sf = _node_cdfs(z)
    left = cdf[1:] - cdf[:-1]
    right = sf[:-1] - sf[1:]
    return np.where(z[:-1] > 0.0, right, left), float(cdf[0]), float(sf[-1])


def _times_exp(values: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """``values * exp(exponents)`` for ``values >= 0`` without overflow to ``inf * 0``."""
    if exponents.size == 0 or float(np.max(exponents)) <= _EXP_SAFE:
        return values * np.exp(exponents)
    with np.errstate(divide="ignore"):
        return np.exp(np.log(values) + exponents)


def _discretise_step(
    sigma: float, q: float, interval: float, step_tail: float
) -> tuple[_Pmf, _Pmf]:
    """Pessimistic connect-the-dots PLDs of one step: ``(remove, add)``.

    The outcome ``y`` of one step is drawn from ``U = (1-q) N(0, s^2) + q N(1, s^2)``
    (example present with probability ``q``) or ``L = N(0, s^2)`` (example absent).
    Removing the example gives the pair ``(U, L)``, whose loss
    ``log(U(y) / L(y))`` increases with ``y``; adding it gives the swapped pair
    ``(L, U)`` with the negated loss. So one set of buckets, between the
    outcomes ``y_k`` where the remove loss crosses ``k * interval``, serves both.
    """
    k_lo, k_hi = _grid_range(sigma, q, interval, step_tail)
    ks = np.arange(k_lo, k_hi + 1)
    eps = ks * interval
    y = _remove_threshold(eps, sigma, q)
    if q < 1.0:
        y[0] = -np.inf  # the lowest point lies at or below the loss floor log(1 - q)
    m0, _, tail0 = _interval_masses(y / sigma)
    m1, below1, tail1 = _interval_masses((y - 1.0) / sigma)
    lower = m0  # bucket masses under L
    upper = (1.0 - q) * m0 + q * m1  # and under U
    upper_tail = (1.0 - q) * tail0 + q * tail1  # above the top bucket
    lower_tail = tail0
    e_lo = eps[:-1]

    # Remove: bucket losses in [eps_i, eps_i + interval]; the share of the top
    # end point keeps the L-mass: b * e^{-eps_i - d} + (m - b) e^{-eps_i} = L-mass.
    to_top = (upper - _times_exp(lower, e_lo)) / -math.expm1(-interval)
    to_top = np.clip(to_top, 0.0, upper)
    remove = np.zeros(ks.size)
    remove[:-1] += upper - to_top
    remove[1:] += to_top
    # Above the grid: keep U-mass e^{eps_top} * L-tail at the top point, rest to +inf.
    lower_tail_scaled = float(_times_exp(np.array([lower_tail]), eps[-1:])[0])
    remove_inf = max(upper_tail - lower_tail_scaled, 0.0)
    remove[-1] += upper_tail - remove_inf
    if q == 1.0:
        remove[0] += below1  # below the grid: rounded up to its lowest point
    remove_pmf = _Pmf(int(k_lo), remove, remove_inf)
    if q == 1.0:
        return remove_pmf, remove_pmf  # the two directions coincide

    # Add: same buckets, upper mass `lower`, lower mass `upper`, losses in
    # [-eps_i - d, -eps_i]; the share of the top end point (-eps_i) keeps the U-mass.
    to_high = (lower * math.exp(interval) - upper * np.exp(-e_lo)) / math.expm1(interval)
    to_high = np.clip(to_high, 0.0, lower)
    add = np.zeros(ks.size)  # indexed like `ks`; reversed below
    add[:-1] += to_high
    add[1:] += lower - to_high
    add[-1] += lower_tail  # add-losses below -eps_top, rounded up to it
    add_pmf = _Pmf(int(-k_hi), add[::-1].copy(), 0.0)
    return remove_pmf, add_pmf


# ---------------------------------------------------------------------------- composition
def _log_mgf(pmf: _Pmf, lambdas: np.ndarray) -> np.ndarray:
    """``log sum_j p_j exp(lambda * k_j)`` over the finite atoms (grid units)."""
    with np.errstate(divide="ignore"):
        log_p = np.log(pmf.probs)
    index = np.arange(pmf.probs.size, dtype=np.float64)
    out = np.empty(lambdas.size)
    for i, lam in enumerate(lambdas):
        v = log_p + lam * index
        top = float(np.max(v))
        out[i] = lam * pmf.offset + top + math.log(float(np.sum(np.exp(v - top))))
    return out


def _variance(pmf: _Pmf) -> float:
    """Variance (grid units squared) of the finite part, normalised to mass one."""
    p = pmf.probs
    total = float(p.sum())
    index = np.arange(p.size, dtype=np.float64)
    mean = _dot(p, index) / total
    return max(_dot(p, (index - mean) ** 2) / total, 0.0)


def _window(segments: list[tuple[_Pmf, int]], tail: float) -> tuple[int, int, float]:
    """Chernoff window ``[low, high]`` of the composition and the mass bound above it."""
    base = sum(n * pmf.offset for pmf, n in segments)
    top = sum(n * (pmf.offset + pmf.probs.size - 1) for pmf, n in segments)
    var = sum(n * _variance(pmf) for pmf, n in segments)
    scale = math.sqrt(2.0 * math.log(1.0 / tail)) / max(math.sqrt(var), 1.0)
    lambdas = scale * np.exp2(np.arange(-6.0, 3.0))
    log_tail = math.log(1.0 / tail)
    k_up = sum(n * _log_mgf(pmf, lambdas) for pmf, n in segments)
    k_down = sum(n * _log_mgf(pmf, -lambdas) for pmf, n in segments)
    # P(S >= h + 1) <= exp(K(lam) - lam (h + 1)) and P(S <= l - 1) <= exp(K(-lam) + lam (l - 1)).
    high_each = np.ceil((k_up + log_tail) / lambdas) - 1.0
    low_each = np.floor(-(k_down + log_tail) / lambdas) + 1.0
    high = int(min(float(np.min(high_each)), top))
    low = min(int(max(float(np.max(low_each)), base)), high)
    if high >= top:
        return low, top, 0.0
    log_bound = float(np.min(k_up - lambdas * (high + 1)))
    return low, high, min(math.exp(min(log_bound, 0.0)), tail)


def _fold(probs: np.ndarray, length: int) -> np.ndarray:
    """Wrap ``probs`` onto a circle of ``length`` (sum of entries congruent mod length)."""
    if probs.size <= length:
        return probs
    padded = np.zeros(-(-probs.size // length) * length)
    padded[: probs.size] = probs
    return padded.reshape(-1, length).sum(axis=0)


def _compose(segments: list[tuple[_Pmf, int]], window: tuple[int, int, float]) -> _Pmf:
    """Compose ``pmf`` with itself ``n`` times for each ``(pmf, n)``, and all together.

    One circular convolution of length ``N >= window``: mass outside the window
    wraps into it (it can only raise delta) and the Chernoff bound on the mass
    above the window joins the ``+inf`` atom.
    """
    low, high, above = window
    width = high - low + 1
    log_finite = sum(n * math.log1p(-pmf.infinity_mass) for pmf, n in segments)
    infinity = -math.expm1(log_finite)
    if len(segments) == 1 and segments[0][1] == 1:
        pmf = segments[0][0]
        start = low - pmf.offset
        probs = pmf.probs[start : start + width].copy()
        probs[0] += pmf.probs[:start].sum()  # rounded up to the window's lowest point
        rest = float(pmf.probs[start + width :].sum())  # above the window: to +inf
        return _Pmf(low, probs, min(infinity + rest, 1.0))
    length = sp_fft.next_fast_len(width, real=True)
    parts = [sp_fft.rfft(_fold(pmf.probs, length), length) for pmf, _ in segments]
    # |z| <= 1 for every factor, so a frequency where one factor's power is
    # below e^-_LOG_NEGLIGIBLE contributes nothing representable: skip its power.
    keep = np.ones(parts[0].size, dtype=bool)
    for part, (_, n) in zip(parts, segments):
        if n > 1:
            keep &= part.real**2 + part.imag**2 > math.exp(-2.0 * _LOG_NEGLIGIBLE / n)
    spectrum = np.zeros_like(parts[0])
    spectrum[keep] = 1.0
    for part, (_, n) in zip(parts, segments):
        spectrum[keep] *= part[keep] ** n if n > 1 else part[keep]
    circular = sp_fft.irfft(spectrum, length)
    base = sum(n * pmf.offset for pmf, n in segments)
    probs = np.roll(circular, -((low - base) % length))[:width]
    np.maximum(probs, 0.0, out=probs)
    return _Pmf(low, probs, min(infinity + above + _rounding_allowance(segments, keep), 1.0))


def _rounding_allowance(segments: list[tuple[_Pmf, int]], keep: np.ndarray) -> float:
    """Mass added to ``+inf`` to cover the FFT's rounding error in any delta.

    Rounding a spectrum value ``z`` to double precision perturbs ``z**n`` by a
    relative ``n * 2**-53``; through the inverse transform this moves any
    hockey-stick sum by at most ``~ n * eps * (1 + 0.64 log K)`` for ``K``
    kept frequencies. We add ``steps * eps * (1 + log(1 + K))``; against a
    long-double reference the largest error we measured was ``0.5 * steps * eps``.
    """
    steps = sum(n for _, n in segments)
    return steps * _DOUBLE_EPS * (1.0 + math.log1p(float(np.count_nonzero(keep))))


# ---------------------------------------------------------------------------- queries
def _positive_part(pmf: _Pmf) -> tuple[int, np.ndarray]:
    """Grid index of the first atom with loss > 0 and the masses from there on."""
    start = max(0, 1 - pmf.offset)
    return pmf.offset + start, pmf.probs[start:]


def _delta_for_epsilon(pmf: _Pmf, interval: float, epsilon: float) -> float:
    """``delta(eps) = P[inf] + sum_{l > eps} p_l (1 - exp(eps - l))``."""
    losses = (pmf.offset + np.arange(pmf.probs.size)) * interval
    above = losses > epsilon
    weights = -np.expm1(epsilon - losses[above])
    return min(pmf.infinity_mass + _dot(pmf.probs[above], weights), 1.0)


def _epsilon_for_delta(pmf: _Pmf, interval: float, delta: float) -> float:
    """Smallest ``eps >= 0`` with ``delta(eps) <= delta`` for the discrete PLD.

    ``delta(l_j)`` at the grid losses decreases in ``j``: bracket the first
    ``j`` where it is ``<= delta`` with tail masses, bisect, then solve the
    exact (exponential) formula on the grid interval below it.
    """
    if pmf.infinity_mass > delta:
        return math.inf
    first, p = _positive_part(pmf)  # only losses > 0 can contribute for eps >= 0
    if p.size == 0:
        return 0.0
    tail = np.cumsum(p[::-1])[::-1]  # tail[j] = sum_{i >= j} p_i
    after = np.append(tail[1:], 0.0)
    # delta(l_j) <= P[inf] + tail[j + 1]: the first j where that is <= delta is an upper end.
    hi = int(np.argmax(pmf.infinity_mass + after <= delta))
    # delta(l_j) >= (1 - e^{-m d}) tail[j + m]: where that is > delta, j is too small.
    m = max(1, round(1.0 / interval))
    lower = -math.expm1(-m * interval) * np.append(tail[m:], np.zeros(min(m, p.size)))
    lo = int(np.count_nonzero(lower > delta)) - 1
    w = -np.expm1(-interval * np.arange(1, p.size - lo))  # w[k-1] = 1 - e^{-k d}

    def delta_at(j: int) -> float:
        return pmf.infinity_mass + _dot(p[j + 1 :], w[: p.size - j - 1])

    if lo < 0 and _delta_for_epsilon(pmf, interval, 0.0) <= delta:
        return 0.0
    while hi - lo > 1:  # invariant: delta(l_lo) > delta >= delta(l_hi); l_{-1} stands for 0
        mid = (lo + hi) // 2
        if delta_at(mid) <= delta:
            hi = mid
        else:
            lo = mid
    # On (l_{hi-1}, l_hi], delta(eps) = P[inf] + tail[hi] - e^{eps - l_{hi-1}} g.
    ref = (first + hi - 1) * interval
    g = _dot(p[hi:], np.exp(-interval * np.arange(1, p.size - hi + 1)))
    numerator = pmf.infinity_mass + float(tail[hi]) - delta
    if g <= 0.0 or numerator <= 0.0:
        return (first + hi) * interval
    eps = ref + math.log(numerator / g)
    return float(min(max(eps, ref, 0.0), (first + hi) * interval))


# ---------------------------------------------------------------------------- accountant
def _check_epsilon(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"epsilon must be a real number, got {value!r} of type {type(value).__name__}; "
            f"pass a Python float."
        )
    x = float(value)
    if not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {value!r}.")
    return x


def _reject_kwargs(method: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(
            f"PLDAccountant.{method}() got unexpected keyword argument(s) {sorted(kwargs)}; "
            f"set the grid with PLDAccountant(value_discretization_interval=...)."
        )


def _group(history: list[HistoryEntry]) -> list[HistoryEntry]:
    """Merge all entries with the same noise and rate (composition is commutative)."""
    counts: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        counts[(sigma, q)] = counts.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in counts.items()]


def _segments(
    history: list[HistoryEntry], interval: float, step_tail: float
) -> tuple[list[tuple[_Pmf, int]], list[tuple[_Pmf, int]]]:
    """Discretised single steps with their counts, per direction (remove, add)."""
    pairs = [_discretise_step(sigma, q, interval, step_tail) for sigma, q, _ in history]
    counts = [n for _, _, n in history]
    return (
        [(pair[0], n) for pair, n in zip(pairs, counts)],
        [(pair[1], n) for pair, n in zip(pairs, counts)],
    )


def _widest_window(history: list[HistoryEntry], interval: float, step_tail: float) -> float:
    """Width, in loss units, of the wider of the two composed windows at ``interval``."""
    widths = []
    for segments in _segments(history, interval, step_tail):
        low, high, _ = _window(segments, _TAIL_BUDGET)
        widths.append((high - low + 1) * interval)
    return max(widths)


def _usable_interval(history: list[HistoryEntry], interval: float, step_tail: float) -> float:
    """The requested interval, or a coarser one if it would need over ``_MAX_BINS`` points.

    One step's span is known in closed form; the composed window is estimated
    on a probe grid of ``_PROBE_BINS`` points per step, which costs little.
    """
    span = 0.0
    for sigma, q, _ in history:
        k_lo, k_hi = _grid_range(sigma, q, interval, step_tail)
        span = max(span, (k_hi - k_lo) * interval)
    probe = span / _PROBE_BINS
    if probe > interval:
        interval = max(interval, 1.1 * _widest_window(history, probe, step_tail) / _MAX_BINS)
    return max(interval, 1.05 * span / _MAX_BINS)


def _composed_plds(history: list[HistoryEntry], interval: float) -> tuple[_Pmf, _Pmf, float]:
    """Remove and add PLDs of a history without noiseless steps, and the interval used.

    The interval grows past the requested one only when one step or the
    composition would need more than ``_MAX_BINS`` grid points.
    """
    history = _group(history)
    steps = sum(n for _, _, n in history)
    step_tail = max(_TAIL_BUDGET / steps, 1e-300)
    interval = _usable_interval(history, interval, step_tail)
    symmetric = all(q == 1.0 for _, q, _ in history)  # then remove and add coincide
    for _ in range(8):
        plds: list[_Pmf] = []
        for segments in _segments(history, interval, step_tail)[: 1 if symmetric else 2]:
            window = _window(segments, _TAIL_BUDGET)
            width = window[1] - window[0] + 1
            if width > _MAX_BINS:
                break
            plds.append(_compose(segments, window))
        else:
            return plds[0], plds[-1], interval
        interval *= 1.05 * width / _MAX_BINS
    raise RuntimeError(  # pragma: no cover - the probe makes one round the rule
        "PLDAccountant could not fit the composed PLD in memory; use another accountant."
    )


def auto_interval(history: list[HistoryEntry]) -> float:
    """The default grid step: ``1e-4`` (dp-accounting's), or finer for tiny per-step losses.

    The pessimistic discretisation adds up to one interval of loss per step, so it
    is only tight when the interval is small next to the spread of one step's
    privacy loss, about ``q * sqrt(exp(1 / sigma**2) - 1)``. The default is
    ``min(1e-4, spread / 20)`` over the history's entries.
    """
    spreads = [q * math.sqrt(math.expm1(sigma**-2)) for sigma, q, _ in history if sigma > 0]
    finest = min(spreads, default=math.inf)
    return min(_DEFAULT_INTERVAL, finest / 20.0) if math.isfinite(finest) else _DEFAULT_INTERVAL


class PLDAccountant(Accountant):
    """Privacy-loss-distribution accountant (tight, pessimistic), as in dp-accounting.

    Accounts for the Poisson-subsampled Gaussian mechanism under add/remove-one
    neighbours. Both neighbouring directions are composed and the worse one is
    reported. The reported epsilon is an upper bound (see the module docstring
    for the argument and its floating-point caveats).

    The composed PLD is cached inside the accountant and reused for queries
    at other deltas or epsilons until the history changes.

    Args:
        value_discretization_interval: Grid step of the privacy losses, a
            finite number ``> 0``, or ``None`` (default) for :func:`auto_interval`:
            ``1e-4`` (dp-accounting's default) unless one step's loss is so small
            that a finer grid is needed to stay tight. Smaller is tighter and
            slower (time and memory grow like ``1 / interval``).

    Raises:
        ValueError: If the interval is not finite and positive.
        TypeError: If it is not a real number.
    """

    name = "pld"

    def __init__(self, value_discretization_interval: float | None = None) -> None:
        self._interval = (
            None
            if value_discretization_interval is None
            else check_positive(value_discretization_interval, "value_discretization_interval")
        )
        super().__init__()
        self._cache: tuple[_Pmf, _Pmf, float] | None = None

    @property
    def value_discretization_interval(self) -> float | None:
        """The requested grid step (``None``: chosen per history; read-only)."""
        return self._interval

    def _requested_interval(self) -> float:
        if self._interval is not None:
            return self._interval
        return auto_interval(self._history)

    # ------------------------------------------------------------------ cache hooks
    def _on_record(self, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        self._cache = None

    def _on_reset(self) -> None:
        self._cache = None

    def _plds(self) -> tuple[_Pmf, _Pmf, float]:
        if self._cache is None:
            self._cache = _composed_plds(self._history, self._requested_interval())
        return self._cache

    def _is_non_private(self) -> bool:
        return any(sigma == 0.0 for sigma, _, _ in self._history)

    # ------------------------------------------------------------------ queries
    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """Return an upper bound on epsilon at ``delta`` for the recorded history.

        Args:
            delta: Target delta, ``0 < delta < 1``.
            **kwargs: Not accepted; present for the base-class signature.

        Returns:
            ``max(eps_remove, eps_add) >= 0``; ``0.0`` for an empty history and
            ``math.inf`` if a step had no noise or delta is below the mass at
            infinite loss (truncation and rounding allowance, about
            ``1e-16 + steps * 1.5e-15``).

        Raises:
            ValueError: If ``delta`` is not in ``(0, 1)``.
            TypeError: On a non-numeric ``delta`` or an unknown keyword.
        """
        _reject_kwargs("get_epsilon", kwargs)
        delta = check_delta(delta)
        if not self._history:
            return 0.0
        if self._is_non_private():
            return math.inf
        remove, add, interval = self._plds()
        plds = (remove,) if add is remove else (remove, add)
        return max(_epsilon_for_delta(pld, interval, delta) for pld in plds)

    def get_delta(self, epsilon: float) -> float:
        """Return an upper bound on delta at ``epsilon`` for the recorded history.

        Args:
            epsilon: Target epsilon, a finite number ``>= 0``.

        Returns:
            ``max(delta_remove, delta_add)`` in ``[0, 1]``; ``0.0`` for an empty
            history and ``1.0`` if a step had no noise.

        Raises:
            ValueError: If ``epsilon`` is negative or not finite.
            TypeError: If ``epsilon`` is not a real number.
        """
        epsilon = _check_epsilon(epsilon)
        if not self._history:
            return 0.0
        if self._is_non_private():
            return 1.0
        remove, add, interval = self._plds()
        plds = (remove,) if add is remove else (remove, add)
        return max(_delta_for_epsilon(pld, interval, epsilon) for pld in plds)

    def __repr__(self) -> str:
        return (
            f"PLDAccountant(value_discretization_interval={self.value_discretization_interval!r}, "
            f"steps={len(self)}, entries={len(self._history)})"
        )


register_accountant("pld", PLDAccountant)
