"""Noise calibration: the smallest noise multiplier that meets a privacy budget."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from dpcore.checks import check_delta, check_num_steps, check_positive, check_sample_rate
from dpcore.accounting._registry import create_accountant

__all__ = ["MAX_SIGMA", "get_noise_multiplier"]

#: Calibration gives up when even this noise multiplier misses the target.
MAX_SIGMA = 1e6

_START_SIGMA = 20.0


def _resolve_steps(sample_rate: float, epochs: Any, steps: Any) -> int:
    if (epochs is None) == (steps is None):
        raise ValueError(
            "get_noise_multiplier needs exactly one of epochs and steps, got "
            f"epochs={epochs!r} and steps={steps!r}; pass epochs=E (converted to "
            "int(E / sample_rate) steps) or steps=T."
        )
    if steps is not None:
        return check_num_steps(steps, "steps")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real):
        raise TypeError(f"epochs must be a number > 0, got {epochs!r}.")
    check_positive(epochs, "epochs")
    return check_num_steps(max(1, int(epochs / sample_rate)), "steps (from epochs)")


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    epochs: float | None = None,
    steps: int | None = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
    **kwargs: Any,
) -> float:
    """Find a noise multiplier whose epsilon is at most ``target_epsilon``.

    Bisection on ``sigma`` over ``[0, 20]`` (widened by doubling when needed),
    the search Opacus 1.x performs, so the same inputs give Opacus' answer.
    The returned sigma always satisfies ``epsilon(sigma) <= target_epsilon``,
    and ``target_epsilon - epsilon(sigma) <= epsilon_tolerance`` unless the
    accountant's epsilon jumps across that window (the search then stops when
    the bracket is narrower than 1e-12 relative and returns its upper end).

    Args:
        target_epsilon: The privacy budget epsilon, ``> 0``.
        target_delta: The privacy budget delta, ``0 < delta < 1``.
        sample_rate: Poisson sampling rate of each step.
        epochs: Training length in epochs (``int(epochs / sample_rate)`` steps).
        steps: Training length in steps. Give exactly one of epochs and steps.
        accountant: Registered accountant name (``"rdp"``, ``"prv"``, ``"pld"``, ``"gdp"``).
        epsilon_tolerance: How far below the target the result may land, ``> 0``.
        **kwargs: Passed to the accountant's ``get_epsilon`` (e.g. ``alphas``).

    Returns:
        The noise multiplier.

    Raises:
        ValueError: For invalid arguments, both or neither of epochs and steps,
            or a budget that no noise multiplier up to ``MAX_SIGMA`` reaches.
    """
    target_epsilon = check_positive(target_epsilon, "target_epsilon")
    target_delta = check_delta(target_delta, "target_delta")
    sample_rate = check_sample_rate(sample_rate)
    epsilon_tolerance = check_positive(epsilon_tolerance, "epsilon_tolerance")
    num_steps = _resolve_steps(sample_rate, epochs, steps)
    acc = create_accountant(accountant)
    caught: dict[float, list[warnings.WarningMessage]] = {}

    def epsilon_of(sigma: float) -> float:
        # Warnings of intermediate candidates are noise; only the answer's are re-raised.
        acc.history = [(sigma, sample_rate, num_steps)]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            eps = acc.get_epsilon(target_delta, **kwargs)
        caught[sigma] = record
        return eps

    sigma_low, sigma_high = 0.0, _START_SIGMA
    eps_high = epsilon_of(sigma_high)
    while eps_high > target_epsilon:
        if sigma_high >= MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target_epsilon} is unreachable at target_delta={target_delta}, "
                f"sample_rate={sample_rate}, {num_steps} steps: even noise_multiplier="
                f"{sigma_high:g} gives epsilon={eps_high:.4g}. Increase target_epsilon or "
                f"target_delta, or train for fewer steps or with a smaller sample_rate."
            )
        sigma_low, sigma_high = sigma_high, 2.0 * sigma_high
        eps_high = epsilon_of(sigma_high)
    while target_epsilon - eps_high > epsilon_tolerance and sigma_high - sigma_low > 1e-12 * sigma_high:
        sigma = (sigma_low + sigma_high) / 2.0
        eps = epsilon_of(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    if not (math.isfinite(eps_high) and eps_high <= target_epsilon):
        raise AssertionError("calibration invariant violated: epsilon above target")
    for item in caught[sigma_high]:
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return sigma_high
