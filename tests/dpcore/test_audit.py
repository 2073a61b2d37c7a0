"""dpcore.audit against closed forms: mu-GDP score distributions, exact binomial bounds,
the one-run theorem's tail, and Poisson vs shuffled / fixed batch plans."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import special, stats

from dpcore import audit
from dpcore.accounting.gdp import eps_from_mu
from dpcore.sampling import PoissonSampler, ShuffledBatchSampler, poisson_batches

N_SIDE = 100_000


def _gaussian_scores(mu: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a mu-GDP mechanism's optimal attack: in ~ N(mu, 1), out ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    return rng.normal(mu, 1.0, n), rng.normal(0.0, 1.0, n)


def _one_run_simulation(mu: float, m: int, seed: int, frac: float = 0.1) -> tuple[int, int]:
    """m canaries, each in w.p. 1/2; score N(mu, 1) if in else N(0, 1); guess the tails."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = rng.normal(mu * included, 1.0)
    k = max(1, int(frac * m))
    return audit.count_guesses(scores, included, num_positive=k, num_negative=k)


# --------------------------------------------------------------------------- closed forms


def test_clopper_pearson_matches_hand_computed_bound() -> None:
    # 10 in at 1, 10 out at 0, one threshold: 2 statements (TPR lower, FPR upper) at
    # 0.05 / 2 each. CP lower for 10/10 is level**(1/10); CP upper for 0/10 is
    # 1 - level**(1/10).
    bound = audit.clopper_pearson_bound([1.0] * 10, [0.0] * 10, delta=1e-5, thresholds=[0.5])
    root = (0.05 / 2) ** 0.1
    assert bound.num_statements == 2
    assert bound.tpr_lb == pytest.approx(root, rel=1e-12)
    assert bound.fpr_ub == pytest.approx(1.0 - root, rel=1e-12)
    assert bound.epsilon == pytest.approx(math.log((root - 1e-5) / (1.0 - root)), rel=1e-12)
    assert bound.threshold == 0.5 and bound.method == "clopper_pearson"


def test_gdp_matches_hand_computed_bound() -> None:
    # GDP uses the FPR and FNR upper bounds: the same 2 statements at 0.05 / 2 each.
    bound = audit.gdp_bound([1.0] * 10, [0.0] * 10, delta=1e-5, thresholds=[0.5])
    mu = 2.0 * special.ndtri((0.05 / 2) ** 0.1)
    assert bound.num_statements == 2
    assert bound.mu == pytest.approx(mu, rel=1e-12)
    assert bound.epsilon == pytest.approx(eps_from_mu(mu, 1e-5), rel=1e-12)


def test_count_indexed_statements_are_exact() -> None:
    # The claim behind thresholds=None: over all thresholds t with k of n uniforms at or
    # above t, sup P[U >= t] exceeds the Clopper-Pearson upper bound for k with
    # probability exactly the level (and inf for the lower bound likewise).
    n, k, level, runs = 20, 3, 0.1, 40_000
    rng = np.random.default_rng(4)
    ordered = -np.sort(-rng.random((runs, n)), axis=1)  # descending
    sup_rate = 1.0 - ordered[:, k]  # t just above the (k+1)-th largest
    inf_rate = 1.0 - ordered[:, k - 1]  # t at the k-th largest
    upper = audit._cp_upper(np.array(k), n, level)
    lower = audit._cp_lower(np.array(k), n, level)
    assert np.mean(sup_rate > upper) == pytest.approx(level, abs=0.006)
    assert np.mean(inf_rate < lower) == pytest.approx(level, abs=0.006)


def test_bonferroni_split_over_counts_by_default() -> None:
    ins, outs = _gaussian_scores(1.0, 300, seed=0)
    outs = outs[:200]
    assert audit.clopper_pearson_bound(ins, outs, delta=1e-5).num_statements == 502
    assert audit.gdp_bound(ins, outs, delta=1e-5).num_statements == 502
    many = np.linspace(-3, 3, 1000)  # more fixed thresholds than counts: counts win
    assert audit.gdp_bound(ins, outs, delta=1e-5, thresholds=many).num_statements == 502


