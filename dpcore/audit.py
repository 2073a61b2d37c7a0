"""Empirical privacy auditing: from canary scores to lower bounds on epsilon; a sampler test.

An audit trains with some canaries ("in") and without others ("out"), scores every
canary with an attack (a higher score means "more likely in"), and asks how well a
threshold on the score separates the two groups. Differential privacy limits that
separation, so a separation that is too good, after accounting for sampling error,
refutes the claimed epsilon. This module holds the statistics only; the backends
provide canaries that go through their real code paths (docs/design.md, Auditing).

Public API:

- :func:`clopper_pearson_bound`: exact binomial (Clopper-Pearson) confidence bounds
  on the true and false positive rates of threshold tests, turned into
  ``eps >= ln((TPR - delta) / FPR)`` and its mirror ``ln((TNR - delta) / FNR)``.
- :func:`gdp_bound`: the same confidence bounds turned into a lower bound on the
  Gaussian-DP parameter ``mu``, ``Phi^-1(1 - FPR) - Phi^-1(FNR)``, then into epsilon
  at ``delta`` by the exact mu-GDP conversion.
- :func:`one_run_bound` (with :func:`one_run_p_value` and :func:`count_guesses`):
  the one-training-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023).
- :func:`epsilon_at_deltas`: the epsilon of a mu-GDP mechanism at several deltas,
  to compare an audited ``mu`` with an accountant's curve.
- :func:`sampler_test`: checks that a batch plan behaves like Poisson sampling
  (participation counts ``~ Binomial(T, q)``, batch sizes ``~ Binomial(N, q)``).

Simultaneous confidence. The bounds take the best of many threshold tests, so the
significance is split (Bonferroni) over every one-sided Clopper-Pearson statement the
reported maximum relies on: an upper bound on the false positive rate and a lower
bound on the true positive rate per threshold (the mirrored rates are their
complements, ``TNR = 1 - FPR`` and ``FNR = 1 - TPR``, and add no statements). With
``thresholds=None`` the statements are indexed by the possible *counts* instead
(``n_in + 1`` plus ``n_out + 1`` of them): the Clopper-Pearson bound for ``k`` of
``n`` is exactly the confidence bound of the order statistic that ends the run of
thresholds giving count ``k``, so one statement per count covers every threshold at
once, and the bound stays valid however the candidate thresholds were chosen, even
from the scores themselves. With explicit ``thresholds`` fixed before looking at the
scores, the split is over ``2 * len(thresholds)`` statements when that is smaller.

Guarantee:
    If the mechanism satisfies the (epsilon, delta)-DP claim being audited (for
    :func:`gdp_bound`: a mu-GDP claim), the returned epsilon lower bound exceeds the
    claimed epsilon with probability at most ``significance``; that is, the lower
    bound holds with probability at least ``1 - significance`` over the randomness
    of training and canary inclusion. A bound above an accountant's epsilon is
    statistical evidence of a bug (or a broken assumption); a bound below it is
    evidence, never proof, that the implementation is private, since a weak attack
    gives a low bound for any mechanism.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from dpcore.accounting.gdp import eps_from_mu
from dpcore.checks import check_delta, check_int, check_sample_rate

__all__ = [
    "AuditBound",
    "OneRunBound",
    "SamplerTestResult",
    "clopper_pearson_bound",
    "count_guesses",
    "epsilon_at_deltas",
    "gdp_bound",
    "log_likelihood_ratio_scores",
    "one_run_bound",
    "one_run_p_value",
    "sampler_test",
]

_DEFAULT_NUM_CANDIDATES = 512


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class AuditBound:
    """A lower bound on epsilon from in/out canary scores.

    Attributes:
        epsilon: The lower bound on epsilon at ``delta`` (``>= 0``).
        threshold: The score threshold of the best test (``score >= threshold``
            guesses "in"); ``None`` when no test gave a positive bound.
        tpr_lb: Lower confidence bound on the true positive rate of the best test
            (for the mirrored direction, on the true negative rate; for the GDP
            method, ``1 - FNR_ub``).
        fpr_ub: Upper confidence bound on the false positive rate of the best test
            (for the mirrored direction, on the false negative rate).
        significance: Probability that the bound is wrong for a mechanism that
            satisfies the audited claim.
        delta: The delta the bound refers to.
        method: ``"clopper_pearson"`` or ``"gdp"``.
        direction: ``"tpr/fpr"`` or ``"tnr/fnr"`` (which DP inequality gave the
            bound); ``"gdp"`` for the Gaussian-DP method, whose bound is symmetric.
        mu: For ``method="gdp"``, the lower bound on the GDP parameter; else ``None``.
        num_statements: Number of one-sided confidence statements the significance
            was split over (the Bonferroni denominator).
    """

    epsilon: float
    threshold: float | None
    tpr_lb: float
    fpr_ub: float
    significance: float
    delta: float
    method: str
    direction: str
    mu: float | None
    num_statements: int


@dataclasses.dataclass(frozen=True)
class OneRunBound:
    """A lower bound on epsilon from one training run (Steinke, Nasr, Jagielski 2023).

    Attributes:
        epsilon: The largest epsilon whose (epsilon, delta)-DP claim is rejected at
            ``significance`` (``0`` when none is).
        num_canaries: ``m``, canaries each included independently with probability 1/2.
        num_guesses: ``r``, guesses made (abstentions excluded).
        num_correct: ``v``, correct guesses.
        significance: Probability of a bound above the true epsilon.
        delta: The delta of the audited claim.
    """

    epsilon: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    significance: float
    delta: float


@dataclasses.dataclass(frozen=True)
class SamplerTestResult:
    """Outcome of :func:`sampler_test`.

    Attributes:
        passed: ``True`` when no test rejects Poisson sampling.
        batch_size_p_value: Exact two-sided binomial p-value of the total number of
            inclusions, ``~ Binomial(N * T, q)``.
        dispersion_p_value: Two-sided chi-square p-value of the spread of the batch
            sizes around ``N q`` (a fixed batch size has none).
        participation_p_value: Chi-square goodness-of-fit p-value of the histogram
            of per-example participation counts against ``Binomial(T, q)``.
        duplicates: Number of batches that list an example more than once.
        significance: Overall level; each of the three tests runs at a third of it.
        reason: Why the plan failed (empty when it passed).
    """

    passed: bool
    batch_size_p_value: float
    dispersion_p_value: float
    participation_p_value: float
    duplicates: int
    significance: float
    reason: str


# --------------------------------------------------------------------------- checks


def _check_significance(value: Any, name: str = "significance") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}; pass e.g. 0.05.")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(
            f"{name} must satisfy 0 < {name} < 1, got {value!r}; it is the probability "
            f"that the bound is wrong, e.g. 0.05."
        )
    return float(value)


def _check_scores(scores: Any, name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of scores, got shape {array.shape}; "
            f"pass one score per canary."
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} must be finite, got {float(array[bad[0]])!r} at index {int(bad[0])} "
            f"({bad.size} non-finite in all); drop or fix those canaries' scores."
        )
    return array


def _check_thresholds(thresholds: Any) -> np.ndarray | None:
    if thresholds is None:
        return None
    return np.unique(_check_scores(thresholds, "thresholds"))


# --------------------------------------------------------------------------- counting


def _candidates(in_scores: np.ndarray, out_scores: np.ndarray) -> np.ndarray:
    """Pooled order statistics at ranks spaced evenly and, in both tails, geometrically."""
    pooled = np.sort(np.concatenate([in_scores, out_scores]))
    n = pooled.size
    half = _DEFAULT_NUM_CANDIDATES // 2
    tail = np.geomspace(1, max(1, n // 2), half).astype(np.int64) - 1
    even = np.linspace(0, n - 1, half).astype(np.int64)
    ranks = np.unique(np.concatenate([tail, n - 1 - tail, even]))
    return np.unique(pooled[ranks])


def _at_or_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


def _cp_upper(k: np.ndarray, n: int, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on p after k successes in n trials."""
    safe = np.minimum(k, n - 1)
    return np.where(k >= n, 1.0, stats.beta.ppf(1.0 - level, safe + 1, n - safe))


