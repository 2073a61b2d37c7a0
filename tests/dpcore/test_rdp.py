"""RDP accountant: Opacus' figures, dp-accounting, closed forms and high-precision numerics."""

from __future__ import annotations

import json
import math
import pathlib
import warnings

import mpmath
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp

from dpcore.accounting import RDPAccountant, RDPOrderWarning
from dpcore.accounting.rdp import DEFAULT_ALPHAS, compute_rdp, get_privacy_spent
from tests.dpcore.accountant_contract import AccountantContract
from tests.dpcore.grid import GRID
from tests.tolerance import assert_close

INTEGER_ORDERS = tuple(float(a) for a in range(2, 257))


class TestRDPContract(AccountantContract):
    kind = "rdp"

    def make(self) -> RDPAccountant:
        return RDPAccountant()


def _ours(sigma: float, q: float, steps: int, delta: float, alphas=None) -> tuple[float, float]:
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RDPOrderWarning)
        return acc.get_privacy_spent(delta=delta, alphas=alphas)


def _theirs(sigma: float, q: float, steps: int, delta: float, orders) -> tuple[float, np.ndarray]:
    acc = dpa_rdp.RdpAccountant(list(orders))
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta), np.asarray(acc._rdp)  # noqa: SLF001 - test-only oracle


# ------------------------------------------------------------------ published figures
def test_opacus_reference_figure() -> None:
    # Opacus 1.6 accountant test: 90 epochs at q=0.04, one step() call per step.
    acc = RDPAccountant()
    for _ in range(int(90 / 0.04)):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    assert abs(acc.get_epsilon(delta=1e-5) - 7.32911117143) < 1e-11


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "expected"),
    [(1.0, 0.01, 1000, 2.1014), (1.1, 256 / 60000, 14062, 2.5966)],
)
def test_reference_table(sigma: float, q: float, steps: int, expected: float) -> None:
    eps, _ = _ours(sigma, q, steps, 1e-5)
    assert round(eps, 4) == expected


# ------------------------------------------------------------------ dp-accounting
def test_grid_has_the_promised_span() -> None:
    sigmas, qs, steps, deltas = zip(*GRID)
    assert len(GRID) >= 30
    assert min(sigmas) == 0.5 and max(sigmas) == 10.0
    assert min(qs) == 1e-4 and max(qs) == 1.0
    assert min(steps) == 1 and max(steps) == 100000
    assert min(deltas) == 1e-8 and max(deltas) == 1e-3


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), GRID)
def test_equals_dp_accounting_at_the_same_orders(sigma: float, q: float, steps: int, delta: float) -> None:
    eps, _ = _ours(sigma, q, steps, delta, alphas=INTEGER_ORDERS)
    ref_eps, ref_rdp = _theirs(sigma, q, steps, delta, INTEGER_ORDERS)
    assert_close(eps, ref_eps, rtol=1e-6)
    ours_rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=INTEGER_ORDERS)
    assert_close(ours_rdp, ref_rdp, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), GRID)
def test_default_orders_never_above_dp_accounting(sigma: float, q: float, steps: int, delta: float) -> None:
    # dp-accounting 0.6 bounds the fractional-order series by the sum of the
    # magnitudes of its terms; the signed sum (ours, Opacus') is exact, so ours
    # can only be smaller, and it is never below the tight PLD figure.
    eps, _ = _ours(sigma, q, steps, delta)
    ref_eps, _ = _theirs(sigma, q, steps, delta, DEFAULT_ALPHAS)
    assert eps <= ref_eps * (1 + 1e-12)
    reference = json.loads(
        (pathlib.Path(__file__).parent / "data" / "dp_accounting_reference.json").read_text()
    )
    row = next(r for r in reference["rows"] if (r["sigma"], r["q"], r["steps"], r["delta"]) == (sigma, q, steps, delta))
    assert eps >= row["pld_epsilon"] * (1 - 1e-3)


