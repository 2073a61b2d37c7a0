"""Grad sampler for ``nn.GroupNorm`` (``affine=True``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import norm_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_group_norm_grad_sample"]


@register_grad_sampler(nn.GroupNorm)
def compute_group_norm_grad_sample(layer: nn.GroupNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.GroupNorm``: ``x_hat * g`` and ``g`` summed over space.

    Input ``[B, C, *spatial]``; the rest as :func:`._norm_common.norm_grad_samples`.
    """
    return norm_grad_samples(
        layer, activations, backprops, lambda x: F.group_norm(x, layer.num_groups, eps=layer.eps), True
    )