def _bound_and_true_eps(bound_fn, mu: float, delta: float) -> tuple[audit.AuditBound, float]:
    """Bounds ``N_SIDE`` Gaussian scores per side (seed 1) and returns the true epsilon."""
    ins, outs = _gaussian_scores(mu, N_SIDE, seed=1)
    return bound_fn(ins, outs, delta=delta), eps_from_mu(mu, delta)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gdp_bound_below_and_within_20_percent_of_true_epsilon(mu: float) -> None:
    # Measured (seed 1): ratio 0.91 (mu 0.5), 0.95 (mu 1), 0.97 (mu 2) at 1e5 per side.
    bound, true_eps = _bound_and_true_eps(audit.gdp_bound, mu, delta=1e-5)
    assert bound.mu <= mu
    assert 0.8 * true_eps <= bound.epsilon <= true_eps


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_clopper_pearson_below_and_within_factor_two_of_true_epsilon(mu: float) -> None:
    # Clopper-Pearson pays for estimating tiny FPRs: measured ratio 0.77 / 0.75 / 0.64
    # at delta 1e-3 and 1e5 per side (0.58 / 0.55 / 0.49 at delta 1e-5).
    bound, true_eps = _bound_and_true_eps(audit.clopper_pearson_bound, mu, delta=1e-3)
    assert 0.5 * true_eps <= bound.epsilon <= true_eps


@pytest.mark.slow
@pytest.mark.parametrize("mu", [0.5, 1.0])
def test_bounds_tighten_with_a_million_samples(mu: float) -> None:
    # Measured: GDP 0.97 / 0.98, Clopper-Pearson 0.88 / 0.86 of the true epsilon.
    delta = 1e-3
    ins, outs = _gaussian_scores(mu, 1_000_000, seed=1)
    true_eps = eps_from_mu(mu, delta)
    assert 0.95 * true_eps <= audit.gdp_bound(ins, outs, delta=delta).epsilon <= true_eps
    cp = audit.clopper_pearson_bound(ins, outs, delta=delta).epsilon
    assert 0.8 * true_eps <= cp <= true_eps


@pytest.mark.parametrize("mu", [0.0, -1.0])
def test_no_leak_gives_zero(mu: float) -> None:
    ins, outs = _gaussian_scores(mu, 20_000, seed=2)
    for bound in (
        audit.clopper_pearson_bound(ins, outs, delta=1e-5),
        audit.gdp_bound(ins, outs, delta=1e-5),
    ):
        assert bound.epsilon == 0.0
        assert bound.threshold is None
    assert audit.gdp_bound(ins, outs, delta=1e-5).mu == 0.0


def test_mirrored_direction_catches_a_low_tail() -> None:
    # 10% of the out canaries sit far below everything: only "score < t means out",
    # i.e. TNR <= e^eps FNR + delta, can see it.
    rng = np.random.default_rng(3)
    ins = rng.normal(0.0, 1.0, 5000)
    outs = np.concatenate([rng.normal(0.0, 1.0, 4500), np.full(500, -10.0)])
    bound = audit.clopper_pearson_bound(ins, outs, delta=1e-5)
    assert bound.direction == "tnr/fnr"
    assert bound.threshold is not None and bound.threshold < -2  # measured -2.99
    assert bound.epsilon > 2.5  # measured 2.96


def test_false_alarms_at_most_what_significance_allows() -> None:
    # 20 seeds at significance 0.25 allow 5 exceedances. Over 400 seeds, measured 0%
    # (all thresholds) and 7% (CP vs the one threshold's own epsilon) / 6% (GDP).
    mu, delta, sig, t = 1.0, 1e-5, 0.25, 1.0
    true_eps = eps_from_mu(mu, delta)
    at_t = math.log((stats.norm.sf(t - mu) - delta) / stats.norm.sf(t))
    counts = np.zeros(4, dtype=int)
    for seed in range(20):
        ins, outs = _gaussian_scores(mu, 2000, seed=100 + seed)
        counts += [
            audit.clopper_pearson_bound(ins, outs, delta=delta, significance=sig).epsilon
            > true_eps,
            audit.gdp_bound(ins, outs, delta=delta, significance=sig).epsilon > true_eps,
            audit.clopper_pearson_bound(
                ins, outs, delta=delta, significance=sig, thresholds=[t]
            ).epsilon > at_t,
            audit.gdp_bound(ins, outs, delta=delta, significance=sig, thresholds=[t]).mu > mu,
        ]
    assert counts.max() <= sig * 20, counts


