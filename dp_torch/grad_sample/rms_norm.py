"""Grad, norm and batch-gradient samplers for ``nn.RMSNorm`` (``elementwise_affine``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import batch_grad_sampler_from, norm_grad_samples, norm_sampler_from
from ._registry import register_batch_grad_sampler, register_grad_sampler, register_norm_sampler

__all__ = ["compute_rms_norm_batch_grad", "compute_rms_norm_grad_sample", "compute_rms_norm_norm_sample"]


@register_grad_sampler(nn.RMSNorm)
def compute_rms_norm_grad_sample(layer: nn.RMSNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient of ``nn.RMSNorm``'s weight: ``x / rms(x) * g`` summed over positions.

    Input ``[B, ..., *normalized_shape]``; the rest as :func:`._norm_common.norm_grad_samples`.
    """
    shape = layer.normalized_shape
    return norm_grad_samples(
        layer, activations, backprops, lambda x: F.rms_norm(x, shape, eps=layer.eps)
    )


#: Per-example gradient norms (materialised: they are ``[B, C]``).
compute_rms_norm_norm_sample = register_norm_sampler(nn.RMSNorm)(
    norm_sampler_from(compute_rms_norm_grad_sample, "compute_rms_norm_norm_sample")
)
#: Sum over the batch of the per-example gradients.
compute_rms_norm_batch_grad = register_batch_grad_sampler(nn.RMSNorm)(
    batch_grad_sampler_from(compute_rms_norm_grad_sample, "compute_rms_norm_batch_grad")
)
