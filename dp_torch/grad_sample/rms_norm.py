"""Grad sampler for ``nn.RMSNorm`` (``elementwise_affine``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import affine_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_rms_norm_grad_sample"]


@register_grad_sampler(nn.RMSNorm)
def compute_rms_norm_grad_sample(layer: nn.RMSNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient of ``nn.RMSNorm``'s weight: ``x / rms(x) * g`` summed over positions.

    Args:
        layer: The layer.
        activations: ``[input]`` with input ``[B, ..., *normalized_shape]``.
        backprops: Same shape.

    Returns:
        ``{weight: [B, *normalized_shape]}`` when the weight is trainable.
    """
    x = activations[0].to(backprops.dtype)
    normalized = F.rms_norm(x, layer.normalized_shape, eps=layer.eps)
    return affine_grad_samples(layer.weight, None, normalized, backprops, len(layer.normalized_shape))