# ------------------------------------------------------------------ closed forms and numerics
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.7])
def test_full_batch_is_the_gaussian_mechanism(sigma: float) -> None:
    orders = np.array(DEFAULT_ALPHAS)
    assert_close(compute_rdp(q=1.0, noise_multiplier=sigma, steps=7, orders=orders),
                 7 * orders / (2 * sigma**2), rtol=1e-15)


def _rdp_by_quadrature(alpha: float, q: float, sigma: float) -> float:
    mpmath.mp.dps = 40
    a, p, s = mpmath.mpf(alpha), mpmath.mpf(q), mpmath.mpf(sigma)

    def integrand(z):
        ratio = 1 - p + p * mpmath.e ** ((2 * z - 1) / (2 * s * s))
        return mpmath.npdf(z, 0, s) * ratio**a

    edges = [-mpmath.inf, -20 * s, -5 * s, 0, 5 * s, 20 * s, mpmath.inf]
    return float(mpmath.log(mpmath.quad(integrand, edges)) / (a - 1))


@pytest.mark.parametrize(
    ("alpha", "q", "sigma"),
    [(1.1, 0.04, 1.5), (3.9, 0.04, 1.5), (2.5, 0.01, 1.0), (7.0, 0.01, 1.0), (1.5, 0.5, 2.0),
     (40.0, 0.01, 1.0), (12.3, 0.2, 4.0)],
)
def test_matches_high_precision_quadrature(alpha: float, q: float, sigma: float) -> None:
    ours = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    assert_close(ours, _rdp_by_quadrature(alpha, q, sigma), rtol=1e-8)


def test_conversion_formula() -> None:
    orders, rdp, delta = np.array([2.0, 5.0, 30.0]), np.array([0.2, 0.8, 9.0]), 1e-6
    expected = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
    eps, best = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert eps == pytest.approx(expected.min(), rel=1e-15)
    assert best == orders[expected.argmin()]


def test_bretagnolle_huber_gives_zero_epsilon() -> None:
    # delta >= sqrt(1 - exp(-rdp)) at some order: epsilon is exactly 0
    eps, _ = get_privacy_spent(orders=[2.0, 3.0], rdp=[1e-8, 2e-8], delta=0.5)
    assert eps == 0.0


# ------------------------------------------------------------------ API behaviour
def test_custom_alphas_agree_with_the_running_total() -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=300)
    acc.step(noise_multiplier=2.0, sample_rate=0.05, num_steps=100)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=300)
    fast = acc.get_privacy_spent(delta=1e-5)
    slow = acc.get_privacy_spent(delta=1e-5, alphas=list(DEFAULT_ALPHAS) + [1e4])
    assert fast[0] == pytest.approx(slow[0], rel=1e-12)
    reloaded = RDPAccountant()
    reloaded.load_state_dict(acc.state_dict())
    assert reloaded.get_privacy_spent(delta=1e-5) == fast


def test_edge_order_warns_and_wider_orders_fix_it() -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=1e-4, num_steps=100000)
    with pytest.warns(RDPOrderWarning, match="optimal RDP order 63 is the largest"):
        eps_default = acc.get_epsilon(delta=1e-8)
    wider = list(DEFAULT_ALPHAS) + list(range(64, 200))
    eps_wide, alpha = acc.get_privacy_spent(delta=1e-8, alphas=wider)  # no warning: interior
    assert 63 <= alpha < 199 and eps_wide <= eps_default


@pytest.mark.parametrize(("alphas", "match"), [([], "non-empty"), ([0.5, 2], "orders > 1"), ("abc", "alphas")])
def test_bad_alphas(alphas: object, match: str) -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=match):
        acc.get_privacy_spent(delta=1e-5, alphas=alphas)  # type: ignore[arg-type]


def test_mismatched_rdp_length() -> None:
    with pytest.raises(ValueError, match="one value per order: got 1 values for 2 orders"):
        get_privacy_spent(orders=[2.0, 3.0], rdp=[0.1], delta=1e-5)


def test_infinite_everywhere() -> None:
    eps, best = get_privacy_spent(orders=[2.0, 3.0], rdp=[math.inf, math.inf], delta=1e-5)
    assert eps == math.inf and math.isnan(best)
