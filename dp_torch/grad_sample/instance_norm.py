"""Grad sampler for ``nn.InstanceNorm1d/2d/3d`` (``affine=True``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._norm_common import affine_grad_samples
from ._registry import register_grad_sampler

__all__ = ["compute_instance_norm_grad_sample"]


@register_grad_sampler([nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d])
def compute_instance_norm_grad_sample(layer: nn.modules.instancenorm._InstanceNorm, activations: list,
                                      backprops: torch.Tensor) -> dict:
    """Per-example gradients of instance normalisation: ``x_hat * g`` and ``g`` summed over space.

    ``x_hat`` uses the instance's own statistics. (A layer with ``track_running_stats`` has
    buffers and is rejected by ``GradSampleModule.validate``: its running statistics are
    computed from the whole batch.)

    Args:
        layer: The layer.
        activations: ``[input]`` with input ``[B, C, *spatial]``.
        backprops: Same shape.

    Returns:
        ``{weight: [B, C], bias: [B, C]}`` for the trainable ones.
    """
    x = activations[0].to(backprops.dtype)
    normalized = F.instance_norm(x, eps=layer.eps)
    return affine_grad_samples(layer.weight, layer.bias, normalized, backprops, 1, channel_first=True)
