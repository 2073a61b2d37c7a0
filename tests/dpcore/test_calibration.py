"""get_noise_multiplier: Opacus' figures, the upper-bound promise and its errors."""

from __future__ import annotations

import warnings

import pytest

from dpcore.accounting import create_accountant, get_noise_multiplier


def _epsilon(kind: str, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = create_accountant(kind)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta)


def test_opacus_rdp_epochs() -> None:
    sigma = get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90)
    assert round(sigma, 3) == 1.416


def test_opacus_rdp_steps() -> None:
    sigma = get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, steps=2000)
    assert round(sigma, 4) == 1.3562


def test_opacus_prv_epochs() -> None:
    sigma = get_noise_multiplier(
        target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90, accountant="prv"
    )
    assert sigma == 1.34765625


@pytest.mark.parametrize("kind", ["rdp", "prv", "pld"])
@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 0.01, 1000), (3.0, 256 / 60000, 14062), (8.0, 0.1, 500)])
def test_result_meets_the_target(kind: str, target: float, q: float, steps: int) -> None:
    sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant=kind
    )
    eps = _epsilon(kind, sigma, q, steps, 1e-5)
    assert target - 0.01 <= eps <= target


def test_kwargs_reach_the_accountant() -> None:
    narrow = get_noise_multiplier(
        target_epsilon=2, target_delta=1e-5, sample_rate=0.01, steps=1000, alphas=[2, 4, 8, 16, 32]
    )
    default = get_noise_multiplier(target_epsilon=2, target_delta=1e-5, sample_rate=0.01, steps=1000)
    assert narrow > default  # fewer orders -> looser epsilon -> more noise needed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epochs=1, steps=10), "exactly one of epochs and steps, got epochs=1 and steps=10"),
        (dict(), "exactly one of epochs and steps, got epochs=None and steps=None"),
        (dict(steps=100, target_epsilon=-1.0), "target_epsilon must be a finite number > 0, got -1.0"),
        (dict(steps=100, target_delta=0.0), r"0 < target_delta < 1, got 0.0"),
        (dict(steps=100, sample_rate=0.0), r"0 < sample_rate <= 1"),
        (dict(steps=100, epsilon_tolerance=0), "epsilon_tolerance must be a finite number > 0"),
        (dict(epochs=-2), "epochs must be a finite number > 0, got -2"),
        (dict(steps=100, accountant="nope"), r"accountant must be one of \['gdp', 'pld', 'prv', 'rdp'\]"),
    ],
)
def test_argument_errors(kwargs: dict, match: str) -> None:
    args = dict(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01) | kwargs
    with pytest.raises(ValueError, match=match):
        get_noise_multiplier(**args)


def test_unreachable_budget() -> None:
    # with RDP orders up to 63, epsilon >= log(1/delta)/62 ~ 0.37 for any sigma up to MAX_SIGMA
    with pytest.raises(ValueError, match=r"target_epsilon=0.1 is unreachable .* Increase target_epsilon"):
        get_noise_multiplier(target_epsilon=0.1, target_delta=1e-10, sample_rate=1.0, steps=10)


def test_discontinuous_epsilon_terminates() -> None:
    # at huge sigma the Bretagnolle-Huber rule drops epsilon from ~0.103 to 0:
    # the tolerance window is never hit, and the search must still stop, below target.
    sigma = get_noise_multiplier(target_epsilon=0.1, target_delta=1e-5, sample_rate=1.0, steps=10)
    assert _epsilon("rdp", sigma, 1.0, 10, 1e-5) <= 0.1
