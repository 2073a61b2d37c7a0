"""Grad sampler for ``nn.LayerNorm`` (``elementwise_affine``, with or without bias)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import norm_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_layer_norm_grad_sample"]


@register_grad_sampler(nn.LayerNorm)
def compute_layer_norm_grad_sample(layer: nn.LayerNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.LayerNorm``: ``x_hat * g`` and ``g`` summed over positions.

    Input ``[B, ..., *normalized_shape]``; the rest as :func:`._norm_common.norm_grad_samples`.
    """
    shape = layer.normalized_shape
    return norm_grad_samples(
        layer, activations, backprops, lambda x: F.layer_norm(x, shape, eps=layer.eps)
    )
