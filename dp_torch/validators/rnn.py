"""nn.RNN -> dp_torch.layers.DPRNN (weights carried over)."""

from __future__ import annotations

import torch.nn as nn

from ..layers import DPRNN
from ._recurrent import fix_recurrent, validate_recurrent
from .errors import UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["validate", "fix"]


@register_module_validator(nn.RNN)
def validate(module: nn.RNN) -> list[UnsupportedModuleError]:
    """Reports a trainable nn.RNN (see :func:`~dp_torch.validators._recurrent.validate_recurrent`).

    Args:
        module: The layer.

    Returns:
        One ShouldReplaceModuleError, or nothing if the layer is frozen.
    """
    return validate_recurrent(module, "DPRNN")


@register_module_fixer(nn.RNN)
def fix(module: nn.RNN, **kwargs) -> nn.Module:
    """A DPRNN computing the same function as module (module itself if frozen).

    Args:
        module: The layer.
        **kwargs: Ignored.

    Returns:
        The replacement.
    """
    return fix_recurrent(module, DPRNN, nonlinearity=module.nonlinearity)
