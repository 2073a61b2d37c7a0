"""nn.GRU -> dp_torch.layers.DPGRU (weights carried over)."""

from __future__ import annotations

import torch.nn as nn

from ..layers import DPGRU
from ._recurrent import fix_recurrent, validate_recurrent
from .errors import UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["validate", "fix"]


@register_module_validator(nn.GRU)
def validate(module: nn.GRU) -> list[UnsupportedModuleError]:
    """Reports a trainable nn.GRU (see :func:`~dp_torch.validators._recurrent.validate_recurrent`).

    Args:
        module: The layer.

    Returns:
        One ShouldReplaceModuleError, or nothing if the layer is frozen.
    """
    return validate_recurrent(module, "DPGRU")


@register_module_fixer(nn.GRU)
def fix(module: nn.GRU, **kwargs) -> nn.Module:
    """A DPGRU computing the same function as module (module itself if frozen).

    Args:
        module: The layer.
        **kwargs: Ignored.

    Returns:
        The replacement.
    """
    return fix_recurrent(module, DPGRU)
