"""Ghost clipping, normalisation side: flax's LayerNorm, RMSNorm and GroupNorm.

A normalisation layer computes ``y = xhat * scale + bias`` with ``xhat`` the input
normalised by statistics that do not depend on ``scale`` or ``bias``, both broadcast
over every axis but the trailing feature axes. One example's gradients are then
``sum_rows xhat * g`` (scale) and ``sum_rows g`` (bias) for its output gradients
``g``: ``[C]`` vectors, formed per example from ``xhat`` recorded in the forward pass.
``xhat`` is computed here with flax's own statistics function of the same framework
and the layer's settings, the way the layer computes it.

Supported: ``flax.linen.LayerNorm``, ``RMSNorm`` and ``GroupNorm`` and their
``flax.nnx`` twins, without ``mask``, ``axis_name`` or ``axis_index_groups``, with
trailing feature axes, GroupNorm with its default reduction axes (nnx: the default
``promote_dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import dtypes as linen_dtypes
from flax.linen import normalization as linen_norm
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import normalization as nnx_norm

LINEN_NORM_CALLS = (nn.LayerNorm.__call__, nn.RMSNorm.__call__, nn.GroupNorm.__call__)
NNX_NORM_CLASSES = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)


def _axes(value: Any, ndim: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    return tuple(sorted(int(a) % ndim for a in values))


def feature_axes(module: Any, ndim: int) -> Optional[tuple[int, ...]]:
    """The layer's feature axes if they are the trailing axes of its input, else None."""
    if isinstance(module, (nn.GroupNorm, nnx.GroupNorm)):
        axes: tuple[int, ...] = (ndim - 1,)
    else:
        axes = _axes(module.feature_axes, ndim)
    return axes if axes == tuple(range(ndim - len(axes), ndim)) else None


def norm_supported(module: Any, kwargs: dict) -> bool:
    """Whether the call is one this module can mirror (no mask, no cross-device axes)."""
    if any(k != "mask" or v is not None for k, v in kwargs.items()):
        return False
    if module.axis_name is not None or module.axis_index_groups is not None:
        return False
    if isinstance(module, (nn.GroupNorm, nnx.GroupNorm)) and module.reduction_axes is not None:
        return False
    if isinstance(module, nnx.Module):
        return module.promote_dtype is nnx_dtypes.promote_dtype
    return True


def _group_sizes(module: Any, channels: int) -> tuple[int, int]:
    if isinstance(module, nnx.GroupNorm):
        return module.num_groups, module.group_size
    groups = module.num_groups if module.group_size is None else channels // module.group_size
    return groups, channels // groups


def _stats(module: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """``(mean, var, reduction axes)`` as the layer computes them (flax's own function)."""
    linen = not isinstance(module, nnx.Module)
    compute = linen_norm._compute_stats if linen else nnx_norm._compute_stats
    extra = {"force_float32_reductions": module.force_float32_reductions} if linen else {}
    use_mean = not isinstance(module, (nn.RMSNorm, nnx.RMSNorm))
    if not isinstance(module, (nn.GroupNorm, nnx.GroupNorm)):
        axes = module.reduction_axes
        mean, var = compute(x, axes, module.dtype, None, None, use_mean=use_mean,
                            use_fast_variance=module.use_fast_variance, **extra)
        return mean, var, _axes(axes, x.ndim)
    axes = _axes(list(range(1, x.ndim - 1)) + [-1], x.ndim)
    groups, size = _group_sizes(module, x.shape[-1])
    grouped = jnp.reshape(x, x.shape[:-1] + (groups, size))
    mean, var = compute(grouped, list(axes[:-1]) + [-1], module.dtype, None, None,
                        use_fast_variance=module.use_fast_variance, **extra)
    return jnp.repeat(mean, size, axis=-1), jnp.repeat(var, size, axis=-1), axes[:-1]


def promoted(module: Any, inputs: Any, scale: Any, bias: Any) -> tuple[Any, Any, Any]:
    """The layer's input, scale and bias after its dtype promotion (nnx promotes; linen not)."""
    if isinstance(module, nnx.Module):
        return tuple(nnx_dtypes.promote_dtype((inputs, scale, bias), dtype=module.dtype))
    return inputs, scale, bias


def normalized(module: Any, inputs: Any, scale: Any, bias: Any) -> jax.Array:
    """``xhat = (x - mean) / sqrt(var + eps)``, the factor of ``scale`` in the output."""
    x, _, _ = promoted(module, inputs, scale, bias)
    x = jnp.asarray(x)
    mean, var, reduced = _stats(module, x)
    stats_shape = tuple(1 if a in reduced else n for a, n in enumerate(x.shape))
    mean = jnp.reshape(mean, stats_shape)
    var = jnp.reshape(var, stats_shape)
    return (x - mean) * jax.lax.rsqrt(var + module.epsilon)


def norm_out(module: Any, inputs: Any, scale: Any, bias: Any, axes: tuple[int, ...]
             ) -> jax.Array:
    """What the layer computes with the given ``scale`` and ``bias`` (either may be None)."""
    x, s, b = promoted(module, inputs, scale, bias)
    y = normalized(module, inputs, scale, bias)
    shape = tuple(jnp.shape(x)[a] if a in axes else 1 for a in range(jnp.ndim(x)))
    args = [x]
    if s is not None:
        y = y * jnp.reshape(s, shape)
        args.append(s)
    if b is not None:
        y = y + jnp.reshape(b, shape)
        args.append(b)
    return jnp.asarray(y, linen_dtypes.canonicalize_dtype(*args, dtype=module.dtype))


def norm_record(module: Any, inputs: Any, scale: Any, bias: Any, axes: tuple[int, ...]
                ) -> jax.Array:
    """``xhat`` as ``[rows, features]`` (what a scale's per-example gradient needs)."""
    y = normalized(module, inputs, scale, bias)
    return jnp.reshape(y, (-1, int(np.prod([y.shape[a] for a in axes]))))
