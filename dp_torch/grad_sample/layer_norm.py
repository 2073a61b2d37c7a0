"""Grad sampler for ``nn.LayerNorm`` (``elementwise_affine``, with or without bias)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import affine_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_layer_norm_grad_sample"]


@register_grad_sampler(nn.LayerNorm)
def compute_layer_norm_grad_sample(layer: nn.LayerNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.LayerNorm``: ``x_hat * g`` and ``g`` summed over positions.

    Args:
        layer: The layer.
        activations: ``[input]`` with input ``[B, ..., *normalized_shape]``.
        backprops: Same shape.

    Returns:
        ``{weight: [B, *normalized_shape], bias: [B, *normalized_shape]}`` (trainable ones).
    """
    x = activations[0].to(backprops.dtype)
    normalized = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    return affine_grad_samples(layer.weight, layer.bias, normalized, backprops, len(layer.normalized_shape))
