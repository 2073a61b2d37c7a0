"""Grad, norm and batch-gradient samplers for ``nn.GroupNorm`` (``affine=True``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import batch_grad_sampler_from, norm_grad_samples, norm_sampler_from
from ._registry import register_batch_grad_sampler, register_grad_sampler, register_norm_sampler

__all__ = ["compute_group_norm_batch_grad", "compute_group_norm_grad_sample", "compute_group_norm_norm_sample"]


@register_grad_sampler(nn.GroupNorm)
def compute_group_norm_grad_sample(layer: nn.GroupNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.GroupNorm``: ``x_hat * g`` and ``g`` summed over space.

    Input ``[B, C, *spatial]``; the rest as :func:`._norm_common.norm_grad_samples`.
    """
    return norm_grad_samples(
        layer, activations, backprops, lambda x: F.group_norm(x, layer.num_groups, eps=layer.eps), True
    )


#: Per-example gradient norms (materialised: they are ``[B, C]``).
compute_group_norm_norm_sample = register_norm_sampler(nn.GroupNorm)(
    norm_sampler_from(compute_group_norm_grad_sample, "compute_group_norm_norm_sample")
)
#: Sum over the batch of the per-example gradients.
compute_group_norm_batch_grad = register_batch_grad_sampler(nn.GroupNorm)(
    batch_grad_sampler_from(compute_group_norm_grad_sample, "compute_group_norm_batch_grad")
)
