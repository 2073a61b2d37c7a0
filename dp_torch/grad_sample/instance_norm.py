"""Grad, norm and batch-gradient samplers for ``nn.InstanceNorm1d/2d/3d`` (``affine=True``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import batch_grad_sampler_from, norm_grad_samples, norm_sampler_from
from ._registry import register_batch_grad_sampler, register_grad_sampler, register_norm_sampler

__all__ = [
    "compute_instance_norm_batch_grad",
    "compute_instance_norm_grad_sample",
    "compute_instance_norm_norm_sample",
]

_INSTANCE_NORMS = [nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]


@register_grad_sampler(_INSTANCE_NORMS)
def compute_instance_norm_grad_sample(layer: nn.modules.instancenorm._InstanceNorm, activations: list,
                                      backprops: torch.Tensor) -> dict:
    """Per-example gradients of instance normalisation: ``x_hat * g`` and ``g`` summed over space.

    ``x_hat`` uses the instance's own statistics. (A layer with ``track_running_stats`` has
    buffers and is rejected by ``GradSampleModule.validate``: its running statistics are
    computed from the whole batch.) Input ``[B, C, *spatial]``; the rest as
    :func:`._norm_common.norm_grad_samples`.
    """
    return norm_grad_samples(
        layer, activations, backprops, lambda x: F.instance_norm(x, eps=layer.eps), True
    )


#: Per-example gradient norms (materialised: they are ``[B, C]``).
compute_instance_norm_norm_sample = register_norm_sampler(_INSTANCE_NORMS)(
    norm_sampler_from(compute_instance_norm_grad_sample, "compute_instance_norm_norm_sample")
)
#: Sum over the batch of the per-example gradients.
compute_instance_norm_batch_grad = register_batch_grad_sampler(_INSTANCE_NORMS)(
    batch_grad_sampler_from(compute_instance_norm_grad_sample, "compute_instance_norm_batch_grad")
)
