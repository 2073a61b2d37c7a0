"""Small helpers shared by the fixers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["factory_kwargs", "has_trainable_params", "is_unmaterialised"]


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of ``module``'s first floating-point tensor (empty if none)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if torch.is_floating_point(tensor) and not isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def has_trainable_params(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` (recursively) requires a gradient."""
    return any(p.requires_grad for p in module.parameters())


def is_unmaterialised(module: nn.Module) -> bool:
    """Whether ``module`` is a lazy module whose shapes are not known yet."""
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()
