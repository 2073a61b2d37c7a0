"""Tests of the PLD accountant (dpcore.accounting.pld).

Oracles: the closed-form hockey-stick divergence of one subsampled Gaussian
step (mpmath, both neighbouring directions), the exact mu-GDP curve of ``T``
full-batch Gaussian steps, and Google's dp-accounting (the stored reference
grid, and live for mixed histories).
"""

from __future__ import annotations

import json
import math
import pathlib

import mpmath
import pytest
from scipy import optimize

from dpcore.accounting import create_accountant
from dpcore.accounting import pld
from dpcore.accounting.pld import PLDAccountant
from tests.dpcore.accountant_contract import AccountantContract
from tests.dpcore.grid import GRID
from tests.tolerance import assert_close

REFERENCE = pathlib.Path(__file__).parent / "data" / "dp_accounting_reference.json"
DIGITS = 40  # mpmath working precision of the oracles (set locally, never globally)


def _accountant(history: list[tuple[float, float, int]], interval: float | None = None) -> PLDAccountant:
    acc = PLDAccountant(value_discretization_interval=interval)
    acc.history = history
    return acc


# ---------------------------------------------------------------------------- oracles
def _gdp_delta(eps: float, mu: float) -> float:
    """Exact delta(eps) of a mu-GDP mechanism (Dong, Roth and Su), in 40 digits."""
    with mpmath.workdps(DIGITS):
        e, m = mpmath.mpf(eps), mpmath.mpf(mu)
        return float(mpmath.ncdf(-e / m + m / 2) - mpmath.exp(e) * mpmath.ncdf(-e / m - m / 2))


def _gdp_epsilon(delta: float, mu: float) -> float:
    if _gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while _gdp_delta(high, mu) > delta:
        high *= 2.0
    return optimize.brentq(lambda e: _gdp_delta(e, mu) - delta, 0.0, high, xtol=1e-13, rtol=1e-14)


def _single_step_deltas(eps: float, sigma: float, q: float) -> tuple[float, float]:
    """Exact (remove, add) hockey-stick divergences of one Poisson-subsampled Gaussian step.

    Remove: P = (1-q) N(0, s^2) + q N(1, s^2) against Q = N(0, s^2); add: Q against P.
    The loss log(P/Q)(y) = log(1 - q + q exp((y - 1/2)/s^2)) increases with y.
    """
    with mpmath.workdps(DIGITS):
        e, s, q_ = mpmath.mpf(eps), mpmath.mpf(sigma), mpmath.mpf(q)

        def cut(loss: mpmath.mpf) -> mpmath.mpf:  # y where the remove loss equals `loss`
            return mpmath.mpf("0.5") + s**2 * mpmath.log(1 + (mpmath.exp(loss) - 1) / q_)

        def p_below(y: mpmath.mpf) -> mpmath.mpf:
            return (1 - q_) * mpmath.ncdf(y / s) + q_ * mpmath.ncdf((y - 1) / s)

        if q_ < 1 and e <= mpmath.log(1 - q_):
            remove = 1 - mpmath.exp(e)
        else:
            y = cut(e)
            remove = (1 - p_below(y)) - mpmath.exp(e) * (1 - mpmath.ncdf(y / s))
        if q_ < 1 and e >= -mpmath.log(1 - q_):
            add = mpmath.mpf(0)
        else:
            y = cut(-e)
            add = mpmath.ncdf(y / s) - mpmath.exp(e) * p_below(y)
        return float(remove), float(add)