def _cp_lower(k: np.ndarray, n: int, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on p after k successes in n trials."""
    safe = np.maximum(k, 1)
    return np.where(k <= 0, 0.0, stats.beta.ppf(level, safe, n - safe + 1))


def _num_statements(n_in: int, n_out: int, thresholds: np.ndarray | None) -> int:
    by_counts = n_in + 1 + n_out + 1
    if thresholds is None:
        return by_counts
    return min(by_counts, 2 * thresholds.size)


@dataclasses.dataclass(frozen=True)
class _Rates:
    """Confidence bounds at each threshold; the mirrored rates are their complements
    (``TNR_lb = 1 - FPR_ub``, ``FNR_ub = 1 - TPR_lb``), so they add no statements."""

    tpr_lb: np.ndarray
    fpr_ub: np.ndarray

    @property
    def tnr_lb(self) -> np.ndarray:
        return 1.0 - self.fpr_ub

    @property
    def fnr_ub(self) -> np.ndarray:
        return 1.0 - self.tpr_lb


def _rates(
    in_scores: np.ndarray, out_scores: np.ndarray, thresholds: np.ndarray, level: float
) -> _Rates:
    tp = _at_or_above(np.sort(in_scores), thresholds)
    fp = _at_or_above(np.sort(out_scores), thresholds)
    return _Rates(
        tpr_lb=_cp_lower(tp, in_scores.size, level),
        fpr_ub=_cp_upper(fp, out_scores.size, level),
    )


def _prepare(
    in_scores: Any, out_scores: Any, delta: Any, significance: Any, thresholds: Any
) -> tuple[float, float, np.ndarray, int, _Rates]:
    """Validates the inputs; returns delta, significance, thresholds, count and rates."""
    ins = _check_scores(in_scores, "in_scores")
    outs = _check_scores(out_scores, "out_scores")
    delta, significance = check_delta(delta), _check_significance(significance)
    fixed = _check_thresholds(thresholds)
    candidates = _candidates(ins, outs) if fixed is None else fixed
    count = _num_statements(ins.size, outs.size, fixed)
    rates = _rates(ins, outs, candidates, significance / count)
    return delta, significance, candidates, count, rates


# --------------------------------------------------------------------------- bounds


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log(numerator) - np.log(denominator)
    return np.where(numerator > 0, values, -np.inf)


def clopper_pearson_bound(
    in_scores: Sequence[float] | np.ndarray,
    out_scores: Sequence[float] | np.ndarray,
    *,
    delta: float,
    significance: float = 0.05,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> AuditBound:
    """Lower bound on epsilon from exact binomial confidence bounds on threshold tests.

    For each threshold ``t`` the test "``score >= t`` means in" has true positive
    rate ``TPR`` and false positive rate ``FPR``. (epsilon, delta)-DP implies both
    ``TPR <= e^eps FPR + delta`` and ``TNR <= e^eps FNR + delta``, so
    ``eps >= ln((TPR_lb - delta) / FPR_ub)`` and ``eps >= ln((TNR_lb - delta) / FNR_ub)``
    with one-sided Clopper-Pearson bounds (``scipy.stats.beta.ppf``), each at level
    ``significance / num_statements`` (Bonferroni; see the module docstring).

    Args:
        in_scores: Attack scores of canaries trained with (higher means "in").
        out_scores: Attack scores of canaries trained without.
        delta: The delta of the audited claim, ``0 < delta < 1``.
        significance: Probability that the bound is wrong, ``0 < significance < 1``.
        thresholds: Candidate thresholds fixed before seeing the scores; ``None``
            (default) tries up to 768 of the pooled scores (evenly spaced ranks and
            geometrically spaced ranks in both tails), with the
            significance split over all possible counts, which is valid for any
            choice of thresholds.

    Returns:
        The best bound over thresholds and both directions, clamped at 0.

    Raises:
        TypeError: If ``delta`` or ``significance`` is not a real number.
        ValueError: If scores are empty or non-finite, or ``delta``/``significance``
            is outside ``(0, 1)``.
    """
    delta, significance, candidates, count, rates = _prepare(
        in_scores, out_scores, delta, significance, thresholds
    )
    values = np.stack([
        _log_ratio(rates.tpr_lb - delta, rates.fpr_ub),
        _log_ratio(rates.tnr_lb - delta, rates.fnr_ub),
    ])
    side, best = np.unravel_index(int(np.argmax(values)), values.shape)
    epsilon = max(0.0, float(values[side, best]))
    tpr = float((rates.tpr_lb, rates.tnr_lb)[side][best])
    fpr = float((rates.fpr_ub, rates.fnr_ub)[side][best])
    return AuditBound(
        epsilon=epsilon,
        threshold=float(candidates[best]) if epsilon > 0 else None,
        tpr_lb=tpr, fpr_ub=fpr, significance=significance, delta=delta,
        method="clopper_pearson", direction=("tpr/fpr", "tnr/fnr")[side],
        mu=None, num_statements=count,
    )


def gdp_bound(
    in_scores: Sequence[float] | np.ndarray, out_scores: Sequence[float] | np.ndarray,
    *, delta: float, significance: float = 0.05,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> AuditBound:
    """Lower bound on the Gaussian-DP ``mu``, converted to epsilon at ``delta``.

    A mu-GDP mechanism's threshold tests satisfy ``FNR >= Phi(Phi^-1(1 - FPR) - mu)``,
    so ``mu >= Phi^-1(1 - FPR_ub) - Phi^-1(FNR_ub)`` with one-sided Clopper-Pearson
    upper bounds (the trade-off curve of GDP is symmetric, so the mirrored test
    gives the same formula). The best ``mu`` over thresholds, clamped at 0, becomes
    epsilon through ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.

    This bound refutes mu-GDP claims (hence the DP-SGD analyses that are GDP-shaped);
    for a mechanism whose trade-off curve is not Gaussian, the converted epsilon is
    an estimate, not a certified lower bound on its (epsilon, delta) curve.

    Args:
        in_scores: Attack scores of canaries trained with (higher means "in").
        out_scores: Attack scores of canaries trained without.
        delta: The delta at which to report epsilon, ``0 < delta < 1``.
        significance: Probability that ``mu`` is over-estimated, ``0 < significance < 1``.
        thresholds: As in :func:`clopper_pearson_bound`.

    Returns:
        The bound; ``mu`` holds the lower bound on the GDP parameter.

    Raises:
        TypeError, ValueError: As in :func:`clopper_pearson_bound`.
    """
    delta, significance, candidates, count, rates = _prepare(
        in_scores, out_scores, delta, significance, thresholds
    )
    mus = special.ndtri(1.0 - rates.fpr_ub) - special.ndtri(rates.fnr_ub)
    best = int(np.argmax(mus))
    mu = max(0.0, float(mus[best]))
    return AuditBound(
        epsilon=eps_from_mu(mu, delta),
        threshold=float(candidates[best]) if mu > 0 else None,
        tpr_lb=1.0 - float(rates.fnr_ub[best]),
        fpr_ub=float(rates.fpr_ub[best]), significance=significance, delta=delta,
        method="gdp", direction="gdp", mu=mu, num_statements=count,
    )


def epsilon_at_deltas(mu: float, deltas: Sequence[float]) -> tuple[float, ...]:
    """The epsilons of a mu-GDP mechanism at several deltas (exact conversion).

    Use it to lay an audited ``mu`` (:attr:`AuditBound.mu`) beside an accountant's
    ``get_epsilon(delta)`` at the same deltas.

    Args:
        mu: The GDP parameter, a finite number ``>= 0``.
        deltas: Non-empty sequence of deltas, each ``0 < delta < 1``.

    Returns:
        One epsilon per delta, in order.

    Raises:
        ValueError: If ``mu`` is negative or not finite, ``deltas`` is empty, or a
            delta is outside ``(0, 1)``.
    """
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not (
        math.isfinite(mu) and mu >= 0
    ):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}; e.g. AuditBound.mu.")
    checked = [check_delta(d, f"deltas[{i}]") for i, d in enumerate(deltas)]
    if not checked:
        raise ValueError("deltas must be non-empty, got []; pass e.g. [1e-5, 1e-6].")
    return tuple(eps_from_mu(float(mu), d) for d in checked)


# --------------------------------------------------------------------------- one run


def _check_counts(num_canaries: Any, num_guesses: Any, num_correct: Any) -> tuple[int, int, int]:
    m = check_int(num_canaries, "num_canaries", 1)
    r = check_int(num_guesses, "num_guesses", 0)
    v = check_int(num_correct, "num_correct", 0)
    if not v <= r <= m:
        raise ValueError(
            f"need num_correct <= num_guesses <= num_canaries, got v={v}, r={r}, m={m}; "
            f"count only the canaries guessed on (abstentions excluded)."
        )
    return m, r, v


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    if v == 0:
        return 1.0
    p = special.expit(eps)
    tail = float(stats.binom.sf(v - 1, r, p))
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, r, p) - tail
    return min(1.0, tail + 2.0 * m * delta * float(np.max(window / i)))


def one_run_p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """P-value of ``v`` correct guesses under an (epsilon, delta)-DP null hypothesis.

    Implements the (epsilon, delta) statement of the main theorem of Steinke, Nasr
    and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
    arXiv:2305.08846): ``m`` canaries are each included independently with
    probability 1/2, the auditor guesses on ``r`` of them (fixed in advance) and
    abstains on the rest, and ``W`` counts the correct guesses. If the mechanism is
    (epsilon, delta)-DP, then for every ``v``::

        P[W >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,
        f(k) = P[Binomial(r, e^eps / (1 + e^eps)) >= k].

    Args:
        num_canaries: ``m >= 1``.
        num_guesses: ``r``, with ``num_correct <= r <= m``.
        num_correct: ``v >= 0``.
        epsilon: Epsilon of the null hypothesis, a finite number ``>= 0``.
        delta: Delta of the null hypothesis, ``0 < delta < 1``.

    Returns:
        The right-hand side above, capped at 1.

    Raises:
        ValueError: On counts out of order or an invalid epsilon or delta.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (
        math.isfinite(epsilon) and epsilon >= 0
    ):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}.")
    return _p_value(m, r, v, float(epsilon), check_delta(delta))


