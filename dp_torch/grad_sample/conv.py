"""Grad sampler for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

Example ``i``'s weight gradient is the correlation of its input with its backprops. Two
formulations compute it for the whole batch:

* *grouped convolution*: the batch is folded into the channel axis (input
  ``[1, B*C_in, ...]``, backprops ``[1, B*C_out, ...]``, ``groups = B * layer.groups``), and
  one convolution weight-gradient gives the ``B`` per-example gradients; any number of
  spatial dimensions, no unfolded copy of the input;
* *unfold + batched matmul*: the input's sliding windows (a strided view, copied once into
  ``[B*groups, P, L]``, ``P`` the patch size, ``L`` the output positions) are multiplied
  with the backprops ``[B*groups, C_out/groups, L]``.

Which one runs: the unfold form is faster when the output has few positions and the
patches are large, and when the patches are tiny (a first layer on 1 or 3 input channels,
whose unfolded copy is small), the grouped convolution otherwise, so the sampler unfolds when
``L <= 64`` and ``P >= 512`` or when ``P <= 32``, and folds the batch into groups otherwise
(the measured times are in docs/benchmarks.md).

Padding: symmetric zero padding is passed to the convolution; ``padding="same"`` with an
odd total, and non-zero ``padding_mode`` (reflect, replicate, circular) pad the input
explicitly first, exactly as the layer's forward does.

Ghost clipping (norm sampler): with ``p_l`` the unfolded input window of output position
``l`` and ``g_l`` the backprops there (per group), example ``i``'s squared weight-gradient
norm is ``sum_{l,m} (p_l . p_m)(g_l . g_m)``: two ``L x L`` Gram matrices per example and
group instead of the ``C_out x C_in/groups x prod(k)`` gradient. It needs the unfolded input
(``B x C_in prod(k) x L``), so it pays only when the output has few positions; each call
takes the Gram form or the materialised gradient by their estimated flops and memory
(:mod:`._ghost_cost`, unfold included). The batch-gradient sampler is one convolution
weight-gradient of the whole batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ghost_cost
from ._registry import register_batch_grad_sampler, register_grad_sampler, register_norm_sampler
from ._trainable import weight_and_bias
from .linear import gram_products

__all__ = [
    "compute_conv_batch_grad",
    "compute_conv_grad_sample",
    "compute_conv_norm_sample",
    "conv_norm_route",
    "conv_padded_input",
    "convolution2d_backward_as_a_convolution",
]

#: ``None`` picks per call (see the module docstring); ``"grouped"`` or ``"unfold"`` force one
#: formulation (tests use this to cover both).
FORMULATION: Optional[str] = None


def conv_padded_input(layer: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The input as the convolution sees it, and the symmetric padding still to apply.

    Args:
        layer: The convolution.
        x: Its input ``[B, C_in, *spatial]``.

    Returns:
        ``(x_padded, padding)``: ``x`` (explicitly padded where needed) and the per-dimension
        zero padding to pass to the convolution.
    """
    nd = x.dim() - 2
    pairs = layer._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
    symmetric = all(pairs[2 * i] == pairs[2 * i + 1] for i in range(nd))
    if layer.padding_mode == "zeros" and symmetric:
        return x, [pairs[2 * (nd - 1 - i)] for i in range(nd)]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, list(pairs), mode=mode), [0] * nd


def _convolution_weight_grad(layer, x: torch.Tensor, g: torch.Tensor, padding: list[int], groups: int,
                             weight_shape: tuple) -> torch.Tensor:
    """One convolution weight-gradient of output gradient ``g`` for input ``x`` (no input grad)."""
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        g, x, g.new_empty(weight_shape), None, list(layer.stride), padding, list(layer.dilation),
        False, [0] * len(padding), groups, [False, True, False],
    )
    return grad_weight


