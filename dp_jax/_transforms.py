"""DP-SGD as optax gradient transformations.

Two families, both ``(init, update)`` pairs whose state is a NamedTuple carrying
the PRNG key; nothing draws randomness on the host, so everything runs under
``jax.jit``:

* *per-example* transformations (:func:`clip_and_aggregate`, :func:`dp_aggregate`,
  :func:`dp_accumulate`, :func:`dp_aggregate_adaptive`, :func:`dp_sgd`, ...) take
  per-example gradients (a params-shaped pytree whose leaves have a leading batch
  axis) as their ``updates`` and clip them inside;
* *clipped-sum* transformations (:func:`dp_accumulate_sums`,
  :func:`dp_accumulate_sums_adaptive`) take the clipped SUM of one physical chunk
  and its :class:`~dp_jax.ClipAux` as ``update(clipped_sum, state, params, *,
  clip_aux, apply_update, noise=None)``: clipping happens before them, in any
  gradient function with the contract of :func:`dp_jax.clipped_grad` (vmap or
  ghost clipping, one device or a ``psum`` over a mesh). This is what
  :class:`dp_jax.PrivacyEngine` runs. The caller must clip with the bound the
  transformation adds noise for: the injected ``max_grad_norm`` (see
  :func:`current_hyperparams`) or, for adaptive clipping, the state's current
  ``max_grad_norm``.

The per-example transformations clip with :func:`dp_jax.clip_per_example` and
then run the same noise, accumulation and adaptive-bound code as the clipped-sum
ones (:func:`dp_accumulate` is literally :func:`dp_accumulate_sums` behind
``clip_per_example``).

Key-free mode. Every transformation accepts ``key=None``: it then never draws
noise itself and every ``update`` that adds noise must be given ``noise=`` (and
``count_noise=`` for adaptive clipping), else it raises when traced. This is how
secure mode feeds noise drawn on the host from OS entropy.

Formal guarantee. For a Poisson-sampled batch, one call of the ``update`` of
:func:`dp_aggregate` releases ``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / m``,
the sampled Gaussian mechanism with noise multiplier ``sigma`` on a query of L2
sensitivity ``C`` (``sqrt(sum C_i^2)`` for per-layer clipping), post-processed by
the public division by ``m = expected_batch_size``. The privacy cost of a run is
what the ``dpcore`` accountant reports for ``(sigma, q, steps)``, provided the
PRNG key is secret and never reused. JAX's PRNG is not a cryptographic or
floating-point-hardened sampler; for secure mode build the transformation with
``key=None``, draw the noise on the host with
``dpcore.noise.NoiseSource(secure_mode=True)`` and pass it as ``noise=``.

Shared noise ("reproducibility mode", used by the conformance suite). A host
callback is not used inside jit; instead the caller draws the noise on the host
(outside jit), in *JAX leaf order* (``jax.tree_util.tree_leaves(params)``), and
passes it to ``update(..., noise=noise_tree)``::

    source = dpcore.noise.NoiseSource(seed=0)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    std = sigma * C                                   # on the *sum*
    noise = treedef.unflatten([source.normal(x.shape, std) for x in leaves])
    updates, state = tx.update(grads, state, params, mask=mask, noise=noise)

The noise (float64 on the host) is cast to each leaf's dtype, added to the
clipped sum, and the result divided by the averaging denominator:
``(clipped_sum + noise) / m``, the order of ``dp_torch``'s ``DPOptimizer``.
Alternatively draw standard normals (``std=1``) and scale them with
:func:`noise_from_normals` (inside or outside jit). The key in the state is
still advanced, so a run can switch between the two modes.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import _tree
from dp_jax._grads import ClipAux, clip_per_example
from dpcore import clipping as core_clipping

__all__ = [
    "AdaptiveClipState",
    "ClipAggregateState",
    "DPAccumulateAdaptiveState",
    "DPAccumulateState",
    "DPAggregateState",
    "DPMultiStepsState",
    "NoiseState",
    "adaptive_clip_update",
    "add_gaussian_noise",
    "clip_and_aggregate",
    "current_hyperparams",
    "dp_accumulate",
    "dp_accumulate_sums",
    "dp_accumulate_sums_adaptive",
    "dp_adam",
    "dp_aggregate",
    "dp_aggregate_adaptive",
    "dp_multi_steps",
    "dp_sgd",
    "noise_from_normals",
]


# --------------------------------------------------------------------------- states


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


class NoiseState(NamedTuple):
    """State of :func:`add_gaussian_noise`: the PRNG key, split at every update."""

    key: jax.Array


class DPAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`: clipping statistics and the noise key."""

    clip_state: ClipAggregateState
    noise_state: NoiseState


