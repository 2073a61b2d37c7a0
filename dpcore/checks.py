"""Argument checks shared by the public entry points of dpcore, dp_torch and dp_jax.

Every check takes ``value`` (the value to check) and ``name`` (the argument's
name, used in the error message), returns the validated value as a plain Python
``float``, ``int``, ``bool`` or ``str``, and raises ``TypeError`` for a wrong
type or ``ValueError`` for a value out of range, with a message that names the
argument, the value seen and how to fix it. Checks never mutate anything, so a
caller that validates first and mutates second leaves its state intact on bad
input.

Example:
    >>> from dpcore.checks import check_sample_rate
    >>> check_sample_rate(0.01)
    0.01
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_delta",
    "check_noise_multiplier",
    "check_num_steps",
    "check_pcg64_state",
    "check_positive",
    "check_probability",
    "check_sample_rate",
]


def _as_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}; "
            f"pass a Python float or int."
        )
    return float(value)


def check_noise_multiplier(value: Any, name: str = "noise_multiplier") -> float:
    """Validate a noise multiplier: a finite float ``>= 0``.

    Zero is accepted (it means "no noise" and gives an infinite epsilon).
    """
    x = _as_real(name, value)
    if not math.isfinite(x) or x < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}; it is the ratio of the "
            f"Gaussian noise standard deviation to the clipping norm (e.g. 1.1)."
        )
    return x


def check_sample_rate(value: Any, name: str = "sample_rate") -> float:
    """Validate a sampling rate ``q`` with ``0 < q <= 1``."""
    x = _as_real(name, value)
    if not (0.0 < x <= 1.0):
        raise ValueError(
            f"{name} must satisfy 0 < {name} <= 1, got {value!r}; it is the probability "
            f"that one example joins a batch (expected batch size / dataset size)."
        )
    return x


def check_num_steps(value: Any, name: str = "num_steps") -> int:
    """Validate a step count: an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(
                f"{name} must be an integer >= 1, got {value!r} of type "
                f"{type(value).__name__}; pass a whole number of steps."
            )
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; pass at least one step.")
    return int(value)


def check_delta(value: Any, name: str = "delta") -> float:
    """Validate a target delta with ``0 < delta < 1``."""
    x = _as_real(name, value)
    if not (0.0 < x < 1.0):
        raise ValueError(
            f"{name} must satisfy 0 < {name} < 1, got {value!r}; a common choice is "
            f"1 / (10 * dataset size), e.g. 1e-5."
        )
    return x


def check_positive(value: Any, name: str) -> float:
    """Validate a finite, strictly positive float."""
    x = _as_real(name, value)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return x


def check_probability(value: Any, name: str) -> float:
    """Validate a probability in ``[0, 1]``."""
    x = _as_real(name, value)
    if not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return x


def check_bool(value: Any, name: str) -> bool:
    """Validate a flag: exactly ``True`` or ``False`` (not a truthy object)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str], hint: str = "") -> str:
    """Validate a string option against its allowed values (``ValueError`` otherwise).

    Args:
        value: The value to check.
        name: The argument's name.
        choices: The allowed strings.
        hint: Text appended to the error message.
    """
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.{hint}")
    return value


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """Validate a Python integer ``>= minimum`` (bools are refused).

    Args:
        value: The value to check.
        name: The argument's name.
        minimum: The smallest accepted value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer >= {minimum}, got {value!r} of type "
            f"{type(value).__name__}; pass a Python int."
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_pcg64_state(state: Any, name: str = "state_dict['bit_generator_state']") -> dict[str, Any]:
    """Validate a numpy PCG64 bit-generator state by loading it into a scratch generator.

    Returns:
        A deep copy of the state, safe to assign to a generator.
    """
    if not isinstance(state, Mapping) or state.get("bit_generator") != "PCG64":
        raise ValueError(f"{name} must be a PCG64 state dict as returned by state_dict(), got {state!r}.")
    scratch = np.random.PCG64()
    try:
        scratch.state = copy.deepcopy(dict(state))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{name} is not a valid PCG64 state: {err}") from None
    return copy.deepcopy(dict(state))
