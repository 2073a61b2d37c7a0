"""BatchNorm: mixes the examples of a batch; replaced by GroupNorm (or a frozen twin)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch.nn as nn

from ..layers import FrozenBatchNorm
from ._common import by_dimension, factory_kwargs, is_unmaterialised
from .errors import ShouldReplaceModuleError, UnsupportableModuleError, UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["validate", "fix"]

BATCH_NORMS = [*by_dimension("BatchNorm"), nn.SyncBatchNorm, *by_dimension("LazyBatchNorm")]
BatchNorm = nn.modules.batchnorm._BatchNorm

_WHY = (
    "in training mode BatchNorm normalises each example with the mean and variance of the whole "
    "batch, so one example's output and gradient depend on the others, and it updates running "
    "statistics from private data that are stored in the model without noise; DP-SGD's "
    "per-example guarantee does not cover either."
)


def _is_frozen(module: BatchNorm) -> bool:
    params = list(module.parameters())
    return (
        module.affine
        and bool(params)
        and not any(p.requires_grad for p in params)
        and module.running_mean is not None
    )


@register_module_validator(BATCH_NORMS)
def validate(module: BatchNorm) -> list[UnsupportedModuleError]:
    """Reports every BatchNorm (trainable, frozen or without affine parameters).

    Args:
        module: A BatchNorm.

    Returns:
        One ``ShouldReplaceModuleError`` whose message says what ``fix`` will do.
    """
    if _is_frozen(module):
        advice = (
            "Its affine parameters are frozen (requires_grad=False), which does not stop the "
            "mixing (Opacus lets a frozen BatchNorm through). Fix: ModuleValidator.fix(model) "
            "replaces it with dp_torch.layers.FrozenBatchNorm, which always uses the stored "
            "running statistics and weights, i.e. computes what this module computes in eval "
            "mode; to train a GroupNorm in its place instead, unfreeze it before fix."
        )
    elif not module.affine:
        advice = (
            "It has no parameters (affine=False), which does not stop the mixing (Opacus lets "
            "it through). Fix: ModuleValidator.fix(model) replaces it with "
            "GroupNorm(gcd(32, C), C, affine=False)."
        )
    else:
        advice = (
            "Fix: ModuleValidator.fix(model) replaces it with GroupNorm(gcd(32, C), C) (fresh "
            "affine parameters; fix(model, num_groups=G) picks G groups, "
            "fix(model, replace_bn_with_in=True) uses InstanceNorm instead)."
        )
    return [ShouldReplaceModuleError(f"{_WHY} {advice}")]


@register_module_fixer(BATCH_NORMS)
def fix(module: BatchNorm, **kwargs) -> nn.Module:
    """Replacement for a BatchNorm.

    Args:
        module: A BatchNorm.
        **kwargs: ``num_groups`` (GroupNorm groups, must divide ``num_features``; default
            ``gcd(32, num_features)``, Opacus' rule) or ``replace_bn_with_in=True``
            (InstanceNorm); other keywords are ignored.

    Returns:
        ``FrozenBatchNorm`` for a frozen BatchNorm with running statistics, else
        ``InstanceNorm*d`` if ``replace_bn_with_in``, else ``GroupNorm``.

    Raises:
        ValueError: Both ``num_groups`` and ``replace_bn_with_in`` given, a bad ``num_groups``,
            or a lazy BatchNorm that has not seen an input yet.
        UnsupportableModuleError: ``replace_bn_with_in`` for a ``SyncBatchNorm``.
    """
    replace_bn_with_in = kwargs.get("replace_bn_with_in", False)
    num_groups = kwargs.get("num_groups", None)
    if replace_bn_with_in and num_groups is not None:
        raise ValueError(
            f"replace_bn_with_in=True and num_groups={num_groups!r} are mutually exclusive: "
            "InstanceNorm has no groups; pass one of them"
        )
    if is_unmaterialised(module) or module.num_features == 0:
        raise ValueError(
            f"{type(module).__name__} has not seen an input yet, so its number of channels is "
            "unknown; run one forward pass before ModuleValidator.fix"
        )
    if _is_frozen(module):
        return FrozenBatchNorm.from_batch_norm(module)
    if replace_bn_with_in:
        return _batchnorm_to_instancenorm(module)
    return _batchnorm_to_groupnorm(module, num_groups=num_groups)


def _carry_requires_grad(new: nn.Module, old: nn.Module) -> None:
    for name in ("weight", "bias"):
        new_param, old_param = getattr(new, name, None), getattr(old, name, None)
        if isinstance(new_param, nn.Parameter) and isinstance(old_param, nn.Parameter):
            new_param.requires_grad_(old_param.requires_grad)


def _batchnorm_to_groupnorm(module: BatchNorm, *, num_groups: Optional[int] = None) -> nn.GroupNorm:
    channels = module.num_features
    if num_groups is None:
        num_groups = math.gcd(32, channels)
    valid = isinstance(num_groups, int) and not isinstance(num_groups, bool) and num_groups > 0
    if not valid or channels % num_groups:
        raise ValueError(
            f"num_groups must be a positive int dividing num_features={channels}, got {num_groups!r}"
        )
    group_norm = nn.GroupNorm(
        num_groups, channels, eps=module.eps, affine=module.affine, **factory_kwargs(module)
    )
    _carry_requires_grad(group_norm, module)
    return group_norm


InstanceNorm = Union[nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]


def _batchnorm_to_instancenorm(module: BatchNorm) -> InstanceNorm:
    if isinstance(module, nn.SyncBatchNorm):
        raise UnsupportableModuleError(
            "SyncBatchNorm has no InstanceNorm counterpart (its input rank is unknown); call fix "
            "without replace_bn_with_in to get GroupNorm"
        )
    kind = next(
        instance
        for batch, instance in (
            (nn.BatchNorm1d, nn.InstanceNorm1d),
            (nn.BatchNorm2d, nn.InstanceNorm2d),
            (nn.BatchNorm3d, nn.InstanceNorm3d),
        )
        if isinstance(module, batch)
    )
    instance_norm = kind(
        module.num_features, eps=module.eps, affine=module.affine, track_running_stats=False,
        **factory_kwargs(module),
    )
    _carry_requires_grad(instance_norm, module)
    return instance_norm