def test_results_are_frozen() -> None:
    bound = audit.gdp_bound([1.0, 2.0], [0.0, 0.5], delta=1e-5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bound.epsilon = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- epsilon_at_deltas


def test_epsilon_at_deltas_inverts_the_gdp_delta_curve() -> None:
    mu, deltas = 1.3, [1e-3, 1e-5, 1e-7]
    epsilons = audit.epsilon_at_deltas(mu, deltas)
    assert list(epsilons) == sorted(epsilons)
    for eps, delta in zip(epsilons, deltas):
        norm = stats.norm.cdf
        curve = norm(-eps / mu + mu / 2) - math.exp(eps) * norm(-eps / mu - mu / 2)
        assert curve == pytest.approx(delta, rel=1e-6)
    assert audit.epsilon_at_deltas(0.0, [1e-5]) == (0.0,)


# --------------------------------------------------------------------------- one run


def test_one_run_all_correct_matches_closed_form() -> None:
    # r = v: the tail is q**r, so without the delta term eps = logit(alpha**(1/r)).
    r, alpha = 20, 0.05
    bound = audit.one_run_bound(1000, r, r, delta=1e-300, significance=alpha)
    assert bound.epsilon == pytest.approx(special.logit(alpha ** (1 / r)), abs=1e-7)


def test_one_run_p_value_is_the_binomial_tail_plus_the_delta_term() -> None:
    m, r, v, eps = 1000, 200, 150, 1.0
    q = special.expit(eps)
    tail = stats.binom.sf(v - 1, r, q)
    assert audit.one_run_p_value(m, r, v, eps, 1e-300) == pytest.approx(tail, rel=1e-12)
    i = np.arange(1, v + 1)
    term = np.max((stats.binom.sf(v - i - 1, r, q) - tail) / i)
    assert audit.one_run_p_value(m, r, v, eps, 1e-4) == pytest.approx(tail + 2 * m * 1e-4 * term)
    assert audit.one_run_p_value(m, r, 0, eps, 1e-4) == 1.0


def test_one_run_bound_shrinks_as_delta_grows() -> None:
    bounds = [audit.one_run_bound(10_000, 400, 390, delta=d).epsilon for d in (1e-9, 1e-6, 1e-4)]
    assert bounds[0] > bounds[1] > bounds[2] >= 0.0
    # The returned epsilon is itself rejected: its p-value is at most the significance.
    bound = audit.one_run_bound(10_000, 400, 390, delta=1e-6)
    assert audit.one_run_p_value(10_000, 400, 390, bound.epsilon, 1e-6) <= bound.significance


def test_one_run_bound_below_true_epsilon_and_grows_with_m() -> None:
    # Measured (mu 4, true eps 24.4 at delta 1e-5): 1.82, 4.17, 6.22 for m = 1e2, 1e3, 1e4.
    mu, delta = 4.0, 1e-5
    true_eps = eps_from_mu(mu, delta)
    bounds = []
    for m in (100, 1000, 10_000):
        r, v = _one_run_simulation(mu, m, seed=0)
        bounds.append(audit.one_run_bound(m, r, v, delta=delta).epsilon)
    assert 0.0 < bounds[0] < bounds[1] < bounds[2] < true_eps


def test_one_run_never_exceeds_true_epsilon_over_seeds() -> None:
    mu, delta, m = 1.0, 1e-5, 1000
    true_eps = eps_from_mu(mu, delta)
    for seed in range(20):
        r, v = _one_run_simulation(mu, m, seed=seed, frac=0.05)
        assert audit.one_run_bound(m, r, v, delta=delta).epsilon <= true_eps


def test_count_guesses() -> None:
    scores = [0.1, 0.9, 0.5, 0.2, 0.8]
    included = np.array([False, True, False, True, False])
    # top 2 (0.9 in, 0.8 out) -> 1 correct; bottom 2 (0.1 out, 0.2 in) -> 1 correct.
    assert audit.count_guesses(scores, included, num_positive=2, num_negative=2) == (4, 2)
    assert audit.count_guesses(scores, included, num_positive=0, num_negative=1) == (1, 1)


# --------------------------------------------------------------------------- sampler test


def test_poisson_sampler_passes() -> None:
    n, q, steps = 2000, 0.01, 100
    result = audit.sampler_test(list(PoissonSampler(n, q, steps=steps, seed=0)), n, q, steps)
    assert result.passed, result
    assert result.reason == "" and result.duplicates == 0


def test_poisson_false_alarms_are_rare() -> None:
    # significance 0.01 over 20 seeds allows 0.2; measured 2 failures in 200 seeds.
    n, q, steps = 2000, 0.01, 100
    fails = sum(
        not audit.sampler_test(poisson_batches(n, q, steps, seed=s), n, q, steps).passed
        for s in range(20)
    )
    assert fails <= 1


def test_shuffled_fixed_size_sampler_fails() -> None:
    n, q, steps = 2000, 0.01, 100
    batches = list(ShuffledBatchSampler(n, 20, seed=0))
    result = audit.sampler_test(batches, n, q, steps)
    assert not result.passed
    assert result.dispersion_p_value < 1e-6 and result.participation_p_value < 1e-6


def test_fixed_batch_fails() -> None:
    n, q, steps = 2000, 0.01, 100
    result = audit.sampler_test([np.arange(20)] * steps, n, q, steps)
    assert not result.passed and "participation counts" in result.reason


def test_wrong_rate_and_duplicates_fail() -> None:
    n, steps = 2000, 100
    wrong = audit.sampler_test(poisson_batches(n, 0.012, steps, seed=0), n, 0.01, steps)
    assert not wrong.passed and wrong.batch_size_p_value < 1e-6
    batches = poisson_batches(n, 0.01, steps, seed=0)
    batches[3] = np.concatenate([batches[3], batches[3][:1]])
    doubled = audit.sampler_test(batches, n, 0.01, steps)
    assert not doubled.passed and doubled.duplicates == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_scores": []}, "in_scores must be a non-empty"),
        ({"out_scores": [0.0, float("nan")]}, "out_scores must be finite, got nan at index 1"),
        ({"delta": 0.0}, "delta must satisfy 0 < delta < 1, got 0.0"),
        ({"delta": 1.0}, "delta must satisfy"),
        ({"significance": 0.0}, "significance must satisfy 0 < significance < 1, got 0.0"),
        ({"significance": 1.5}, "significance must satisfy"),
        ({"thresholds": [float("inf")]}, "thresholds must be finite"),
    ],
)
def test_bounds_reject_bad_input(kwargs: dict, match: str) -> None:
    args = {"in_scores": [1.0, 2.0], "out_scores": [0.0, 0.5], "delta": 1e-5, **kwargs}
    for fn in (audit.clopper_pearson_bound, audit.gdp_bound):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_bad_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="significance must be a real number"):
        audit.gdp_bound([1.0], [0.0], delta=1e-5, significance=True)
    with pytest.raises(TypeError, match="delta"):
        audit.gdp_bound([1.0], [0.0], delta="1e-5")


