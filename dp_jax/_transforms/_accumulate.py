"""Virtual steps: accumulate clipped sums of physical chunks, noise once per logical batch.

Guarantee:
    Whatever the number of chunks, a logical batch is noised exactly once, with
    ``N(0, (sigma C)^2)`` on its total clipped sum, when ``apply_update`` is
    true; a chunk that only accumulates releases zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dp_jax import _tree
from dp_jax._grads import ClipAux, clip_per_example
from dp_jax._transforms._aggregate import (
    ClipAggregateState,
    _add_stats,
    _stats,
    _where_stats,
    _zero_stats,
)
from dp_jax._transforms._noise import _noise_and_scale, _noise_settings
from dp_jax._types import PyTree


def _zeros_shaped_like(fn: Callable[[], Any]) -> PyTree:
    """Zeros with the shapes and dtypes of the first output of ``fn()`` (traced abstractly)."""
    shapes = jax.eval_shape(fn)[0]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _accumulate(
    state: Any, clipped_sum: PyTree, clip_aux: ClipAux, apply_update: Any, release: Any, kept: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Add one chunk's clipped sum; at the logical end noise the total once.

    ``release(total, running) -> (out, extras)`` noises and scales the logical
    batch's sum; ``extras`` is whatever else it updates (the key, the adaptive
    bound), ``kept`` their current values for a chunk that only accumulates. Both
    branches live in one ``jax.lax.cond``: one compile serves both values of
    ``apply_update``.

    Returns:
        ``(out, extras, bookkeeping)``: ``out`` is zeros on a held chunk;
        ``bookkeeping`` holds the new ``grad_sum``, ``running``, ``last`` and
        ``num_chunks`` state fields.
    """
    total = jax.tree_util.tree_map(lambda acc, x: acc + x.astype(acc.dtype), state.grad_sum,
                                   clipped_sum)
    running = _add_stats(state.running, _stats(clip_aux))
    apply = jnp.asarray(apply_update, dtype=bool)

    def do_release():
        out, extras = release(total, running)
        return out, extras, _tree.tree_zeros_like(total)

    def hold():
        return _zeros_shaped_like(do_release), kept, total

    out, extras, grad_sum = jax.lax.cond(apply, do_release, hold)
    bookkeeping = {
        "grad_sum": grad_sum,
        "running": _where_stats(apply, _zero_stats(), running),
        "last": _where_stats(apply, running, state.last),
        "num_chunks": jnp.where(apply, 0, state.num_chunks + 1).astype(jnp.int32),
    }
    return out, extras, bookkeeping


def _fresh_bookkeeping(params: PyTree) -> dict[str, Any]:
    """Empty accumulators; the clipped sum is float32 or wider whatever the parameters' dtype."""
    return {
        "grad_sum": _tree.tree_zeros_like(_tree.tree_wide(params)), "running": _zero_stats(),
        "last": _zero_stats(), "num_chunks": jnp.zeros((), jnp.int32),
    }


class DPAccumulateState(NamedTuple):
    """State of :func:`dp_accumulate`.

    Attributes:
        grad_sum: Clipped sum of the physical chunks of the current logical batch (float32
            or wider whatever the parameters' dtype).
        key: PRNG key (advanced only when noise is added; ``None`` in key-free mode).
        running: Statistics of the current logical batch so far.
        last: Statistics of the last completed logical batch.
        num_chunks: Physical chunks accumulated in the current logical batch.
    """

    grad_sum: PyTree
    key: jax.Array
    running: ClipAggregateState
    last: ClipAggregateState
    num_chunks: jax.Array


