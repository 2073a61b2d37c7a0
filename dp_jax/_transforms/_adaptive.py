"""Adaptive clipping: a flat bound that tracks a quantile of the norms (Andrew et al. 2021).

Guarantee:
    The gradient noise ``z_grad * C`` and the count noise ``N(0, sigma_b^2)``
    together form a Gaussian mechanism with the accounted ``noise_multiplier``;
    a logical batch in several chunks is released once, with the same update,
    count and new bound as one chunk.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dp_jax import _tree
from dp_jax._grads import clip_per_example
from dp_jax._transforms._accumulate import _accumulate, _fresh_bookkeeping
from dp_jax._transforms._aggregate import ClipAggregateState, _stats, _zero_stats
from dp_jax._transforms._noise import _denominator, _noise_and_scale, _require_noise
from dp_jax._transforms._validation import (
    _check_expected_batch_size,
    _check_reduction,
    _check_sigma,
)
from dp_jax._types import PyTree
from dpcore import clipping as core_clipping


def adaptive_clip_update(
    max_grad_norm: Any,
    unclipped_count: Any,
    noise_on_count: Any,
    expected_batch_size: Any,
    target_unclipped_quantile: Any,
    learning_rate: Any,
    min_clipbound: Any,
    max_clipbound: Any,
    *,
    batch_size: Any,
) -> tuple[jax.Array, jax.Array]:
    """jnp version of :func:`dpcore.clipping.adaptive_clip_update` (runs under jit).

    ``b = clip((count - batch_size/2 + noise) / m + 1/2, 0, 1)`` and
    ``C <- clip(C exp(-eta (b - gamma)), min_clipbound, max_clipbound)``.

    Returns:
        ``(new_bound, b)``, in the dtype of ``max_grad_norm``.
    """
    c = jnp.asarray(max_grad_norm)
    dtype = c.dtype
    m = jnp.asarray(expected_batch_size, dtype)
    count = jnp.asarray(unclipped_count, dtype)
    half = jnp.asarray(batch_size, dtype) / 2
    frac = jnp.clip((count - half + jnp.asarray(noise_on_count, dtype)) / m + 0.5, 0.0, 1.0)
    gamma = jnp.asarray(target_unclipped_quantile, dtype)
    step = jnp.exp(-jnp.asarray(learning_rate, dtype) * (frac - gamma))
    new = jnp.clip(c * step, jnp.asarray(min_clipbound, dtype), jnp.asarray(max_clipbound, dtype))
    return new, frac


def _gradient_multiplier(noise_multiplier: Any, count_std: Any, m: Any) -> Any:
    concrete = [_tree.concrete_or_none(v) for v in (noise_multiplier, count_std, m)]
    if all(v is not None for v in concrete):
        return core_clipping.adaptive_noise_multipliers(
            float(concrete[0]), float(concrete[1]), int(concrete[2])
        )
    z = jnp.asarray(noise_multiplier)
    inv = jnp.where(z > 0, z, 1.0) ** -2 - (2.0 * jnp.asarray(count_std, z.dtype)) ** -2
    return jnp.where(z > 0, inv ** -0.5, 0.0)


class _AdaptiveRule(NamedTuple):
    """What one adaptive-clipping release needs (built once by :func:`_adaptive_rule`)."""

    spec: core_clipping.AdaptiveClipping
    count_std: Any
    z_grad: Any
    expected_batch_size: Any
    denominator: Any

    def init_bound(self, params: PyTree) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(params)
        dtype = _tree.wide_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
        return jnp.asarray(self.spec.initial_max_grad_norm, dtype)

    def release(
        self, total: PyTree, num_unclipped: PyTree, num_examples: Any, c: jax.Array,
        key: Optional[jax.Array], noise: PyTree, count_noise: PyTree, out_like: PyTree,
    ) -> tuple[Any, tuple[Optional[jax.Array], jax.Array, jax.Array]]:
        """Noise the clipped sum (``z_grad * C``) and the count once; move the bound.

        Returns:
            ``(out, (next_key, new_bound, noised_fraction))``.
        """
        noise_key, count_key = (None, None) if key is None else jax.random.split(key)
        out, next_key = _noise_and_scale(total, noise_key, self.z_grad * c, self.denominator,
                                         noise, out_like)
        if count_noise is None:
            if count_key is None:
                _require_noise(count_noise, "count_noise")
            draw = jax.random.normal(count_key, (), c.dtype)
            count_noise = draw * jnp.asarray(self.count_std, c.dtype)
        spec = self.spec
        new_c, frac = adaptive_clip_update(
            c, num_unclipped, count_noise, self.expected_batch_size,
            spec.target_unclipped_quantile, spec.clipbound_learning_rate,
            spec.min_clipbound, spec.max_clipbound, batch_size=num_examples,
        )
        return out, (next_key, new_c, frac)


def _adaptive_rule(
    noise_multiplier: Any, initial_max_grad_norm: Any, expected_batch_size: Any, *,
    loss_reduction: str, options: dict[str, Any],
) -> _AdaptiveRule:
    """Validate the adaptive arguments and derive the count and gradient noise scales."""
    _check_sigma(noise_multiplier)
    _check_reduction(loss_reduction)
    _check_expected_batch_size(expected_batch_size)
    if isinstance(initial_max_grad_norm, core_clipping.AdaptiveClipping):
        spec = initial_max_grad_norm
    else:
        spec = core_clipping.AdaptiveClipping(
            initial_max_grad_norm=float(initial_max_grad_norm), **options
        )
    m_value = _tree.concrete_or_none(expected_batch_size)
    count_std = spec.count_noise_std(int(m_value)) if m_value is not None else (
        spec.unclipped_num_std if spec.unclipped_num_std is not None else expected_batch_size / 20.0
    )
    z_grad = _gradient_multiplier(noise_multiplier, count_std, expected_batch_size)
    return _AdaptiveRule(spec, count_std, z_grad, expected_batch_size,
                         _denominator(loss_reduction, expected_batch_size))


class AdaptiveClipState(NamedTuple):
    """State of :func:`dp_aggregate_adaptive`.

    Attributes:
        max_grad_norm: The current clipping bound ``C`` (used at the next update).
        key: PRNG key.
        clip_state: Statistics of the last clipping pass.
        noised_unclipped_fraction: The noised, clamped fraction ``b`` of the last
            step (a post-processing of the privatised count: safe to log).
    """

    max_grad_norm: jax.Array
    key: jax.Array
    clip_state: ClipAggregateState
    noised_unclipped_fraction: jax.Array


def dp_aggregate_adaptive(
    noise_multiplier: Any,
    initial_max_grad_norm: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    target_unclipped_quantile: float = 0.5,
    clipbound_learning_rate: float = 0.2,
    max_clipbound: float = 1e8,
    min_clipbound: float = 1e-8,
    unclipped_num_std: Optional[float] = None,
    loss_reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
    """Flat clipping whose bound tracks a quantile of the norms (Andrew et al. 2021).

    Each update clips with the state's bound ``C``, adds gradient noise with
    multiplier ``z_grad = dpcore.clipping.adaptive_noise_multipliers(sigma,
    sigma_b, m)`` (times ``C``), draws the count noise ``N(0, sigma_b^2)``
    (``sigma_b = unclipped_num_std`` or ``m / 20``) and moves the bound with
    :func:`adaptive_clip_update`. Gradient and count together are a Gaussian
    mechanism with the user's ``sigma``: account with ``noise_multiplier``.
    For a logical batch split into physical chunks use
    :func:`dp_accumulate_clipped_sums_adaptive`.

    ``update(per_example_grads, state, params=None, *, mask=None, noise=None,
    count_noise=None, **extra)``; ``noise`` / ``count_noise`` are host-drawn
    noise for reproducibility mode (noise on the sum scale; one scalar draw).

    Args:
        noise_multiplier: The accounted ``sigma >= 0``.
        initial_max_grad_norm: Starting bound, or a
            :class:`dpcore.clipping.AdaptiveClipping` spec (then the keyword
            options must be left at their defaults).
        expected_batch_size: ``m = int(N * q) >= 1`` (also the fraction's denominator).
        key: A JAX PRNG key, or ``None`` (key-free: ``noise=`` and
            ``count_noise=`` are then required).
        target_unclipped_quantile: ``gamma`` in ``[0, 1]``.
        clipbound_learning_rate: ``eta >= 0``.
        max_clipbound: Upper limit of the bound.
        min_clipbound: Lower limit of the bound.
        unclipped_num_std: ``sigma_b > sigma / 2``; ``None`` means ``m / 20``.
        loss_reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The transformation; its state is an :class:`AdaptiveClipState`.
    """
    rule = _adaptive_rule(
        noise_multiplier, initial_max_grad_norm, expected_batch_size,
        loss_reduction=loss_reduction, options=dict(
            target_unclipped_quantile=target_unclipped_quantile,
            clipbound_learning_rate=clipbound_learning_rate, max_clipbound=max_clipbound,
            min_clipbound=min_clipbound, unclipped_num_std=unclipped_num_std),
    )

    def init_fn(params: PyTree) -> AdaptiveClipState:
        bound = rule.init_bound(params)
        return AdaptiveClipState(
            max_grad_norm=bound, key=key, clip_state=_zero_stats(),
            noised_unclipped_fraction=jnp.zeros((), bound.dtype),
        )

    def update_fn(updates, state, params=None, *, mask=None, noise=None, count_noise=None,
                  **extra):
        del extra
        c = state.max_grad_norm
        clipped, aux = clip_per_example(updates, c, mask, clipping="flat")
        out, (next_key, new_c, frac) = rule.release(
            clipped, aux.num_unclipped, aux.num_examples, c, state.key, noise, count_noise,
            updates if params is None else params)
        return out, AdaptiveClipState(new_c, next_key, _stats(aux), frac)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DPAccumulateAdaptiveState(NamedTuple):
    """State of :func:`dp_accumulate_clipped_sums_adaptive`.

    Attributes:
        max_grad_norm: The current bound ``C``: clip every chunk of the current
            logical batch with it; it moves only when the logical batch ends.
        key: PRNG key (``None`` in key-free mode).
        grad_sum: Clipped sum of the chunks of the current logical batch.
        running: Statistics of the current logical batch so far.
        last: Statistics of the last completed logical batch.
        num_chunks: Physical chunks accumulated in the current logical batch.
        noised_unclipped_fraction: The noised, clamped fraction ``b`` of the last
            logical batch (a post-processing of the privatised count: safe to log).
    """

    max_grad_norm: jax.Array
    key: Optional[jax.Array]
    grad_sum: PyTree
    running: ClipAggregateState
    last: ClipAggregateState
    num_chunks: jax.Array
    noised_unclipped_fraction: jax.Array


def dp_accumulate_clipped_sums_adaptive(
    noise_multiplier: Any,
    initial_max_grad_norm: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    target_unclipped_quantile: float = 0.5,
    clipbound_learning_rate: float = 0.2,
    max_clipbound: float = 1e8,
    min_clipbound: float = 1e-8,
    unclipped_num_std: Optional[float] = None,
    loss_reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
    """Adaptive clipping over virtual steps: chunks' clipped sums in, one release per logical step.

    ``update(clipped_sum, state, params=None, *, clip_aux, apply_update,
    noise=None, count_noise=None, **extra)``. Every chunk of a logical batch must
    be clipped (flat) with the SAME bound, ``state.max_grad_norm``; their clipped
    sums and their unclipped and example counts accumulate. When ``apply_update``
    is true the release of :func:`dp_aggregate_adaptive` happens once, on the
    totals: gradient noise ``z_grad * C``, count noise ``N(0, sigma_b^2)``, the
    averaged noised sum returned and the bound moved by
    :func:`adaptive_clip_update` (with the logical batch's realised size inside
    the statistic, as :func:`dpcore.clipping.adaptive_clip_update`). So a logical
    batch in ``k`` chunks gives exactly the update, count and new bound of one
    chunk; the accountant steps once with ``noise_multiplier``.

    The arguments are those of :func:`dp_aggregate_adaptive`, with
    ``expected_batch_size`` that of the *logical* batch and, in key-free mode,
    ``noise=`` and ``count_noise=`` required on the releasing chunk only.

    Returns:
        The transformation; its state is a :class:`DPAccumulateAdaptiveState`.
    """
    rule = _adaptive_rule(
        noise_multiplier, initial_max_grad_norm, expected_batch_size,
        loss_reduction=loss_reduction, options=dict(
            target_unclipped_quantile=target_unclipped_quantile,
            clipbound_learning_rate=clipbound_learning_rate, max_clipbound=max_clipbound,
            min_clipbound=min_clipbound, unclipped_num_std=unclipped_num_std),
    )

    def init_fn(params: PyTree) -> DPAccumulateAdaptiveState:
        bound = rule.init_bound(params)
        return DPAccumulateAdaptiveState(
            max_grad_norm=bound, key=key, noised_unclipped_fraction=jnp.zeros((), bound.dtype),
            **_fresh_bookkeeping(params),
        )

    def update_fn(clipped_sum, state, params=None, *, clip_aux, apply_update, noise=None,
                  count_noise=None, **extra):
        del extra
        c = state.max_grad_norm
        like = clipped_sum if params is None else params

        def release(total, running):
            return rule.release(total, running.num_unclipped, running.num_examples, c,
                                state.key, noise, count_noise, like)

        kept = (state.key, c, state.noised_unclipped_fraction)
        out, (next_key, new_c, frac), book = _accumulate(
            state, clipped_sum, clip_aux, apply_update, release, kept)
        return out, DPAccumulateAdaptiveState(
            max_grad_norm=new_c, key=next_key, noised_unclipped_fraction=frac, **book)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


dp_accumulate_sums_adaptive = dp_accumulate_clipped_sums_adaptive
"""Former name of :func:`dp_accumulate_clipped_sums_adaptive`, kept as an alias."""