def test_other_entry_points_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="num_correct <= num_guesses <= num_canaries"):
        audit.one_run_bound(10, 5, 6, delta=1e-5)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0, got -1"):
        audit.one_run_p_value(10, 5, 3, -1.0, 1e-5)
    with pytest.raises(ValueError, match="mu must be a finite number >= 0"):
        audit.epsilon_at_deltas(-1.0, [1e-5])
    with pytest.raises(ValueError, match="deltas must be non-empty"):
        audit.epsilon_at_deltas(1.0, [])
    with pytest.raises(ValueError, match=r"deltas\[1\] must satisfy"):
        audit.epsilon_at_deltas(1.0, [1e-5, 2.0])
    with pytest.raises(ValueError, match="included must be booleans"):
        audit.count_guesses([0.1, 0.2], [1, 0], num_positive=1, num_negative=1)
    with pytest.raises(ValueError, match="num_positive \\+ num_negative must be <= "):
        audit.count_guesses([0.1, 0.2], [True, False], num_positive=2, num_negative=1)
    with pytest.raises(ValueError, match="batches must hold steps=3 batches, got 2"):
        audit.sampler_test([[0], [1]], 10, 0.1, 3)
    with pytest.raises(ValueError, match=r"batches\[1\] has an index outside \[0, 10\)"):
        audit.sampler_test([[0], [10]], 10, 0.1, 2)


def test_audit_imports_no_framework() -> None:
    code = (
        "import sys, dpcore.audit; "
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'jax', 'jaxlib', 'flax', 'optax', 'dp_torch', 'dp_jax', 'tensorflow'})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_log_likelihood_ratio_scores_match_the_mixture_density() -> None:
    from scipy import stats

    from dpcore.audit import log_likelihood_ratio_scores

    rng = np.random.default_rng(0)
    released, q, sigma = rng.normal(size=(7, 3)), 0.3, 1.7
    present = (1 - q) * stats.norm.pdf(released, 0, sigma) + q * stats.norm.pdf(released, 1, sigma)
    expected = np.log(present / stats.norm.pdf(released, 0, sigma)).sum(axis=0)
    np.testing.assert_allclose(log_likelihood_ratio_scores(released, q, sigma), expected, rtol=1e-12)
    np.testing.assert_allclose(log_likelihood_ratio_scores(released, 1.0, sigma),
                               ((2 * released - 1) / (2 * sigma**2)).sum(axis=0), rtol=1e-12)