def dp_accumulate_clipped_sums(
    max_grad_norm: Any,
    noise_multiplier: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    loss_reduction: str = "mean",
    clipping: str = "flat",
) -> optax.GradientTransformationExtraArgs:
    """Virtual steps over clipped sums: accumulate chunks, noise once per logical step.

    ``update(clipped_sum, state, params=None, *, clip_aux, apply_update,
    noise=None, **extra)`` takes the clipped sum of ONE physical chunk (from a
    gradient function with the contract of :func:`dp_jax.clipped_grad`, clipped
    with this transformation's ``max_grad_norm``) and its
    :class:`~dp_jax.ClipAux`. The sum is added to ``state.grad_sum``; when
    ``apply_update`` (a possibly traced bool) is true, noise
    ``N(0, (sigma C)^2)`` is added *once* to the accumulated sum, the result is
    divided by ``expected_batch_size`` (``"mean"``) and returned, and the
    accumulator resets; otherwise the output is zeros. One compile serves both.
    The accumulator, the noise and the division are float32 or wider; the output is
    rounded once, to the dtypes of ``params`` (of ``clipped_sum`` without ``params``).

    Use :func:`dp_multi_steps` to gate the optimizer after it, and
    ``optax.inject_hyperparams`` (``max_grad_norm`` and ``noise_multiplier`` not
    static) to change the bound or multiplier between logical steps; read the
    bound to clip with from the state with :func:`current_hyperparams`.

    Args:
        max_grad_norm: The bound(s) the chunks were clipped with: ``C`` (flat) or
            per-layer bounds (noise norm ``sqrt(sum C_i^2)``).
        noise_multiplier: ``sigma >= 0``.
        expected_batch_size: Expected *logical* batch size ``int(N * q) >= 1``.
        key: A JAX PRNG key, or ``None`` (key-free: ``noise=`` is then required).
        loss_reduction: ``"mean"`` or ``"sum"``.
        clipping: ``"flat"`` or ``"per_layer"``.

    Returns:
        The transformation; its state is a :class:`DPAccumulateState`.
    """
    std, denominator = _noise_settings(noise_multiplier, max_grad_norm, expected_batch_size,
                                       loss_reduction, clipping)

    def init_fn(params: PyTree) -> DPAccumulateState:
        return DPAccumulateState(key=key, **_fresh_bookkeeping(params))

    def update_fn(clipped_sum, state, params=None, *, clip_aux, apply_update, noise=None,
                  **extra):
        del extra
        like = clipped_sum if params is None else params

        def release(total, running):
            del running
            out, next_key = _noise_and_scale(total, state.key, std, denominator, noise)
            return _tree.tree_cast_like(out, like), next_key  # float32 until here

        out, next_key, book = _accumulate(state, clipped_sum, clip_aux, apply_update, release,
                                          state.key)
        return out, DPAccumulateState(key=next_key, **book)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_accumulate(
    max_grad_norm: Any,
    noise_multiplier: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    loss_reduction: str = "mean",
    clipping: str = "flat",
) -> optax.GradientTransformationExtraArgs:
    """Virtual steps: accumulate clipped sums of physical chunks, noise once per logical step.

    ``update(per_example_grads, state, params=None, *, mask=None, apply_update,
    noise=None, **extra)``: :func:`dp_jax.clip_per_example` followed by
    :func:`dp_accumulate_clipped_sums` (see it for what happens to the sum). When
    ``apply_update`` is true the noised, averaged sum of the logical batch is
    returned and the accumulator resets; otherwise the output is zeros.

    The optimizer after it must only step when ``apply_update`` is true (zeros are
    not a no-op for momentum, Adam or weight decay): wrap it with
    :func:`dp_multi_steps` rather than ``optax.chain``.

    Args:
        max_grad_norm: Clipping bound(s).
        noise_multiplier: ``sigma >= 0``.
        expected_batch_size: Expected *logical* batch size ``int(N * q) >= 1``.
        key: A JAX PRNG key, or ``None`` (key-free: ``noise=`` is then required).
        loss_reduction: ``"mean"`` or ``"sum"``.
        clipping: ``"flat"`` or ``"per_layer"``.

    Returns:
        The transformation; its state is a :class:`DPAccumulateState`.
    """
    sums = dp_accumulate_clipped_sums(max_grad_norm, noise_multiplier, expected_batch_size,
                                      key, loss_reduction=loss_reduction, clipping=clipping)

    def update_fn(updates, state, params=None, *, apply_update, mask=None, noise=None, **extra):
        del extra
        clipped, aux = clip_per_example(updates, max_grad_norm, mask, clipping=clipping)
        like = updates if params is None else params  # the output's dtypes
        return sums.update(clipped, state, like, clip_aux=aux, apply_update=apply_update,
                           noise=noise)

    return optax.GradientTransformationExtraArgs(sums.init, update_fn)


class DPMultiStepsState(NamedTuple):
    """State of :func:`dp_multi_steps`: the accumulator's and the inner optimizer's."""

    dp_state: PyTree
    inner_state: PyTree


def dp_multi_steps(
    dp_accumulator: optax.GradientTransformation,
    inner_optimizer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Gate an optimizer with ``apply_update``, as ``optax.MultiSteps`` does.

    ``update(updates, state, params=None, *, apply_update, mask=None,
    clip_aux=None, noise=None, count_noise=None, **extra)`` runs
    ``dp_accumulator`` on every physical chunk (per-example gradients with
    ``mask`` for :func:`dp_accumulate`, or a clipped sum with ``clip_aux`` for
    :func:`dp_accumulate_clipped_sums` / :func:`dp_accumulate_clipped_sums_adaptive`) and the
    inner optimizer only when ``apply_update`` is true (one ``jax.lax.cond``,
    one compile); otherwise the output is zeros and the inner state is unchanged.
    ``**extra`` goes to both.

    Args:
        dp_accumulator: :func:`dp_accumulate`, :func:`dp_accumulate_clipped_sums` or
            :func:`dp_accumulate_clipped_sums_adaptive` (optionally with injected
            hyperparameters).
        inner_optimizer: Any optax optimizer (e.g. ``optax.adamw(1e-3)``).

    Returns:
        The transformation; its state is a :class:`DPMultiStepsState`.
    """
    dp_tx = optax.with_extra_args_support(dp_accumulator)
    inner = optax.with_extra_args_support(inner_optimizer)

    def init_fn(params: PyTree) -> DPMultiStepsState:
        return DPMultiStepsState(dp_tx.init(params), inner.init(params))

    def update_fn(updates, state, params=None, *, apply_update, mask=None, clip_aux=None,
                  noise=None, count_noise=None, **extra):
        dp_args = {"mask": mask, "clip_aux": clip_aux, "noise": noise, "count_noise": count_noise}
        dp_args = {k: v for k, v in dp_args.items() if v is not None}
        dp_updates, dp_state = dp_tx.update(
            updates, state.dp_state, params, apply_update=apply_update, **dp_args, **extra
        )

        def step():
            return inner.update(dp_updates, state.inner_state, params, **extra)

        def skip():
            return _zeros_shaped_like(step), state.inner_state

        out, inner_state = jax.lax.cond(jnp.asarray(apply_update, dtype=bool), step, skip)
        return out, DPMultiStepsState(dp_state, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


dp_accumulate_sums = dp_accumulate_clipped_sums
"""Former name of :func:`dp_accumulate_clipped_sums`, kept as an alias."""