class DPAccumulateState(NamedTuple):
    """State of :func:`dp_accumulate`.

    Attributes:
        grad_sum: Clipped sum of the physical chunks of the current logical batch.
        key: PRNG key (advanced only when noise is added; ``None`` in key-free mode).
        running: Statistics of the current logical batch so far.
        last: Statistics of the last completed logical batch.
        num_chunks: Physical chunks accumulated in the current logical batch.
    """

    grad_sum: Any
    key: jax.Array
    running: ClipAggregateState
    last: ClipAggregateState
    num_chunks: jax.Array


class DPMultiStepsState(NamedTuple):
    """State of :func:`dp_multi_steps`: the accumulator's and the inner optimizer's."""

    dp_state: Any
    inner_state: Any


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


class DPAccumulateAdaptiveState(NamedTuple):
    """State of :func:`dp_accumulate_sums_adaptive`.

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
    grad_sum: Any
    running: ClipAggregateState
    last: ClipAggregateState
    num_chunks: jax.Array
    noised_unclipped_fraction: jax.Array


# --------------------------------------------------------------------------- validation


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


def _noise_norm(max_grad_norm: Any, clipping: str) -> Any:
    """Sensitivity of the clipped sum: ``C`` or ``sqrt(sum C_i^2)``."""
    if clipping == "flat":
        return max_grad_norm
    leaves = jax.tree_util.tree_leaves(max_grad_norm)
    concrete = [_tree.concrete_or_none(b) for b in leaves]
    if all(v is not None for v in concrete):
        return core_clipping.per_layer_noise_norm([float(v) for v in concrete])
    return jnp.sqrt(sum(jnp.square(jnp.asarray(b)) for b in leaves))


def _denominator(loss_reduction: str, expected_batch_size: Any) -> Any:
    return expected_batch_size if loss_reduction == "mean" else None


# --------------------------------------------------------------------------- noise core


def noise_from_normals(normals_tree: Any, std: Any) -> Any:
    """Scale standard normals to noise: ``std * z`` leaf by leaf (pure, jit-friendly).

    Use it in reproducibility mode to turn standard normals drawn on the host
    (e.g. ``dpcore.noise.NoiseSource(seed).normal(shape, 1.0)`` per leaf, in JAX
    leaf order) into the ``noise=`` argument of the transformations' ``update``.
    The product is formed in the normals' dtype (float64 only with x64 enabled);
    for bit-identical parity with ``dp_torch`` draw ``source.normal(shape, std)``
    directly and pass that instead.

    Args:
        normals_tree: Pytree of arrays of standard normal draws.
        std: Standard deviation of the noise on the *sum*, ``sigma * C``.

    Returns:
        The pytree ``std * normals``.
    """
    return jax.tree_util.tree_map(lambda z: jnp.asarray(z) * std, normals_tree)


def _draw_noise(key: jax.Array, like: Any, std: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        dtype = jnp.result_type(x)
        out.append(jax.random.normal(k, jnp.shape(x), dtype) * jnp.asarray(std, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _cast_noise(noise: Any, like: Any) -> Any:
    if jax.tree_util.tree_structure(noise) != jax.tree_util.tree_structure(like):
        raise ValueError(
            f"noise must have the structure of the parameters "
            f"({jax.tree_util.tree_structure(like)}), got {jax.tree_util.tree_structure(noise)}."
        )
    return jax.tree_util.tree_map(
        lambda z, x: jnp.asarray(z).astype(jnp.result_type(x)), noise, like
    )


def _require_noise(value: Any, name: str) -> None:
    if value is None:
        raise ValueError(
            f"{name}=None, but this transformation was built with key=None (key-free, e.g. "
            f"secure mode) and cannot draw noise itself; pass {name}= drawn on the host, e.g. "
            "from dpcore.noise.NoiseSource(secure_mode=True), or build it with a JAX key."
        )


def _noise_and_scale(
    clipped_sum: Any, key: Optional[jax.Array], std: Any, denominator: Any, noise: Any = None
) -> tuple[Any, Optional[jax.Array]]:
    """``(clipped_sum + noise) / denominator`` and the advanced key (``None`` stays ``None``)."""
    if key is None:
        _require_noise(noise, "noise")
        next_key = None
    else:
        next_key, draw_key = jax.random.split(key)
    if noise is None:
        noise = _draw_noise(draw_key, clipped_sum, std)
    else:
        noise = _cast_noise(noise, clipped_sum)
    noised = jax.tree_util.tree_map(jnp.add, clipped_sum, noise)
    return _scale(noised, denominator), next_key


def _scale(tree: Any, denominator: Any) -> Any:
    if denominator is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: x / jnp.asarray(denominator, jnp.result_type(x)), tree
    )


def _stats(aux: ClipAux) -> ClipAggregateState:
    return ClipAggregateState(aux.num_unclipped, aux.num_nonfinite, aux.num_examples)


def _zero_stats() -> ClipAggregateState:
    z = jnp.zeros((), jnp.int32)
    return ClipAggregateState(z, z, z)


# --------------------------------------------------------------------------- transforms


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

    def init_fn(params: Any) -> ClipAggregateState:
        del params
        return _zero_stats()

    def update_fn(updates, state, params=None, *, mask=None, **extra):
        del state, params, extra
        clipped, aux = clip_per_example(updates, max_grad_norm, mask, clipping=clipping)
        return _scale(clipped, denominator), _stats(aux)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def add_gaussian_noise(
    noise_multiplier: Any,
    max_grad_norm: Any,
    expected_batch_size: Any,
    key: Optional[jax.Array],
    *,
    loss_reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
    """Add ``N(0, (sigma * C / m)^2)`` to every coordinate of an averaged clipped sum.

    That is noise ``sigma * C`` on the *sum*, divided like the sum by
    ``m = expected_batch_size`` (``"mean"``) or by 1 (``"sum"``). ``max_grad_norm``
    may be per-layer bounds, then ``C = sqrt(sum C_i^2)``.
    ``update(updates, state, params=None, *, noise=None, **extra)``: with ``noise``
    (a params-shaped pytree of noise on the sum scale, drawn on the host; see the
    module docstring) that noise is used instead of the key's.

    Args:
        noise_multiplier: ``sigma >= 0``.
        max_grad_norm: The clipping bound(s) used before this transformation.
        expected_batch_size: ``int(N * q) >= 1``.
        key: A JAX PRNG key (secret; never reuse it for another run), or ``None``
            (key-free: ``noise=`` is then required).
        loss_reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The transformation; its state is a :class:`NoiseState`.
    """
    _check_sigma(noise_multiplier)
    _check_reduction(loss_reduction)
    _check_expected_batch_size(expected_batch_size)
    clipping = "flat" if np.ndim(max_grad_norm) == 0 and not isinstance(
        max_grad_norm, (list, tuple, dict)
    ) else "per_layer"
    _check_clipping(clipping, max_grad_norm)
    std = noise_multiplier * _noise_norm(max_grad_norm, clipping)
    denominator = _denominator(loss_reduction, expected_batch_size)

    def init_fn(params: Any) -> NoiseState:
        del params
        return NoiseState(key=key)

    def update_fn(updates, state, params=None, *, noise=None, **extra):
        del params, extra
        scaled, next_key = _noise_and_scale(_tree.tree_zeros_like(updates), state.key, std,
                                            denominator, noise)
        return jax.tree_util.tree_map(jnp.add, updates, scaled), NoiseState(next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    _check_sigma(noise_multiplier)
    _check_reduction(loss_reduction)
    _check_expected_batch_size(expected_batch_size)
    _check_clipping(clipping, max_grad_norm)
    std = noise_multiplier * _noise_norm(max_grad_norm, clipping)
    denominator = _denominator(loss_reduction, expected_batch_size)

    def init_fn(params: Any) -> DPAggregateState:
        del params
        return DPAggregateState(_zero_stats(), NoiseState(key=key))

    def update_fn(updates, state, params=None, *, mask=None, noise=None, **extra):
        del params, extra
        clipped, aux = clip_per_example(updates, max_grad_norm, mask, clipping=clipping)
        out, next_key = _noise_and_scale(clipped, state.noise_state.key, std, denominator, noise)
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
        noise_multiplier: ``sigma >= 0``.
        max_grad_norm: Clipping bound(s).
        expected_batch_size: ``int(N * q) >= 1``.
        key: A JAX PRNG key, or ``None`` (key-free: ``noise=`` is then required).
        b1: Adam's first-moment decay.
        b2: Adam's second-moment decay.
        eps: Adam's epsilon.
        loss_reduction: ``"mean"`` or ``"sum"``.
        clipping: ``"flat"`` or ``"per_layer"``.

    Returns:
        The chained transformation.
    """
    return optax.chain(
        dp_aggregate(noise_multiplier, max_grad_norm, expected_batch_size, key,
                     loss_reduction=loss_reduction, clipping=clipping),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
    )


