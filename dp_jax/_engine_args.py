"""Argument checks of ``PrivacyEngine.make_private`` and the plan of a run they give."""

from __future__ import annotations

import dataclasses
import numbers
import secrets
from collections.abc import Mapping
from typing import Any, Optional

import jax

from dp_jax._data import count_examples
from dp_jax._types import PyTree
from dpcore import clipping as core_clipping
from dpcore import noise as core_noise
from dpcore import sampling as core_sampling
from dpcore.checks import check_bool, check_choice, check_int

__all__ = [
    "RunPlan",
    "check_int_or_none",
    "clip_bound",
    "noise_key",
    "plan_run",
    "resolve_sample_rate",
]


_CLIPPINGS = ("flat", "per_layer", "adaptive")
_GRAD_SAMPLE_MODES = ("vmap", "ghost")
_LOSS_REDUCTIONS = ("mean", "sum")
_ADAPTIVE_KWARGS = core_clipping.ADAPTIVE_OPTIONS


def _check_optimizer(optimizer: Any) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (with init and update), got "
            f"{type(optimizer).__name__}; pass e.g. optax.sgd(0.1). The engine chains the DP "
            "aggregation in front of it."
        )


def check_int_or_none(value: Any, name: str) -> None:
    """Refuse anything but ``None`` or a Python int ``>= 1``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1 or None, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}.")


def _check_max_grad_norm(max_grad_norm: Any, clipping: str, params: PyTree) -> None:
    if clipping == "per_layer":
        leaves = jax.tree_util.tree_leaves(params)
        bounds = max_grad_norm
        if jax.tree_util.tree_structure(max_grad_norm) == jax.tree_util.tree_structure(params):
            bounds = jax.tree_util.tree_leaves(max_grad_norm)
        if not isinstance(bounds, (list, tuple)) or len(bounds) != len(leaves):
            raise ValueError(
                f'clipping="per_layer" needs max_grad_norm as one bound per parameter leaf '
                f"({len(leaves)} leaves), as a pytree like params or a list in leaf order; got "
                f"{max_grad_norm!r}."
            )
        core_clipping.per_layer_noise_norm([float(b) for b in bounds])
        return
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
        raise ValueError(
            f"clipping={clipping!r} needs max_grad_norm as one float > 0, got {max_grad_norm!r}; "
            'for one bound per parameter use clipping="per_layer".'
        )
    core_noise.noise_std(1.0, max_grad_norm)


def _check_adaptive_kwargs(
    kwargs: Mapping[str, Any], clipping: str, noise_multiplier: float, max_grad_norm: Any,
    expected_batch_size: Optional[int],
) -> None:
    core_clipping.check_adaptive_options(
        kwargs, clipping, noise_multiplier, max_grad_norm, expected_batch_size, require_all=False,
        batch_hint="use a larger sample_rate.",
    )


def resolve_sample_rate(sample_rate: Any, batch_size: Any, num_samples: int) -> float:
    """The logical sample rate from exactly one of ``sample_rate`` and ``batch_size``."""
    if (sample_rate is None) == (batch_size is None):
        raise ValueError(
            f"make_private needs exactly one of sample_rate and batch_size, got "
            f"sample_rate={sample_rate!r} and batch_size={batch_size!r}; pass sample_rate=q, or "
            "batch_size=B for q = B / len(data) (the EXPECTED Poisson batch size)."
        )
    if batch_size is not None:
        check_int_or_none(batch_size, "batch_size")
        if batch_size > num_samples:
            raise ValueError(
                f"batch_size={batch_size} exceeds the data size {num_samples}; the sample rate "
                "batch_size / len(data) must be at most 1."
            )
        return batch_size / num_samples
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}.")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
    return float(sample_rate)


def noise_key(key: Any, seed: Optional[int], secure_mode: bool) -> Optional[jax.Array]:
    """The noise key: none in secure mode, else ``key``, one derived from ``seed``, or fresh."""
    if secure_mode:
        return None  # key-free transformation: the noise comes from the host (OS entropy)
    if key is not None:
        return key
    if seed is not None:
        return jax.random.fold_in(jax.random.key(seed), 0x6E6F6973)  # "nois"
    return jax.random.key(secrets.randbits(63))


def clip_bound(max_grad_norm: Any, clipping: str, params: PyTree) -> Any:
    """The (validated) bound as the gradient function and the transformation take it."""
    if clipping != "per_layer":
        return float(max_grad_norm)
    if jax.tree_util.tree_structure(max_grad_norm) == jax.tree_util.tree_structure(params):
        return max_grad_norm
    return list(max_grad_norm)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What the arguments of a run fix: data size, sample rate and expected batch size."""

    num_samples: int
    sample_rate: float
    expected_batch_size: Optional[int]


