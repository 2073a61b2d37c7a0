"""Grad, norm and batch-gradient samplers for ``nn.LayerNorm`` (``elementwise_affine``, with or without bias)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import batch_grad_sampler_from, norm_grad_samples, norm_sampler_from
from ._registry import register_batch_grad_sampler, register_grad_sampler, register_norm_sampler

__all__ = ["compute_layer_norm_batch_grad", "compute_layer_norm_grad_sample", "compute_layer_norm_norm_sample"]


@register_grad_sampler(nn.LayerNorm)
def compute_layer_norm_grad_sample(layer: nn.LayerNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.LayerNorm``: ``x_hat * g`` and ``g`` summed over positions.

    Input ``[B, ..., *normalized_shape]``; the rest as :func:`._norm_common.norm_grad_samples`.
    """
    shape = layer.normalized_shape
    return norm_grad_samples(
        layer, activations, backprops, lambda x: F.layer_norm(x, shape, eps=layer.eps)
    )


#: Per-example gradient norms (materialised: they are ``[B, C]``).
compute_layer_norm_norm_sample = register_norm_sampler(nn.LayerNorm)(
    norm_sampler_from(compute_layer_norm_grad_sample, "compute_layer_norm_norm_sample")
)
#: Sum over the batch of the per-example gradients.
compute_layer_norm_batch_grad = register_batch_grad_sampler(nn.LayerNorm)(
    batch_grad_sampler_from(compute_layer_norm_grad_sample, "compute_layer_norm_batch_grad")
)
