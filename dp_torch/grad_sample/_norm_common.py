"""Shared helpers of the normalisation-layer samplers (internal).

The per-example gradients of a normalisation layer's affine parameters are small
(``[B, C]``), so its norm sampler materialises them and takes norms, and its batch-gradient
sampler sums them over the batch: :func:`norm_sampler_from` and
:func:`batch_grad_sampler_from` make both from the layer's grad sampler.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ._registry import Sampler

__all__ = ["affine_grad_samples", "batch_grad_sampler_from", "norm_grad_samples", "norm_sampler_from"]


def affine_grad_samples(
    weight: Optional[nn.Parameter],
    bias: Optional[nn.Parameter],
    normalized: torch.Tensor,
    backprops: torch.Tensor,
    param_dims: int,
    channel_first: bool = False,
) -> dict:
    """Per-example gradients of an elementwise affine map ``y = w * x_hat + b``.

    Args:
        weight: The scale parameter (or ``None``).
        bias: The shift parameter (or ``None``).
        normalized: ``x_hat``, batch first.
        backprops: Same shape, batch first.
        param_dims: Number of dimensions the parameters span.
        channel_first: ``True`` when the parameters span dimension 1 (channels: GroupNorm,
            InstanceNorm), ``False`` when they span the trailing dimensions (LayerNorm, RMSNorm).

    Returns:
        ``{weight: [B, *weight.shape], bias: [B, *bias.shape]}`` for the trainable ones.
    """
    if channel_first:
        reduce = tuple(range(2, backprops.dim()))
    else:
        reduce = tuple(range(1, backprops.dim() - param_dims))
    ret = {}
    if weight is not None and weight.requires_grad:
        product = normalized.to(backprops.dtype) * backprops
        ret[weight] = product.sum(dim=reduce) if reduce else product
    if bias is not None and bias.requires_grad:
        ret[bias] = backprops.sum(dim=reduce) if reduce else backprops.clone()
    return ret


def norm_grad_samples(
    layer: nn.Module,
    activations: list,
    backprops: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    channel_first: bool = False,
) -> dict:
    """Per-example gradients of a normalisation layer's ``weight`` and ``bias`` (if it has one).

    Args:
        layer: The layer; without ``channel_first`` it has a ``normalized_shape``.
        activations: ``[input]``, batch first.
        backprops: Gradient of the layer's output, same shape.
        normalize: ``x -> x_hat``, the layer's normalisation without its affine map.
        channel_first: As for :func:`affine_grad_samples`.

    Returns:
        ``{weight: [B, *weight.shape], bias: [B, *bias.shape]}`` for the trainable ones.
    """
    normalized = normalize(activations[0].to(backprops.dtype))
    param_dims = 1 if channel_first else len(layer.normalized_shape)
    bias = getattr(layer, "bias", None)
    return affine_grad_samples(layer.weight, bias, normalized, backprops, param_dims, channel_first)


def norm_sampler_from(grad_sampler: Sampler, name: str) -> Sampler:
    """A norm sampler that materialises ``grad_sampler``'s per-example gradients and takes norms.

    Args:
        grad_sampler: The layer's grad sampler.
        name: ``__name__`` of the returned function.

    Returns:
        ``(layer, activations, backprops) -> {param: [B] L2 norms}``.
    """

    def norm_sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        grads = grad_sampler(layer, activations, backprops)
        return {p: g.flatten(1).norm(dim=1) for p, g in grads.items()}

    norm_sampler.__name__ = norm_sampler.__qualname__ = name
    norm_sampler.__doc__ = f"Per-example gradient norms of the parameters {grad_sampler.__name__} covers."
    return norm_sampler


def batch_grad_sampler_from(grad_sampler: Sampler, name: str) -> Sampler:
    """A batch-gradient sampler summing ``grad_sampler``'s per-example gradients over the batch.

    Args:
        grad_sampler: The layer's grad sampler.
        name: ``__name__`` of the returned function.

    Returns:
        ``(layer, activations, backprops) -> {param: sum over the batch}``.
    """

    def batch_grad_sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        return {p: g.sum(dim=0) for p, g in grad_sampler(layer, activations, backprops).items()}

    batch_grad_sampler.__name__ = batch_grad_sampler.__qualname__ = name
    batch_grad_sampler.__doc__ = f"Sum over the batch of the per-example gradients of {grad_sampler.__name__}."
    return batch_grad_sampler