def plan_run(
    *, secure_mode: bool, loss_fn: Any, params: PyTree, optimizer: Any, data: PyTree,
    noise_multiplier: Any, max_grad_norm: Any, sample_rate: Any, batch_size: Any, steps: Any,
    clipping: Any, poisson_sampling: Any, max_physical_batch_size: Any, loss_reduction: Any, key: Any,
    seed: Any, microbatch_size: Any, grad_sample_mode: Any,
    adaptive_kwargs: Mapping[str, Any],
) -> RunPlan:
    """Validate every argument of ``PrivacyEngine.make_private``; change nothing.

    Returns:
        The data size, sample rate and expected batch size of the run.
    """
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(params, example) -> scalar, got "
            f"{type(loss_fn).__name__}."
        )
    _check_optimizer(optimizer)
    check_bool(poisson_sampling, "poisson_sampling")
    check_choice(loss_reduction, "loss_reduction", _LOSS_REDUCTIONS,
                  ' "mean" divides the noised sum by the expected batch size.')
    check_choice(clipping, "clipping", _CLIPPINGS)
    check_choice(grad_sample_mode, "grad_sample_mode", _GRAD_SAMPLE_MODES,
                 ' "vmap" clips vmapped per-example gradients; "ghost" uses ghost clipping.')
    check_int_or_none(steps, "steps")
    check_int_or_none(max_physical_batch_size, "max_physical_batch_size")
    check_int_or_none(microbatch_size, "microbatch_size")
    if grad_sample_mode == "ghost" and microbatch_size is not None:
        raise ValueError(
            f'grad_sample_mode="ghost" does not take microbatch_size (got '
            f"{microbatch_size!r}): ghost clipping never stores per-example gradients. Pass "
            "microbatch_size=None, "
            'or grad_sample_mode="vmap" to bound vmap\'s memory with microbatches.'
        )
    if secure_mode and (seed is not None or key is not None):
        raise ValueError(
            f"Passing a seed or key is prohibited in secure mode: got seed={seed!r}, "
            f"key={key!r}. Pass neither (secure sampling and noise keys come from OS "
            "entropy), or PrivacyEngine(secure_mode=False) for reproducible runs."
        )
    if secure_mode and not poisson_sampling:
        raise ValueError(
            "secure_mode=True requires poisson_sampling=True: the accountant's guarantee "
            "assumes Poisson batches, and shuffled batches come from a seedable generator."
        )
    if seed is not None:
        check_int(seed, "seed", 0)
    core_noise.noise_std(noise_multiplier, 1.0)
    _check_max_grad_norm(max_grad_norm, clipping, params)
    num_samples = count_examples(data)
    q = resolve_sample_rate(sample_rate, batch_size, num_samples)
    m = core_sampling.expected_batch_size(num_samples, q, loss_reduction)
    if not poisson_sampling and m is None:
        raise ValueError("poisson_sampling=False needs int(N * sample_rate) >= 1.")
    _check_adaptive_kwargs(adaptive_kwargs, clipping, noise_multiplier, max_grad_norm, m)
    return RunPlan(num_samples=num_samples, sample_rate=q, expected_batch_size=m)
