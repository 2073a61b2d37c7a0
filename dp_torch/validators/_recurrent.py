"""Shared logic of the nn.RNN / nn.GRU / nn.LSTM validators and fixers."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch.nn as nn

from ..layers import DPRNNBase
from ._common import factory_kwargs, has_trainable_params, replacement_errors
from .errors import UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["validate_recurrent", "fix_recurrent", "register_recurrent"]


def validate_recurrent(module: nn.RNNBase, replacement: str) -> list[UnsupportedModuleError]:
    """One ``ShouldReplaceModuleError`` for a trainable ``torch.nn`` recurrent layer.

    Args:
        module: The ``torch.nn`` layer.
        replacement: Name of its DP twin in ``dp_torch.layers``.

    Returns:
        The error, or nothing if no parameter of ``module`` requires a gradient (a frozen layer
        needs no per-sample gradient).
    """
    return replacement_errors(
        module,
        f"nn.{type(module).__name__} runs as one fused kernel whose per-example gradients a "
        "hook-based engine cannot see. Fix: ModuleValidator.fix(model) replaces it with "
        f"dp_torch.layers.{replacement}, the same function built from nn.Linear modules, "
        "keeping its weights.",
    )


def fix_recurrent(module: nn.RNNBase, replacement: type[DPRNNBase], **extra) -> nn.Module:
    """The DP twin of a trainable ``torch.nn`` recurrent layer, with its weights.

    Args:
        module: The ``torch.nn`` layer.
        replacement: The DP class to build.
        **extra: Extra constructor arguments (``nonlinearity`` for ``nn.RNN``).

    Returns:
        ``module`` if it is frozen, else the twin (same arguments, dtype, device, weights and
        ``requires_grad`` flags).
    """
    if not has_trainable_params(module):
        return module
    with warnings.catch_warnings():
        # nn.RNNBase already warned about dropout with one layer when it was built.
        warnings.filterwarnings("ignore", message="dropout option adds dropout")
        new = replacement(
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            proj_size=module.proj_size,
            **extra,
            **factory_kwargs(module),
        )
    new.load_state_dict(module.state_dict())
    by_public_name = new.state_dict(keep_vars=True)
    for name, param in module.named_parameters():
        by_public_name[name].requires_grad_(param.requires_grad)
    return new


def register_recurrent(
    layer: type[nn.RNNBase], replacement: type[DPRNNBase], *copied: str
) -> tuple[Callable[..., list[UnsupportedModuleError]], Callable[..., nn.Module]]:
    """Register the validator and the fixer of one ``torch.nn`` recurrent layer class.

    Args:
        layer: The ``torch.nn`` class (``nn.GRU``, ...).
        replacement: Its DP twin in ``dp_torch.layers``.
        *copied: Attributes of the layer passed on to the twin's constructor (``"nonlinearity"``).

    Returns:
        ``(validate, fix)``, as :func:`validate_recurrent` and :func:`fix_recurrent` for ``layer``.
    """

    @register_module_validator(layer)
    def validate(module: nn.RNNBase) -> list[UnsupportedModuleError]:
        return validate_recurrent(module, replacement.__name__)

    @register_module_fixer(layer)
    def fix(module: nn.RNNBase, **kwargs: Any) -> nn.Module:
        extra = {name: getattr(module, name) for name in copied}
        return fix_recurrent(module, replacement, **extra)

    twin = replacement.__name__
    validate.__doc__ = f"Reports a trainable nn.{layer.__name__}: it must become a {twin}."
    fix.__doc__ = f"A {twin} computing what ``module`` computes (``module`` itself if frozen)."
    return validate, fix