def _weight_grad_grouped(layer, x: torch.Tensor, backprops: torch.Tensor, padding: list[int]) -> torch.Tensor:
    batch = backprops.shape[0]
    folded_x = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    folded_g = backprops.reshape(1, batch * backprops.shape[1], *backprops.shape[2:])
    weight_shape = (batch * layer.weight.shape[0], *layer.weight.shape[1:])
    grad_weight = _convolution_weight_grad(layer, folded_x, folded_g, padding, batch * layer.groups, weight_shape)
    return grad_weight.view(batch, *layer.weight.shape)


def _unfolded_patches(layer, x: torch.Tensor, backprops: torch.Tensor, padding: list[int]) -> torch.Tensor:
    """The input windows of every output position, ``[B * groups, C_in / groups * prod(k), L]``."""
    batch, nd = backprops.shape[0], backprops.dim() - 2
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    patches = x
    for d in range(nd):  # strided windows: [B, C_in, *out_positions, *kernel] (a view, no copy yet)
        reach = layer.dilation[d] * (layer.kernel_size[d] - 1) + 1
        patches = patches.unfold(2 + d, reach, layer.stride[d])
        if layer.dilation[d] > 1:
            patches = patches[..., :: layer.dilation[d]]
        patches = patches[(slice(None),) * (2 + d) + (slice(0, backprops.shape[2 + d]),)]
    positions = math.prod(backprops.shape[2:])
    order = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]  # -> [B, C_in, *kernel, *positions]
    return patches.permute(order).reshape(batch * layer.groups, -1, positions)


def _grouped_backprops(layer, backprops: torch.Tensor) -> torch.Tensor:
    """``[B * groups, C_out / groups, L]``."""
    return backprops.reshape(backprops.shape[0] * layer.groups, -1, math.prod(backprops.shape[2:]))


def _weight_grad_unfold(layer, x: torch.Tensor, backprops: torch.Tensor, padding: list[int]) -> torch.Tensor:
    patches = _unfolded_patches(layer, x, backprops, padding)
    grads = _grouped_backprops(layer, backprops)
    return torch.bmm(grads, patches.transpose(1, 2)).view(backprops.shape[0], *layer.weight.shape)


#: Patches of at most this many entries are unfolded whatever the positions (first layers).
_SMALL_PATCH = 32


def _use_unfold(layer, backprops: torch.Tensor) -> bool:
    if FORMULATION is not None:
        return FORMULATION == "unfold"
    positions = math.prod(backprops.shape[2:])
    patch = layer.weight.shape[1] * math.prod(layer.kernel_size)
    return (positions <= 64 and patch >= 512) or patch <= _SMALL_PATCH


def _spatial_sum(backprops: torch.Tensor) -> torch.Tensor:
    return backprops.sum(dim=tuple(range(2, backprops.dim())))


