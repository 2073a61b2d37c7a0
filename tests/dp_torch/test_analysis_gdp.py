"""``dp_torch.accountants.analysis.gdp``: closed forms, their limits and their inverses."""

from __future__ import annotations

import math

import pytest
from scipy import special

from dp_torch.accountants.analysis.gdp import (
    compute_eps_poisson,
    compute_eps_uniform,
    compute_mu_poisson,
    compute_mu_uniform,
    delta_eps_mu,
    eps_from_mu,
)

ARGS = dict(steps=1000, noise_multiplier=1.1, sample_rate=0.01)


def test_poisson_mu_closed_form() -> None:
    assert compute_mu_poisson(**ARGS) == pytest.approx(0.01 * math.sqrt(1000 * math.expm1(1 / 1.1**2)), rel=1e-12)


def test_uniform_mu_closed_form() -> None:
    inner = math.exp(1 / 1.1**2) * special.ndtr(1.5 / 1.1) + 3 * special.ndtr(-0.5 / 1.1) - 2
    assert compute_mu_uniform(**ARGS) == pytest.approx(0.01 * math.sqrt(2 * 1000 * inner), rel=1e-12)


@pytest.mark.parametrize("sigma", [30.0, 100.0, 300.0])
def test_both_samplings_tend_to_q_sqrt_t_over_sigma(sigma: float) -> None:
    args = dict(steps=400, noise_multiplier=sigma, sample_rate=0.05)
    limit = 0.05 * math.sqrt(400) / sigma
    assert compute_mu_poisson(**args) == pytest.approx(limit, rel=1 / sigma)
    assert compute_mu_uniform(**args) == pytest.approx(limit, rel=1 / sigma)


@pytest.mark.parametrize("mu", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_eps_from_mu_inverts_delta_eps_mu(mu: float, delta: float) -> None:
    eps = eps_from_mu(mu=mu, delta=delta)
    assert delta_eps_mu(eps=eps, mu=mu) == pytest.approx(delta, rel=1e-6)


def test_eps_helpers_compose() -> None:
    assert compute_eps_poisson(**ARGS, delta=1e-5) == eps_from_mu(mu=compute_mu_poisson(**ARGS), delta=1e-5)
    assert compute_eps_uniform(**ARGS, delta=1e-5) == eps_from_mu(mu=compute_mu_uniform(**ARGS), delta=1e-5)
    assert compute_eps_uniform(**ARGS, delta=1e-5) > compute_eps_poisson(**ARGS, delta=1e-5)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        compute_mu_poisson(steps=-1, noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="noise_multiplier must be a number > 0"):
        compute_mu_uniform(steps=1, noise_multiplier=0.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        compute_mu_uniform(steps=1, noise_multiplier=1.0, sample_rate=1.5)
    with pytest.raises(ValueError, match="mu must be > 0"):
        delta_eps_mu(eps=1.0, mu=0.0)
