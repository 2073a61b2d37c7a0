"""Clip per-example gradients, sum, noise once and average: DP-SGD and DP-Adam.

Guarantee:
    For a Poisson-sampled batch, one ``update`` of :func:`dp_aggregate` releases
    ``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / m``: the sampled Gaussian
    mechanism with noise multiplier ``sigma`` on a query of L2 sensitivity ``C``
    (``sqrt(sum C_i^2)`` for per-layer clipping), post-processed by the public
    division by ``m = expected_batch_size``, provided the key is secret and
    never reused.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dp_jax import _tree
from dp_jax._grads import ClipAux, clip_per_example
from dp_jax._transforms._noise import (
    NoiseState,
    _denominator,
    _noise_and_scale,
    _noise_settings,
    _scale,
)
from dp_jax._transforms._validation import (
    _check_clipping,
    _check_expected_batch_size,
    _check_reduction,
)
from dp_jax._types import PyTree


class ClipAggregateState(NamedTuple):
    """Statistics of the last clipping pass (int32 scalars).

    Attributes:
        num_unclipped: Masked-in examples with a finite norm ``<= C``.
        num_nonfinite: Masked-in examples with a non-finite norm (dropped).
        num_examples: Masked-in examples (the realised batch size: do not release).
    """

    num_unclipped: jax.Array
    num_nonfinite: jax.Array
    num_examples: jax.Array


def _stats(aux: ClipAux) -> ClipAggregateState:
    return ClipAggregateState(aux.num_unclipped, aux.num_nonfinite, aux.num_examples)


def _zero_stats() -> ClipAggregateState:
    z = jnp.zeros((), jnp.int32)
    return ClipAggregateState(z, z, z)


def _where_stats(pred: jax.Array, a: ClipAggregateState, b: ClipAggregateState):
    return ClipAggregateState(*(jnp.where(pred, x, y) for x, y in zip(a, b)))


def _add_stats(a: ClipAggregateState, b: ClipAggregateState) -> ClipAggregateState:
    return ClipAggregateState(*(x + y for x, y in zip(a, b)))


def clip_and_aggregate(
    max_grad_norm: Any,
    expected_batch_size: Any,
    *,
    loss_reduction: str = "mean",
    clipping: str = "flat",
) -> optax.GradientTransformationExtraArgs:
    """Clip per-example gradients, sum them, and divide by the expected batch size.

    ``update(per_example_grads, state, params=None, *, mask=None, **extra)`` returns
    ``sum_{i: mask_i} clip(g_i) / expected_batch_size`` for ``"mean"`` (never the
    realised or padded batch size) and the plain clipped sum for ``"sum"``. No
    noise: chain :func:`add_gaussian_noise` after it, or use :func:`dp_aggregate`.

    Args:
        max_grad_norm: ``C`` (flat), or per-layer bounds (see
            :func:`dp_jax.clip_per_example`).
        expected_batch_size: ``int(N * q) >= 1``.
        loss_reduction: ``"mean"`` or ``"sum"``.
        clipping: ``"flat"`` or ``"per_layer"``.

    Returns:
        The transformation; its state is a :class:`ClipAggregateState`.
    """
    _check_reduction(loss_reduction)
    _check_expected_batch_size(expected_batch_size)
    _check_clipping(clipping, max_grad_norm)
    denominator = _denominator(loss_reduction, expected_batch_size)

    def init_fn(params: PyTree) -> ClipAggregateState:
        del params
        return _zero_stats()

    def update_fn(updates, state, params=None, *, mask=None, **extra):
        del state, extra
        clipped, aux = clip_per_example(updates, max_grad_norm, mask, clipping=clipping)
        like = updates if params is None else params
        return _tree.tree_cast_like(_scale(clipped, denominator), like), _stats(aux)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DPAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`: clipping statistics and the noise key."""

    clip_state: ClipAggregateState
    noise_state: NoiseState