# --------------------------------------------------------------------------- virtual steps


def _where_stats(pred: jax.Array, a: ClipAggregateState, b: ClipAggregateState):
    return ClipAggregateState(*(jnp.where(pred, x, y) for x, y in zip(a, b)))


def _add_stats(a: ClipAggregateState, b: ClipAggregateState) -> ClipAggregateState:
    return ClipAggregateState(*(x + y for x, y in zip(a, b)))


def _zeros_shaped_like(fn: Any) -> Any:
    """Zeros with the shapes and dtypes of the first output of ``fn()`` (traced abstractly)."""
    shapes = jax.eval_shape(fn)[0]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _accumulate(
    state: Any, clipped_sum: Any, clip_aux: ClipAux, apply_update: Any, release: Any, kept: Any
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
    total = jax.tree_util.tree_map(jnp.add, state.grad_sum, clipped_sum)
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


def _fresh_bookkeeping(params: Any) -> dict[str, Any]:
    return {
        "grad_sum": _tree.tree_zeros_like(params), "running": _zero_stats(),
        "last": _zero_stats(), "num_chunks": jnp.zeros((), jnp.int32),
    }


def dp_accumulate_sums(
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
    _check_sigma(noise_multiplier)
    _check_reduction(loss_reduction)
    _check_expected_batch_size(expected_batch_size)
    _check_clipping(clipping, max_grad_norm)
    std = noise_multiplier * _noise_norm(max_grad_norm, clipping)
    denominator = _denominator(loss_reduction, expected_batch_size)

    def init_fn(params: Any) -> DPAccumulateState:
        return DPAccumulateState(key=key, **_fresh_bookkeeping(params))

    def update_fn(clipped_sum, state, params=None, *, clip_aux, apply_update, noise=None,
                  **extra):
        del params, extra

        def release(total, running):
            del running
            return _noise_and_scale(total, state.key, std, denominator, noise)

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
    :func:`dp_accumulate_sums` (see it for what happens to the sum). When
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
    sums = dp_accumulate_sums(max_grad_norm, noise_multiplier, expected_batch_size, key,
                              loss_reduction=loss_reduction, clipping=clipping)

    def update_fn(updates, state, params=None, *, apply_update, mask=None, noise=None, **extra):
        del extra
        clipped, aux = clip_per_example(updates, max_grad_norm, mask, clipping=clipping)
        return sums.update(clipped, state, params, clip_aux=aux, apply_update=apply_update,
                           noise=noise)

    return optax.GradientTransformationExtraArgs(sums.init, update_fn)


def dp_multi_steps(
    dp_accumulator: optax.GradientTransformation,
    inner_optimizer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Gate an optimizer with ``apply_update``, as ``optax.MultiSteps`` does.

    ``update(updates, state, params=None, *, apply_update, mask=None,
    clip_aux=None, noise=None, count_noise=None, **extra)`` runs
    ``dp_accumulator`` on every physical chunk (per-example gradients with
    ``mask`` for :func:`dp_accumulate`, or a clipped sum with ``clip_aux`` for
    :func:`dp_accumulate_sums` / :func:`dp_accumulate_sums_adaptive`) and the
    inner optimizer only when ``apply_update`` is true (one ``jax.lax.cond``,
    one compile); otherwise the output is zeros and the inner state is unchanged.
    ``**extra`` goes to both.

    Args:
        dp_accumulator: :func:`dp_accumulate`, :func:`dp_accumulate_sums` or
            :func:`dp_accumulate_sums_adaptive` (optionally with injected
            hyperparameters).
        inner_optimizer: Any optax optimizer (e.g. ``optax.adamw(1e-3)``).

    Returns:
        The transformation; its state is a :class:`DPMultiStepsState`.
    """
    dp_tx = optax.with_extra_args_support(dp_accumulator)
    inner = optax.with_extra_args_support(inner_optimizer)

    def init_fn(params: Any) -> DPMultiStepsState:
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


# --------------------------------------------------------------------------- adaptive clipping


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

    def init_bound(self, params: Any) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(params)
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        return jnp.asarray(self.spec.initial_max_grad_norm, dtype)

    def release(
        self, total: Any, num_unclipped: Any, num_examples: Any, c: jax.Array,
        key: Optional[jax.Array], noise: Any, count_noise: Any,
    ) -> tuple[Any, tuple[Optional[jax.Array], jax.Array, jax.Array]]:
        """Noise the clipped sum (``z_grad * C``) and the count once; move the bound.

        Returns:
            ``(out, (next_key, new_bound, noised_fraction))``.
        """
        noise_key, count_key = (None, None) if key is None else jax.random.split(key)
        out, next_key = _noise_and_scale(total, noise_key, self.z_grad * c, self.denominator,
                                         noise)
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
    :func:`dp_accumulate_sums_adaptive`.

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

    def init_fn(params: Any) -> AdaptiveClipState:
        bound = rule.init_bound(params)
        return AdaptiveClipState(
            max_grad_norm=bound, key=key, clip_state=_zero_stats(),
            noised_unclipped_fraction=jnp.zeros((), bound.dtype),
        )

    def update_fn(updates, state, params=None, *, mask=None, noise=None, count_noise=None,
                  **extra):
        del params, extra
        c = state.max_grad_norm
        clipped, aux = clip_per_example(updates, c, mask, clipping="flat")
        out, (next_key, new_c, frac) = rule.release(
            clipped, aux.num_unclipped, aux.num_examples, c, state.key, noise, count_noise)
        return out, AdaptiveClipState(new_c, next_key, _stats(aux), frac)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_accumulate_sums_adaptive(
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

    Args:
        noise_multiplier: The accounted ``sigma >= 0``.
        initial_max_grad_norm: Starting bound or a
            :class:`dpcore.clipping.AdaptiveClipping` spec.
        expected_batch_size: ``m = int(N * q) >= 1`` of the *logical* batch.
        key: A JAX PRNG key, or ``None`` (key-free: ``noise=`` and
            ``count_noise=`` are then required on the releasing chunk).
        target_unclipped_quantile: ``gamma`` in ``[0, 1]``.
        clipbound_learning_rate: ``eta >= 0``.
        max_clipbound: Upper limit of the bound.
        min_clipbound: Lower limit of the bound.
        unclipped_num_std: ``sigma_b > sigma / 2``; ``None`` means ``m / 20``.
        loss_reduction: ``"mean"`` or ``"sum"``.

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

    def init_fn(params: Any) -> DPAccumulateAdaptiveState:
        bound = rule.init_bound(params)
        return DPAccumulateAdaptiveState(
            max_grad_norm=bound, key=key, noised_unclipped_fraction=jnp.zeros((), bound.dtype),
            **_fresh_bookkeeping(params),
        )

    def update_fn(clipped_sum, state, params=None, *, clip_aux, apply_update, noise=None,
                  count_noise=None, **extra):
        del params, extra
        c = state.max_grad_norm

        def release(total, running):
            return rule.release(total, running.num_unclipped, running.num_examples, c,
                                state.key, noise, count_noise)

        kept = (state.key, c, state.noised_unclipped_fraction)
        out, (next_key, new_c, frac), book = _accumulate(
            state, clipped_sum, clip_aux, apply_update, release, kept)
        return out, DPAccumulateAdaptiveState(
            max_grad_norm=new_c, key=next_key, noised_unclipped_fraction=frac, **book)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- hyperparameters


def _find_states(tree: Any, kinds: tuple[type, ...]) -> list[Any]:
    if isinstance(tree, kinds):
        return [tree]
    found = []
    if isinstance(tree, (tuple, list)):
        for sub in tree:
            found.extend(_find_states(sub, kinds))
    elif isinstance(tree, dict):
        for sub in tree.values():
            found.extend(_find_states(sub, kinds))
    return found


def current_hyperparams(opt_state: Any) -> dict[str, Any]:
    """Read ``noise_multiplier`` and ``max_grad_norm`` from an optimizer state.

    Looks for an ``optax.inject_hyperparams`` state (anywhere in ``opt_state``)
    whose ``hyperparams`` hold them; a bound not injected there is taken from an
    :class:`AdaptiveClipState` or :class:`DPAccumulateAdaptiveState` (its current
    bound) when there is one.

    Args:
        opt_state: The state returned by ``init`` / ``update``.

    Returns:
        A dict with ``"noise_multiplier"`` and, when found, ``"max_grad_norm"``
        (scalar arrays; ``float()`` them on the host to record them in the accountant).

    Raises:
        ValueError: If no injected ``noise_multiplier`` is found.
    """
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    out: dict[str, Any] = {}
    for state in _find_states(opt_state, kinds):
        for name in ("noise_multiplier", "max_grad_norm"):
            if name in state.hyperparams and name not in out:
                out[name] = state.hyperparams[name]
    if "max_grad_norm" not in out:
        adaptive = _find_states(opt_state, (AdaptiveClipState, DPAccumulateAdaptiveState))
        if adaptive:
            out["max_grad_norm"] = adaptive[0].max_grad_norm
    if "noise_multiplier" not in out:
        raise ValueError(
            "opt_state holds no injected noise_multiplier; build the optimizer with "
            "optax.inject_hyperparams(dp_sgd, static_args=('key', 'expected_batch_size'))(...)."
        )
    return out