def one_run_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    *,
    delta: float,
    significance: float = 0.05,
) -> OneRunBound:
    """The largest epsilon that the one-run audit rejects at ``significance``.

    Finds, by doubling from ``eps = 1`` and Brent's method, the first ``eps`` where
    ``one_run_p_value(m, r, v, eps, delta)`` reaches ``significance``, stepped down by
    the root tolerance so that its p-value is at most ``significance``. Rejecting
    (eps, delta)-DP also rejects every smaller eps (an eps'-DP mechanism with
    ``eps' < eps`` is eps-DP), so the result is a lower bound. The numbers of guesses
    must be chosen before seeing the scores; choosing the best of several ``r``
    needs the significance split over them.

    Args:
        num_canaries: ``m``, canaries each included independently with probability 1/2.
        num_guesses: ``r``, guesses made (see :func:`count_guesses`).
        num_correct: ``v``, correct guesses.
        delta: Delta of the audited claim, ``0 < delta < 1``.
        significance: ``0 < significance < 1``.

    Returns:
        The bound (``epsilon = 0`` when even ``eps = 0`` is not rejected).

    Raises:
        ValueError: On counts out of order or an invalid delta or significance.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    delta, significance = check_delta(delta), _check_significance(significance)

    def gap(eps: float) -> float:
        return significance - _p_value(m, r, v, eps, delta)

    epsilon = 0.0
    if gap(0.0) > 0:
        high = 1.0
        while gap(high) > 0 and high < 1024.0:
            high *= 2.0
        if gap(high) > 0:
            epsilon = high
        else:
            root = float(optimize.brentq(gap, 0.0, high, xtol=1e-10))
            epsilon = max(0.0, root - 1e-9)
    return OneRunBound(epsilon, m, r, v, significance, delta)


def count_guesses(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    num_positive: int,
    num_negative: int,
) -> tuple[int, int]:
    """Guess "in" for the top ``num_positive`` scores and "out" for the bottom ``num_negative``.

    Args:
        scores: One attack score per canary (higher means "in").
        included: Whether each canary was in the training run (same length).
        num_positive: Number of "in" guesses, fixed in advance.
        num_negative: Number of "out" guesses, fixed in advance.

    Returns:
        ``(num_guesses, num_correct)`` for :func:`one_run_bound`.

    Raises:
        ValueError: On mismatched lengths, bad scores, or more guesses than canaries.
    """
    values = _check_scores(scores, "scores")
    member = np.asarray(included)
    if member.shape != values.shape or member.dtype != np.bool_:
        raise ValueError(
            f"included must be booleans of the same shape as scores {values.shape}, got "
            f"shape {member.shape} and dtype {member.dtype}; pass one flag per canary."
        )
    k_pos = check_int(num_positive, "num_positive", 0)
    k_neg = check_int(num_negative, "num_negative", 0)
    if k_pos + k_neg > values.size:
        raise ValueError(
            f"num_positive + num_negative must be <= the number of canaries {values.size}, "
            f"got {k_pos} + {k_neg}; guess on fewer canaries."
        )
    order = np.argsort(values, kind="stable")
    correct = int(member[order[values.size - k_pos :]].sum()) if k_pos else 0
    correct += int((~member[order[:k_neg]]).sum())
    return k_pos + k_neg, correct


# --------------------------------------------------------------------------- sampler test


def _check_batches(batches: Any, num_samples: int, steps: int) -> list[np.ndarray]:
    plan = [np.asarray(b, dtype=np.int64).reshape(-1) for b in batches]
    if len(plan) != steps:
        raise ValueError(
            f"batches must hold steps={steps} batches, got {len(plan)}; pass the whole "
            f"plan that was drawn for those steps."
        )
    for t, batch in enumerate(plan):
        if batch.size and (batch.min() < 0 or batch.max() >= num_samples):
            raise ValueError(
                f"batches[{t}] has an index outside [0, {num_samples}), got min "
                f"{int(batch.min())}, max {int(batch.max())}; pass dataset indices."
            )
    return plan


def _binomial_histogram_p_value(counts: np.ndarray, trials: int, q: float) -> float:
    expected = counts.size * stats.binom.pmf(np.arange(trials + 1), trials, q)
    observed = np.bincount(np.minimum(counts, trials), minlength=trials + 1).astype(np.float64)
    edges, total = [0], 0.0
    for k, e in enumerate(expected):
        total += e
        if total >= 5.0 and k < trials:
            edges.append(k + 1)
            total = 0.0
    if total < 5.0 and len(edges) > 1:
        edges.pop()
    if len(edges) < 2:
        return 1.0
    obs = np.add.reduceat(observed, edges)
    exp = np.add.reduceat(expected, edges)
    statistic = float(np.sum((obs - exp) ** 2 / exp))
    return float(stats.chi2.sf(statistic, len(edges) - 1))


def _dispersion_p_value(sizes: np.ndarray, num_samples: int, q: float) -> float:
    if q >= 1.0:
        return 1.0 if np.all(sizes == num_samples) else 0.0
    variance = num_samples * q * (1.0 - q)
    statistic = float(np.sum((sizes - num_samples * q) ** 2) / variance)
    upper = float(stats.chi2.sf(statistic, sizes.size))
    return min(1.0, 2.0 * min(upper, 1.0 - upper))


def sampler_test(
    batches: Sequence[Sequence[int]] | Sequence[np.ndarray],
    num_samples: int,
    sample_rate: float,
    steps: int,
    *,
    significance: float = 0.01,
) -> SamplerTestResult:
    """Test whether a batch plan looks like Poisson sampling with rate ``q``.

    Three tests, each at ``significance / 3`` (Bonferroni): the total number of
    inclusions against ``Binomial(N T, q)`` (exact two-sided binomial test), the
    spread of the batch sizes, ``sum_t (b_t - N q)^2 / (N q (1 - q))`` against
    ``chi2(T)`` (two-sided: fixed-size batches have too little spread), and the
    histogram of per-example participation counts against ``Binomial(T, q)``
    (chi-square goodness of fit, bins pooled to expected counts >= 5). A batch that
    lists an example twice fails outright.

    Guarantee:
        A real Poisson sampler fails with probability at most ``significance``
        (up to the chi-square approximations). Passing is evidence, not proof:
        a plan can match these marginals and still be dependent across steps.

    Args:
        batches: The ``steps`` batches, each a sequence of dataset indices.
        num_samples: Data set size ``N >= 1``.
        sample_rate: The claimed inclusion probability ``q``, ``0 < q <= 1``.
        steps: Number of steps ``T`` the plan covers (``len(batches)``).
        significance: Overall false-alarm level, ``0 < significance < 1``.

    Returns:
        The p-values and the verdict.

    Raises:
        ValueError: On invalid arguments, a wrong number of batches, or an index
            outside ``[0, num_samples)``.
    """
    n = check_int(num_samples, "num_samples", 1)
    q = check_sample_rate(sample_rate)
    t = check_int(steps, "steps", 1)
    significance = _check_significance(significance)
    plan = _check_batches(batches, n, t)
    duplicates = sum(int(np.unique(b).size != b.size) for b in plan)
    sizes = np.array([b.size for b in plan], dtype=np.int64)
    counts = np.bincount(np.concatenate([np.zeros(0, np.int64), *plan]), minlength=n)
    total_p = float(stats.binomtest(int(sizes.sum()), n * t, q).pvalue) if q < 1 else 1.0
    dispersion_p = _dispersion_p_value(sizes, n, q)
    participation_p = _binomial_histogram_p_value(counts, t, q)
    level = significance / 3.0
    reasons = [
        name
        for name, p in (
            ("total inclusions", total_p),
            ("batch-size spread", dispersion_p),
            ("participation counts", participation_p),
        )
        if p < level
    ]
    if duplicates:
        reasons.insert(0, f"{duplicates} batches repeat an example")
    reason = "" if not reasons else "not Poisson: " + ", ".join(reasons)
    return SamplerTestResult(
        passed=not reasons, batch_size_p_value=total_p, dispersion_p_value=dispersion_p,
        participation_p_value=participation_p, duplicates=duplicates, significance=significance,
        reason=reason,
    )


def log_likelihood_ratio_scores(released: np.ndarray, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Each canary's log-likelihood ratio "in the data" against "not in it" over a run.

    ``released[t, i]`` is canary ``i``'s coordinate released at step ``t`` in units of the
    clipping bound: ``N(0, sigma^2)`` when the canary is absent, and a mixture of that and
    ``N(1, sigma^2)`` (weight ``q``) when it is present. The score is
    ``sum_t log(1 - q + q exp((2x - 1) / (2 sigma^2)))``.

    Args:
        released: ``[steps, canaries]`` released coordinates in units of ``C``.
        sample_rate: The Poisson rate ``q`` in ``(0, 1]``.
        noise_multiplier: ``sigma > 0``.

    Returns:
        ``[canaries]`` scores (larger means more likely present).
    """
    exponent = (2.0 * np.asarray(released, dtype=np.float64) - 1.0) / (2.0 * noise_multiplier**2)
    if sample_rate >= 1.0:
        return exponent.sum(axis=0)
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + exponent).sum(axis=0)