def dp_aggregate(
    noise_multiplier: Any,
    max_grad_norm: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    loss_reduction: str = "mean",
    clipping: str = "flat",
) -> optax.GradientTransformationExtraArgs:
    """Clip, sum, add Gaussian noise once, and average: the DP part of DP-SGD.

    Equivalent to ``optax.chain(clip_and_aggregate(...), add_gaussian_noise(...))``
    in distribution, computed as ``(clipped_sum + noise) / m`` (the order of
    ``dp_torch``). ``update(per_example_grads, state, params=None, *, mask=None,
    noise=None, **extra)``.

    Args:
        noise_multiplier: ``sigma >= 0`` (may be an injected hyperparameter).
        max_grad_norm: ``C > 0`` (flat, may be injected) or per-layer bounds.
        expected_batch_size: ``int(N * q) >= 1``.
        key: A JAX PRNG key, or ``None`` (key-free: ``noise=`` is then required).
        loss_reduction: ``"mean"`` or ``"sum"``.
        clipping: ``"flat"`` or ``"per_layer"`` (noise norm ``sqrt(sum C_i^2)``).

    Returns:
        The transformation; its state is a :class:`DPAggregateState`.
    """
    std, denominator = _noise_settings(noise_multiplier, max_grad_norm, expected_batch_size,
                                       loss_reduction, clipping)

    def init_fn(params: PyTree) -> DPAggregateState:
        del params
        return DPAggregateState(_zero_stats(), NoiseState(key=key))

    def update_fn(updates, state, params=None, *, mask=None, noise=None, **extra):
        del extra
        clipped, aux = clip_per_example(updates, max_grad_norm, mask, clipping=clipping)
        out, next_key = _noise_and_scale(clipped, state.noise_state.key, std, denominator, noise,
                                         updates if params is None else params)
        return out, DPAggregateState(_stats(aux), NoiseState(next_key))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_sgd(
    learning_rate: Any,
    noise_multiplier: Any,
    max_grad_norm: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    loss_reduction: str = "mean",
    clipping: str = "flat",
) -> optax.GradientTransformationExtraArgs:
    """DP-SGD: ``optax.chain(dp_aggregate(...), optax.sgd(...))``.

    Works with ``optax.inject_hyperparams(dp_sgd, static_args=("key",
    "expected_batch_size"))`` so ``noise_multiplier`` and ``max_grad_norm`` can be
    changed or scheduled between steps (record them with
    :func:`current_hyperparams`).

    Args:
        learning_rate: Learning rate or schedule.
        noise_multiplier: ``sigma >= 0``.
        max_grad_norm: Clipping bound(s).
        expected_batch_size: ``int(N * q) >= 1``.
        key: A JAX PRNG key, or ``None`` (key-free: ``noise=`` is then required).
        momentum: Optional momentum (as ``optax.sgd``).
        nesterov: Nesterov momentum.
        loss_reduction: ``"mean"`` or ``"sum"``.
        clipping: ``"flat"`` or ``"per_layer"``.

    Returns:
        The chained transformation; ``update`` takes per-example gradients and ``mask=``.
    """
    return optax.chain(
        dp_aggregate(noise_multiplier, max_grad_norm, expected_batch_size, key,
                     loss_reduction=loss_reduction, clipping=clipping),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def dp_adam(
    learning_rate: Any,
    noise_multiplier: Any,
    max_grad_norm: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    loss_reduction: str = "mean",
    clipping: str = "flat",
) -> optax.GradientTransformationExtraArgs:
    """DP-Adam: ``optax.chain(dp_aggregate(...), optax.adam(...))``.

    Args:
        learning_rate: Learning rate or schedule.
        noise_multiplier: As for :func:`dp_sgd`.
        max_grad_norm: As for :func:`dp_sgd`.
        expected_batch_size: As for :func:`dp_sgd`.
        key: As for :func:`dp_sgd`.
        b1: Adam's first-moment decay.
        b2: Adam's second-moment decay.
        eps: Adam's epsilon.
        loss_reduction: As for :func:`dp_sgd`.
        clipping: As for :func:`dp_sgd`.

    Returns:
        The chained transformation.
    """
    return optax.chain(
        dp_aggregate(noise_multiplier, max_grad_norm, expected_batch_size, key,
                     loss_reduction=loss_reduction, clipping=clipping),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
    )
