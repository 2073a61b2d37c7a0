"""InstanceNorm with running statistics: error; the fix stops tracking them."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from ._common import by_dimension, factory_kwargs, is_unmaterialised
from .errors import IllegalModuleConfigurationError, UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["validate", "fix"]

INSTANCE_NORMS = by_dimension("InstanceNorm", "LazyInstanceNorm")
InstanceNorm = Union[nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]


@register_module_validator(INSTANCE_NORMS)
def validate(module: InstanceNorm) -> list[UnsupportedModuleError]:
    """Reports an InstanceNorm with ``track_running_stats=True``.

    Args:
        module: An InstanceNorm.

    Returns:
        One ``IllegalModuleConfigurationError`` if it tracks running statistics, else nothing.
    """
    if not module.track_running_stats:
        return []
    return [
        IllegalModuleConfigurationError(
            "tracks running statistics (track_running_stats=True): they average the training "
            "examples of every batch, are stored in the model without noise, and replace each "
            "example's own statistics in eval mode. Fix: ModuleValidator.fix(model) sets "
            "track_running_stats=False and drops the running statistics."
        )
    ]


@register_module_fixer(INSTANCE_NORMS)
def fix(module: InstanceNorm, **kwargs) -> nn.Module:
    """An InstanceNorm without running statistics, same affine parameters.

    Args:
        module: An InstanceNorm.
        **kwargs: Ignored.

    Returns:
        ``module`` itself if it tracks no running statistics, else a new module of the same
        class with ``track_running_stats=False``, no running-statistics buffers, and copies of
        ``weight`` and ``bias`` (with their ``requires_grad``).

    Raises:
        ValueError: For a lazy InstanceNorm that has not seen an input yet.
    """
    if not module.track_running_stats:
        return module
    if is_unmaterialised(module) or module.num_features == 0:
        raise ValueError(
            f"{type(module).__name__} has not seen an input yet, so its number of channels is "
            "unknown; run one forward pass before ModuleValidator.fix"
        )
    new = type(module)(
        module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
        track_running_stats=False, **factory_kwargs(module),
    )
    if module.affine:
        with torch.no_grad():
            new.weight.copy_(module.weight)
            new.bias.copy_(module.bias)
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    return new
