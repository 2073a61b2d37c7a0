"""Small helpers shared by the fixers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .errors import ShouldReplaceModuleError, UnsupportedModuleError

__all__ = [
    "by_dimension",
    "factory_kwargs",
    "has_trainable_params",
    "is_unmaterialised",
    "replacement_errors",
]


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


def by_dimension(*stems: str) -> list[type]:
    """The 1d, 2d and 3d ``torch.nn`` classes of each stem (``"BatchNorm"``: ``nn.BatchNorm1d``...)."""
    return [getattr(nn, f"{stem}{dim}d") for stem in stems for dim in (1, 2, 3)]


def replacement_errors(module: nn.Module, message: str) -> list[UnsupportedModuleError]:
    """One ``ShouldReplaceModuleError(message)`` for a trainable module.

    Args:
        module: The layer to check.
        message: Why it must be replaced, and by what.

    Returns:
        The error, or nothing if no parameter of ``module`` requires a gradient (a frozen layer
        needs no per-sample gradient).
    """
    if not has_trainable_params(module):
        return []
    return [ShouldReplaceModuleError(message)]
