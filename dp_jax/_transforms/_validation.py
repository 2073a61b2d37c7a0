"""Argument checks of the DP transformations (they accept traced hyperparameters)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dp_jax import _tree


def _check_reduction(loss_reduction: Any) -> str:
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f'loss_reduction must be "mean" or "sum", got {loss_reduction!r}.')
    return loss_reduction


def _check_expected_batch_size(expected_batch_size: Any) -> Any:
    if isinstance(expected_batch_size, (bool, float, str)) or np.ndim(expected_batch_size) != 0:
        raise TypeError(
            f"expected_batch_size must be an int >= 1, got {expected_batch_size!r}; use "
            f"dpcore.sampling.expected_batch_size(num_samples, sample_rate)."
        )
    value = _tree.concrete_or_none(expected_batch_size)
    if value is not None:
        if not np.issubdtype(value.dtype, np.integer):
            raise TypeError(
                f"expected_batch_size must be an int >= 1, got {expected_batch_size!r}."
            )
        if value < 1:
            raise ValueError(f"expected_batch_size must be >= 1, got {expected_batch_size!r}.")
    return expected_batch_size


def _check_sigma(noise_multiplier: Any) -> Any:
    if isinstance(noise_multiplier, (bool, str)) or np.ndim(noise_multiplier) != 0:
        raise TypeError(f"noise_multiplier must be a real number >= 0, got {noise_multiplier!r}.")
    value = _tree.concrete_or_none(noise_multiplier)
    if value is not None and not (np.isfinite(value) and value >= 0):
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}."
        )
    return noise_multiplier


def _check_clipping(clipping: Any, max_grad_norm: Any) -> str:
    if clipping not in ("flat", "per_layer"):
        raise ValueError(
            f'clipping must be "flat" or "per_layer", got {clipping!r}; for adaptive clipping '
            f"use dp_aggregate_adaptive."
        )
    if clipping == "flat":
        if isinstance(max_grad_norm, (bool, str)) or np.ndim(max_grad_norm) != 0:
            raise ValueError(
                f'clipping="flat" needs a single max_grad_norm > 0, got {max_grad_norm!r}; use '
                f'clipping="per_layer" for one bound per parameter.'
            )
        value = _tree.concrete_or_none(max_grad_norm)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}.")
    return clipping
