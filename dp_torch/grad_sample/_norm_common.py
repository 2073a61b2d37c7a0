"""Shared helper of the normalisation-layer samplers (internal)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["affine_grad_samples"]


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