def _per_example_weight_grad(layer, activations: list, backprops: torch.Tensor) -> torch.Tensor:
    if backprops.shape[0] == 0:
        return backprops.new_zeros((0, *layer.weight.shape))
    x, padding = conv_padded_input(layer, activations[0].to(backprops.dtype))
    weight_grad = _weight_grad_unfold if _use_unfold(layer, backprops) else _weight_grad_grouped
    return weight_grad(layer, x, backprops, padding)


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def compute_conv_grad_sample(layer: nn.modules.conv._ConvNd, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of a 1-, 2- or 3-d convolution.

    Args:
        layer: The convolution.
        activations: ``[input]`` with input ``[B, C_in, *spatial]``.
        backprops: ``[B, C_out, *spatial_out]``.

    Returns:
        ``{weight: [B, *weight.shape], bias: [B, C_out]}`` for the trainable ones.
    """
    return weight_and_bias(
        layer, lambda: _per_example_weight_grad(layer, activations, backprops), lambda: _spatial_sum(backprops)
    )


def conv_norm_route(layer: nn.modules.conv._ConvNd, backprops: torch.Tensor) -> str:
    """Which route the norm sampler takes for this call: ``"gram"`` or ``"per_example"``.

    Args:
        layer: The convolution.
        backprops: Its backprops ``[B, C_out, *spatial_out]``.

    Returns:
        The route of :func:`._ghost_cost.choose_route` for the estimated costs.
    """
    batch, groups = backprops.shape[0], layer.groups
    positions = math.prod(backprops.shape[2:])
    patch = layer.weight.shape[1] * math.prod(layer.kernel_size)
    out_per_group = layer.weight.shape[0] // groups
    unfold = batch * groups * patch * positions
    gram, per_example = _ghost_cost.outer_product_costs(batch * groups, positions, patch, out_per_group)
    gram = _ghost_cost.RouteCost(gram.flops + unfold, gram.memory + unfold)
    if _use_unfold(layer, backprops):
        per_example = _ghost_cost.RouteCost(per_example.flops + unfold, per_example.memory + unfold)
    return _ghost_cost.choose_route(gram, per_example)


def _gram_weight_norms(layer, activations: list, backprops: torch.Tensor) -> torch.Tensor:
    x, padding = conv_padded_input(layer, activations[0].to(backprops.dtype))
    patches = _unfolded_patches(layer, x, backprops, padding)
    grads = _grouped_backprops(layer, backprops)
    products = gram_products(patches.transpose(1, 2), grads.transpose(1, 2))
    squares = products.view(backprops.shape[0], layer.groups).sum(dim=1)
    return squares.clamp(min=0).sqrt()


def _weight_norms(layer, activations: list, backprops: torch.Tensor) -> torch.Tensor:
    if backprops.shape[0] and conv_norm_route(layer, backprops) == _ghost_cost.GRAM:
        return _gram_weight_norms(layer, activations, backprops)
    grads = _per_example_weight_grad(layer, activations, backprops)
    return grads.flatten(1).norm(dim=1)


@register_norm_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def compute_conv_norm_sample(layer: nn.modules.conv._ConvNd, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient norms of a convolution (Gram form or materialised, see the module doc).

    Arguments as for :func:`compute_conv_grad_sample`; returns ``{weight: [B], bias: [B]}``.
    """
    return weight_and_bias(
        layer, lambda: _weight_norms(layer, activations, backprops), lambda: _spatial_sum(backprops).norm(dim=1)
    )


def _batch_weight_grad(layer, activations: list, backprops: torch.Tensor) -> torch.Tensor:
    if backprops.shape[0] == 0:
        return backprops.new_zeros(layer.weight.shape)
    x, padding = conv_padded_input(layer, activations[0].to(backprops.dtype))
    return _convolution_weight_grad(layer, x, backprops, padding, layer.groups, tuple(layer.weight.shape))


@register_batch_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def compute_conv_batch_grad(layer: nn.modules.conv._ConvNd, activations: list, backprops: torch.Tensor) -> dict:
    """Sum over the batch of a convolution's per-example gradients: one weight-gradient convolution.

    Arguments as for :func:`compute_conv_grad_sample`; returns ``{weight: weight.shape,
    bias: [C_out]}`` for the trainable ones.
    """
    return weight_and_bias(
        layer, lambda: _batch_weight_grad(layer, activations, backprops), lambda: _spatial_sum(backprops).sum(dim=0)
    )


def convolution2d_backward_as_a_convolution(layer: nn.Conv2d, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.Conv2d`` by the grouped-convolution formulation alone.

    The same result as :func:`compute_conv_grad_sample` (which picks the faster formulation
    per call), always computed as one convolution weight-gradient with the batch folded into
    the groups (Opacus' name for this alternative).

    Args:
        layer: The convolution.
        activations: ``[input]`` with input ``[B, C_in, H, W]``.
        backprops: ``[B, C_out, H_out, W_out]``.

    Returns:
        ``{weight: [B, *weight.shape], bias: [B, C_out]}`` for the trainable ones.

    Raises:
        TypeError: If ``layer`` is not an ``nn.Conv2d``.
    """
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"layer must be an nn.Conv2d, got {type(layer).__name__}; use compute_conv_grad_sample.")
    global FORMULATION
    previous, FORMULATION = FORMULATION, "grouped"
    try:
        return compute_conv_grad_sample(layer, activations, backprops)
    finally:
        FORMULATION = previous
