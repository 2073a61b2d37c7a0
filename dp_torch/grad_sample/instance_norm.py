"""Grad sampler for ``nn.InstanceNorm1d/2d/3d`` (``affine=True``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import norm_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_instance_norm_grad_sample"]


@register_grad_sampler([nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d])
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
