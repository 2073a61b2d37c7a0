"""Grad sampler for ``nn.RMSNorm`` (``elementwise_affine``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import norm_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_rms_norm_grad_sample"]


@register_grad_sampler(nn.RMSNorm)
def compute_rms_norm_grad_sample(layer: nn.RMSNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient of ``nn.RMSNorm``'s weight: ``x / rms(x) * g`` summed over positions.

    Input ``[B, ..., *normalized_shape]``; the rest as :func:`._norm_common.norm_grad_samples`.
    """
    shape = layer.normalized_shape
    return norm_grad_samples(
        layer, activations, backprops, lambda x: F.rms_norm(x, shape, eps=layer.eps)
    )
