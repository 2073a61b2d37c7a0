"""Ghost clipping, convolution side: flax's ``Conv`` as a linear map on input patches.

A convolution's output at position ``p`` is ``patch_p(x) @ K`` (per group of
``feature_group_count``), so its kernel gradient for one example is
``A^T G`` with ``A`` the example's patches (``[positions, kernel elements]``)
and ``G`` its output gradients, exactly the shape of a dense layer's. This module
mirrors flax's own preprocessing (batch flattening, ``CIRCULAR``/``REFLECT``/
``CAUSAL`` padding, strides and dilations, the same for ``flax.linen.Conv`` and
``flax.nnx.Conv``), cuts the patches as strided slices of the padded inputs and maps
gradients in patch order back to the kernel's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

_SPATIAL = "DHW"


class ConvGeometry(NamedTuple):
    """What a flax ``Conv`` call does besides the product with its kernel.

    Attributes:
        kernel_size: Spatial window, e.g. ``(3, 3)``.
        strides: Window strides.
        input_dilation: ``lhs_dilation`` of ``jax.lax.conv_general_dilated``.
        kernel_dilation: ``rhs_dilation``.
        padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``
            or one ``(low, high)`` pair per spatial axis (flax's canonical form).
        groups: ``feature_group_count``.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    padding: Any
    groups: int


def _broadcast(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        value = 1
    if isinstance(value, (int, np.integer)):
        return (int(value),) * rank
    return tuple(int(v) for v in value)


def conv_geometry(module: Any) -> Optional[ConvGeometry]:
    """The geometry of a plain ``Conv`` module (linen or nnx), or None if unsupported.

    Masked kernels (``mask=``) are not supported: the layer then reads its kernel
    through a product of its own.
    """
    if getattr(module, "mask", None) is not None:
        return None
    size = module.kernel_size
    kernel_size = (int(size),) if isinstance(size, (int, np.integer)) else tuple(size)
    rank = len(kernel_size)
    padding = canonicalize_padding(module.padding, rank)
    if padding == "CAUSAL" and rank != 1:
        return None
    if not isinstance(padding, str):
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return ConvGeometry(kernel_size, _broadcast(module.strides, rank),
                        _broadcast(module.input_dilation, rank),
                        _broadcast(module.kernel_dilation, rank), padding,
                        int(module.feature_group_count))


def _prepared(geom: ConvGeometry, inputs: jax.Array) -> tuple[jax.Array, Any]:
    """Inputs with one batch axis and flax's explicit padding; the padding left to lax."""
    rank = len(geom.kernel_size)
    x = jnp.reshape(inputs, (-1,) + tuple(jnp.shape(inputs)[-(rank + 1):]))
    padding = geom.padding
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(geom.kernel_size, geom.kernel_dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        left = geom.kernel_dilation[0] * (geom.kernel_size[0] - 1)
        x = jnp.pad(x, [(0, 0), (left, 0), (0, 0)])
        padding = "VALID"
    return x, padding if isinstance(padding, str) else list(padding)


def _dimension_numbers(rank: int) -> tuple[str, str, str]:
    spatial = _SPATIAL[-rank:] if rank <= 3 else "".join(chr(ord("a") + i) for i in range(rank))
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def conv_apply(geom: ConvGeometry, inputs: jax.Array, kernel: jax.Array, bias: Any,
               precision: Any) -> jax.Array:
    """The layer's output for (already promoted) inputs, kernel and bias."""
    rank = len(geom.kernel_size)
    x, padding = _prepared(geom, inputs)
    y = jax.lax.conv_general_dilated(
        x, kernel, geom.strides, padding, lhs_dilation=geom.input_dilation,
        rhs_dilation=geom.kernel_dilation, dimension_numbers=_dimension_numbers(rank),
        feature_group_count=geom.groups, precision=precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
    batch_shape = tuple(jnp.shape(inputs)[: jnp.ndim(inputs) - (rank + 1)])
    return jnp.reshape(y, batch_shape + y.shape[1:]) if len(batch_shape) != 1 else y


def conv_patches(geom: ConvGeometry, inputs: jax.Array) -> jax.Array:
    """``[positions, G, window * C/G]``: each output position's input patch, per group.

    The patches are strided slices of the padded (and input-dilated) inputs, one per
    window offset: no arithmetic, so they are exact in any dtype. The columns of a
    group are in the kernel's order (window, then channel).
    """
    x, padding = _prepared(geom, inputs)
    spatial = x.shape[1:-1]
    dilated_in = [(n - 1) * d + 1 for n, d in zip(spatial, geom.input_dilation)]
    window = [(k - 1) * d + 1 for k, d in zip(geom.kernel_size, geom.kernel_dilation)]
    pads = (jax.lax.padtype_to_pads(dilated_in, window, geom.strides, padding)
            if isinstance(padding, str) else padding)
    config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, geom.input_dilation)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), config + [(0, 0, 0)])
    out = [(n - w) // st + 1 for n, w, st in zip(x.shape[1:-1], window, geom.strides)]
    slices = []
    for offset in np.ndindex(*geom.kernel_size):
        start = [o * d for o, d in zip(offset, geom.kernel_dilation)]
        stop = [b + (n - 1) * st + 1 for b, n, st in zip(start, out, geom.strides)]
        slices.append(jax.lax.slice(x, [0, *start, 0], [x.shape[0], *stop, x.shape[-1]],
                                    [1, *geom.strides, 1]))
    patches = jnp.stack(slices, axis=-2)  # [N, *out, window, C]
    k, channels = len(slices), x.shape[-1]
    patches = jnp.reshape(patches, (-1, k, geom.groups, channels // geom.groups))
    return jnp.reshape(jnp.swapaxes(patches, 1, 2), (-1, geom.groups * k * (channels // geom.groups)))


def patch_to_kernel(grads: jax.Array, kernel_shape: Sequence[int]) -> jax.Array:
    """Kernel-shaped gradients from ``[..., G, window * C/G, O/G]`` ones in patch order.

    ``kernel_shape`` is ``(*window, C/G, O)``; leading axes of ``grads`` (a batch
    axis) are kept.
    """
    *window, c_group, out = kernel_shape
    lead = grads.shape[:-3]
    groups = grads.shape[-3]
    k = int(np.prod(window))
    x = jnp.reshape(grads, lead + (groups, k, c_group, out // groups))
    n = len(lead)
    x = jnp.transpose(x, tuple(range(n)) + (n + 1, n + 2, n, n + 3))  # [K, C/G, G, O/G]
    return jnp.reshape(x, lead + tuple(kernel_shape))