def _dp_accounting_epsilons(
    history: list[tuple[float, float, int]], deltas: list[float]
) -> list[float]:
    """dp-accounting's PLD epsilons (interval 1e-4) of the same events, composed live."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, n in history:
        step = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        ref.compose(dp_event.SelfComposedDpEvent(step, n))
    return [float(ref.get_epsilon(delta)) for delta in deltas]


# ---------------------------------------------------------------------------- contract
class TestPLDContract(AccountantContract):
    kind = "pld"

    def make(self) -> PLDAccountant:
        return PLDAccountant()


def test_registry_creates_pld_with_options() -> None:
    acc = create_accountant("pld", value_discretization_interval=1e-3)
    assert isinstance(acc, PLDAccountant)
    assert acc.value_discretization_interval == 1e-3


# ---------------------------------------------------------------------------- dp-accounting figures
@pytest.mark.parametrize(
    ("sigma", "q", "steps", "expected"),
    [(1.0, 0.01, 1000, 1.8282), (1.1, 256 / 60000, 14062, 2.3817)],
)
def test_reproduces_dp_accounting_figures(
    sigma: float, q: float, steps: int, expected: float
) -> None:
    eps = _accountant([(sigma, q, steps)]).get_epsilon(1e-5)
    assert round(eps, 4) == expected


def _reference_rows() -> list[dict]:
    payload = json.loads(REFERENCE.read_text())
    assert payload["interval"] == 1e-4
    rows = payload["rows"]
    assert [(r["sigma"], r["q"], r["steps"], r["delta"]) for r in rows] == GRID
    return rows


def _grid_id(index: int) -> str:
    sigma, q, steps, delta = GRID[index]
    return f"sigma{sigma}-q{q:.3g}-T{steps}-delta{delta:g}"


@pytest.mark.parametrize("index", range(len(GRID)), ids=_grid_id)
def test_grid_matches_dp_accounting(index: int) -> None:
    row = _reference_rows()[index]
    eps = _accountant([(row["sigma"], row["q"], row["steps"])]).get_epsilon(row["delta"])
    reference = row["pld_epsilon"]
    assert eps >= reference * (1 - 1e-3), (eps, reference)
    assert eps <= reference * 1.01, (eps, reference)


# ---------------------------------------------------------------------------- closed-form oracles
@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.01), (0.7, 0.3), (2.0, 0.9)])
def test_single_step_is_exact_at_grid_points_in_both_directions(sigma: float, q: float) -> None:
    # Connect-the-dots keeps delta exact at the grid points, for each direction.
    interval = 1e-4
    acc = _accountant([(sigma, q, 1)], interval)
    remove, add, used = acc._plds()
    assert used == interval and add is not remove
    for k in (0, 10, 100, 1000, 5000):
        eps = k * interval
        exact_remove, exact_add = _single_step_deltas(eps, sigma, q)
        got_remove = pld._delta_for_epsilon(remove, interval, eps)
        got_add = pld._delta_for_epsilon(add, interval, eps)
        assert_close(got_remove, exact_remove, rtol=1e-9, atol=1e-300)
        assert_close(got_add, exact_add, rtol=1e-9, atol=1e-17)
        assert got_remove >= exact_remove * (1 - 1e-12)
        assert got_add >= exact_add * (1 - 1e-12) - 1e-17
        assert acc.get_delta(eps) == max(got_remove, got_add)


@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.01), (0.7, 0.3)])
def test_single_step_between_grid_points_is_pessimistic(sigma: float, q: float) -> None:
    acc = _accountant([(sigma, q, 1)])
    for eps in (0.00003, 0.01234567, 0.3333333, 1.11111):
        exact = max(_single_step_deltas(eps, sigma, q))
        got = acc.get_delta(eps)
        assert got >= exact * (1 - 1e-12)
        assert_close(got, exact, rtol=1e-4)  # linear interpolation error ~ interval


@pytest.mark.parametrize(
    ("sigma", "steps"), [(0.8, 1), (2.0, 10), (5.0, 1000), (10.0, 1), (1.5, 200)]
)
def test_full_batch_matches_gdp_closed_form(sigma: float, steps: int) -> None:
    # q = 1: T Gaussian steps compose to mu-GDP with mu = sqrt(T) / sigma, exactly.
    mu = math.sqrt(steps) / sigma
    acc = _accountant([(sigma, 1.0, steps)])
    for delta in (1e-2, 1e-5, 1e-8):
        exact = _gdp_epsilon(delta, mu)
        eps = acc.get_epsilon(delta)
        assert eps >= exact
        assert_close(eps, exact, rtol=1e-5)
    for eps in (0.1, 1.0, 3.0):
        exact = _gdp_delta(eps, mu)
        got = acc.get_delta(eps)
        assert got >= exact * (1 - 1e-12)
        assert_close(got, exact, rtol=1e-6, atol=1e-13)


def test_coarsened_grid_for_huge_epsilon_is_still_an_upper_bound() -> None:
    # mu ~ 632, epsilon ~ 2e5: the composed PLD would need ~1e8 points at 1e-4,
    # so the accountant coarsens its grid; the answer must stay a tight upper bound.
    sigma, steps = 0.5, 100_000
    acc = _accountant([(sigma, 1.0, steps)])
    exact = _gdp_epsilon(1e-5, math.sqrt(steps) / sigma)
    eps = acc.get_epsilon(1e-5)
    assert acc._plds()[2] > 1e-4
    assert eps >= exact
    assert_close(eps, exact, rtol=1e-5)


def test_coarse_interval_is_still_an_upper_bound() -> None:
    rows = _reference_rows()
    for index in (0, 7, 9, 12, 20):
        row = rows[index]
        coarse = _accountant([(row["sigma"], row["q"], row["steps"])], interval=0.05)
        eps = coarse.get_epsilon(row["delta"])
        assert eps >= row["pld_epsilon"], (index, eps, row["pld_epsilon"])
    coarse = _accountant([(2.0, 1.0, 50)], interval=0.05)
    assert coarse.get_epsilon(1e-6) >= _gdp_epsilon(1e-6, math.sqrt(50) / 2.0)


def test_finer_interval_is_tighter() -> None:
    history = [(1.0, 0.01, 1000)]
    intervals = (0.05, 1e-2, 1e-3, 1e-4)
    values = [_accountant(history, interval).get_epsilon(1e-5) for interval in intervals]
    assert values == sorted(values, reverse=True)
    assert values[0] > values[-1]


# ---------------------------------------------------------------------------- mixed histories
MIXED = [(1.0, 0.01, 300), (2.0, 0.05, 200), (0.8, 0.02, 100), (1.5, 1.0, 5), (1.0, 0.01, 50)]


def test_mixed_history_matches_dp_accounting_live() -> None:
    acc = _accountant(MIXED)
    deltas = [1e-3, 1e-5]
    for delta, reference in zip(deltas, _dp_accounting_epsilons(MIXED, deltas)):
        eps = acc.get_epsilon(delta)
        assert eps >= reference * (1 - 1e-6)
        assert_close(eps, reference, rtol=1e-4)


def test_composition_does_not_depend_on_segment_order() -> None:
    a, b = (1.0, 0.01, 300), (2.0, 0.05, 200)
    split = _accountant([a, b, (1.0, 0.01, 100)]).get_epsilon(1e-5)
    merged = _accountant([(1.0, 0.01, 400), b]).get_epsilon(1e-5)
    reversed_ = _accountant([b, (1.0, 0.01, 400)]).get_epsilon(1e-5)
    assert_close(split, merged, rtol=1e-9)
    assert_close(reversed_, merged, rtol=1e-9)


def test_composing_more_can_only_cost_more() -> None:
    base = _accountant([(1.0, 0.01, 300)]).get_epsilon(1e-5)
    more = _accountant([(1.0, 0.01, 300), (3.0, 0.01, 10)]).get_epsilon(1e-5)
    assert more > base


# ---------------------------------------------------------------------------- monotonicity
def test_epsilon_and_delta_are_monotone_and_consistent() -> None:
    acc = _accountant([(1.1, 0.02, 500)])
    deltas = [1e-2, 1e-3, 1e-5, 1e-7, 1e-9]
    eps = [acc.get_epsilon(d) for d in deltas]
    assert all(x < y for x, y in zip(eps, eps[1:]))
    for d, e in zip(deltas, eps):
        assert acc.get_delta(e) <= d * (1 + 1e-9)
        assert acc.get_delta(e * 0.999) > d
    grid = [0.0, 0.5, 1.0, 2.0, 4.0]
    values = [acc.get_delta(e) for e in grid]
    assert all(x > y for x, y in zip(values, values[1:]))


def test_epsilon_decreases_with_noise_and_increases_with_rate() -> None:
    by_sigma = [_accountant([(s, 0.02, 200)]).get_epsilon(1e-5) for s in (0.7, 1.0, 2.0, 4.0)]
    assert all(x > y for x, y in zip(by_sigma, by_sigma[1:]))
    by_rate = [_accountant([(1.0, q, 200)]).get_epsilon(1e-5) for q in (0.001, 0.01, 0.1, 1.0)]
    assert all(x < y for x, y in zip(by_rate, by_rate[1:]))


def test_large_delta_gives_zero_epsilon() -> None:
    acc = _accountant([(50.0, 0.01, 10)])
    assert acc.get_epsilon(0.5) == 0.0


# ---------------------------------------------------------------------------- edge cases
def test_empty_history() -> None:
    acc = PLDAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    assert acc.get_delta(1.0) == 0.0


def test_noiseless_step_is_not_private() -> None:
    acc = _accountant([(1.0, 0.01, 10), (0.0, 0.01, 1)])
    assert acc.get_epsilon(1e-5) == math.inf
    assert acc.get_delta(100.0) == 1.0


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0.0, ValueError, r"value_discretization_interval must be a finite number > 0, got 0.0"),
        (-1e-4, ValueError, "value_discretization_interval must be a finite number > 0"),
        (float("nan"), ValueError, "value_discretization_interval"),
        (float("inf"), ValueError, "value_discretization_interval"),
        ("1e-4", TypeError, "value_discretization_interval must be a real number"),
        (True, TypeError, "value_discretization_interval must be a real number"),
    ],
)
def test_bad_interval_rejected(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PLDAccountant(value_discretization_interval=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: a.get_epsilon(0.0), ValueError, r"0 < delta < 1, got 0.0"),
        (lambda a: a.get_epsilon(float("nan")), ValueError, "delta"),
        (lambda a: a.get_epsilon("1e-5"), TypeError, "delta must be a real number"),
        (lambda a: a.get_epsilon(1e-5, eps_error=0.1), TypeError, r"unexpected keyword.*eps_error"),
        (lambda a: a.get_delta(-1.0), ValueError, r"finite number >= 0, got -1.0"),
        (lambda a: a.get_delta(float("inf")), ValueError, "epsilon must be a finite number"),
        (lambda a: a.get_delta(None), TypeError, "epsilon must be a real number"),
    ],
)
def test_bad_query_rejected_and_changes_nothing(call, error: type, match: str) -> None:
    acc = _accountant([(1.0, 0.01, 100)])
    before = acc.get_epsilon(1e-5)
    with pytest.raises(error, match=match):
        call(acc)
    assert acc.history == [(1.0, 0.01, 100)]
    assert acc.get_epsilon(1e-5) == before


# ---------------------------------------------------------------------------- state and cache
def test_state_dict_round_trip_reproduces_epsilon_and_delta() -> None:
    acc = _accountant(MIXED)
    state = acc.state_dict()
    assert state == {"history": MIXED, "mechanism": "pld"}
    fresh = PLDAccountant()
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.history == acc.history
    assert fresh.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
    assert fresh.get_delta(2.0) == acc.get_delta(2.0)


def test_cache_follows_every_history_change() -> None:
    acc = _accountant([(1.0, 0.01, 100)])
    first = acc.get_epsilon(1e-5)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    assert acc.get_epsilon(1e-5) == _accountant([(1.0, 0.01, 200)]).get_epsilon(1e-5) > first
    acc.history = [(2.0, 0.01, 100)]
    assert acc.get_epsilon(1e-5) == _accountant([(2.0, 0.01, 100)]).get_epsilon(1e-5)
    acc.load_state_dict({"history": [(1.0, 0.01, 100)]})
    assert acc.get_epsilon(1e-5) == first
    with pytest.raises(ValueError, match="num_steps"):
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=0)
    assert acc.get_epsilon(1e-5) == first


def test_interval_is_read_only() -> None:
    acc = PLDAccountant(value_discretization_interval=1e-3)
    with pytest.raises(AttributeError):
        acc.value_discretization_interval = 1e-2  # type: ignore[misc]
    assert acc.value_discretization_interval == 1e-3
    assert "1e-3" in repr(acc) or "0.001" in repr(acc)


def test_default_interval_is_dp_accountings_unless_one_step_is_tiny() -> None:
    from dpcore.accounting.pld import auto_interval

    assert PLDAccountant().value_discretization_interval is None
    assert auto_interval([(1.0, 0.01, 1000)]) == 1e-4
    spread = 1e-4 * math.sqrt(math.expm1(0.25))
    assert auto_interval([(1.0, 0.01, 10), (2.0, 1e-4, 100000)]) == pytest.approx(spread / 20)
    assert auto_interval([]) == 1e-4
