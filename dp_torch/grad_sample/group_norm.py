"""Grad sampler for ``nn.GroupNorm`` (``affine=True``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import affine_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_group_norm_grad_sample"]


@register_grad_sampler(nn.GroupNorm)
def compute_group_norm_grad_sample(layer: nn.GroupNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.GroupNorm``: ``x_hat * g`` and ``g`` summed over space.

    Args:
        layer: The layer.
        activations: ``[input]`` with input ``[B, C, *spatial]``.
        backprops: Same shape.

    Returns:
        ``{weight: [B, C], bias: [B, C]}`` for the trainable ones.
    """
    x = activations[0].to(backprops.dtype)
    normalized = F.group_norm(x, layer.num_groups, eps=layer.eps)
    return affine_grad_samples(layer.weight, layer.bias, normalized, backprops, 1, channel_first=True)
