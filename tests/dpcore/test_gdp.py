"""GDP (CLT) accountant: Opacus' figure, the exact mu-GDP conversion, and its warnings."""

from __future__ import annotations

import json
import math
import pathlib
import warnings

import numpy as np
import pytest
from scipy import special

from dpcore.accounting import GaussianAccountant, GDPAccountant
from dpcore.accounting.gdp import GDPApproximationWarning, GDPUnderReportWarning, compute_mu, eps_from_mu
from tests.dpcore.accountant_contract import AccountantContract

REFERENCE = json.loads((pathlib.Path(__file__).parent / "data" / "dp_accounting_reference.json").read_text())


class TestGDPContract(AccountantContract):
    kind = "gdp"

    def make(self) -> GDPAccountant:
        return GDPAccountant()


def test_opacus_name() -> None:
    assert GaussianAccountant is GDPAccountant


def test_opacus_reference_figure() -> None:
    acc = GaussianAccountant()
    for _ in range(int(90 // 0.04)):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    with pytest.warns(GDPApproximationWarning):
        eps = acc.get_epsilon(delta=1e-5)
    assert 6.59 < eps < 6.6


@pytest.mark.parametrize("mu", [0.05, 0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("delta", [1e-8, 1e-5, 1e-3])
def test_conversion_inverts_the_exact_delta_curve(mu: float, delta: float) -> None:
    eps = eps_from_mu(mu, delta)
    exact_delta = special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2)
    if eps == 0.0:
        assert exact_delta <= delta
    else:
        assert exact_delta == pytest.approx(delta, rel=1e-6)


def test_mixed_history_adds_mu_squared() -> None:
    history = [(1.0, 0.01, 300), (2.0, 0.05, 100)]
    expected = math.sqrt(300 * 0.01**2 * math.expm1(1.0) + 100 * 0.05**2 * math.expm1(0.25))
    assert compute_mu(history) == pytest.approx(expected, rel=1e-14)


def test_uniform_sampling_formula() -> None:
    sigma, q, steps = 1.3, 0.02, 500
    inner = math.exp(sigma**-2) * special.ndtr(1.5 / sigma) + 3 * special.ndtr(-0.5 / sigma) - 2
    assert compute_mu([(sigma, q, steps)], poisson=False) == pytest.approx(q * math.sqrt(2 * steps * inner))


@pytest.mark.parametrize("sigma", [20.0, 50.0, 200.0])
def test_uniform_and_poisson_agree_for_large_noise(sigma: float) -> None:
    """Both are ~ q sqrt(T) / sigma as sigma grows (the uniform formula's factor 2 in mu^2)."""
    history = [(sigma, 0.01, 1000)]
    ratio = compute_mu(history, poisson=False) / compute_mu(history, poisson=True)
    assert ratio == pytest.approx(1.0, abs=2.0 / sigma)


def test_known_under_report_warns_loudly() -> None:
    # Published figure: sigma 0.5, q 0.002, 5000 steps, delta 1e-7: CLT ~5.6, tight ~9.6.
    acc = GDPAccountant()
    acc.step(noise_multiplier=0.5, sample_rate=0.002, num_steps=5000)
    with pytest.warns(GDPUnderReportWarning, match=r"true epsilon is at least 9\.\d"):
        eps = acc.get_epsilon(1e-7)
    assert 5.4 < eps < 5.8



@pytest.mark.parametrize("row", REFERENCE["rows"], ids=lambda r: f"s{r['sigma']}-q{r['q']:.3g}-T{r['steps']}")
def test_warns_wherever_it_is_below_pld(row: dict) -> None:
    acc = GDPAccountant()
    acc.step(noise_multiplier=row["sigma"], sample_rate=row["q"], num_steps=row["steps"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps = acc.get_epsilon(row["delta"])
    categories = [w.category for w in caught]
    assert categories and all(issubclass(c, GDPApproximationWarning) for c in categories)
    if eps < row["pld_epsilon"] * 0.95 and row["pld_epsilon"] > 0.5:
        # a large under-report must be certified and reported loudly
        assert GDPUnderReportWarning in categories, (eps, row)


def test_without_check_only_the_soft_warning() -> None:
    acc = GDPAccountant()
    acc.step(noise_multiplier=0.5, sample_rate=0.002, num_steps=5000)
    with pytest.warns(GDPApproximationWarning) as record:
        acc.get_epsilon(1e-7, check=False)
    assert [w.category for w in record] == [GDPApproximationWarning]


def test_monotone_in_mu() -> None:
    values = [eps_from_mu(mu, 1e-5) for mu in np.linspace(0.1, 5, 20)]
    assert all(b > a for a, b in zip(values, values[1:]))
