"""nn.LSTM -> dp_torch.layers.DPLSTM (weights carried over)."""

from __future__ import annotations

import torch.nn as nn

from ..layers import DPLSTM
from ._recurrent import fix_recurrent, validate_recurrent
from .errors import UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["validate", "fix"]


@register_module_validator(nn.LSTM)
def validate(module: nn.LSTM) -> list[UnsupportedModuleError]:
    """Reports a trainable nn.LSTM (see :func:`~dp_torch.validators._recurrent.validate_recurrent`).

    Args:
        module: The layer.

    Returns:
        One ShouldReplaceModuleError, or nothing if the layer is frozen.
    """
    return validate_recurrent(module, "DPLSTM")


@register_module_fixer(nn.LSTM)
def fix(module: nn.LSTM, **kwargs) -> nn.Module:
    """A DPLSTM computing the same function as module (module itself if frozen).

    Args:
        module: The layer.
        **kwargs: Ignored.

    Returns:
        The replacement.
    """
    return fix_recurrent(module, DPLSTM)
