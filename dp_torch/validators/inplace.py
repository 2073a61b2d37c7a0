"""In-place activations that overwrite the output of a hooked layer (Opacus does not check).

A hook-based per-sample-gradient engine reads, in backward, the gradient with respect to each
hooked layer's output. Opacus captures it with full backward hooks, which wrap that output, and
an in-place activation such as ``nn.ReLU(inplace=True)`` writing into it makes backward fail
("Output 0 of BackwardHookFunction is a view and is being modified inplace"); Opacus' validator
does not warn. (dp_torch's ``GradSampleModule`` hooks the output tensor itself and copes; the
check keeps models portable across engines, and its fix costs one tensor of memory.) In an
``nn.Sequential`` the data flow is known, so an in-place module right after a layer that owns
trainable parameters (modules that only return a view of their input, ``nn.Identity``,
``nn.Flatten``, ``nn.Unflatten``, are looked through) is reported.

``fix`` sets ``inplace=False`` on *every* in-place activation and dropout module, reported or
not: inside a custom ``forward`` (e.g. torchvision's ``BasicBlock``) the data flow cannot be
seen, and ``inplace`` only saves memory. (Only code that relies on the input tensor being
modified as a side effect, rather than on the returned value, would notice.)
"""

from __future__ import annotations

import copy

import torch.nn as nn

from .errors import IllegalModuleConfigurationError, UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["INPLACE_MODULES", "validate", "fix"]

INPLACE_MODULES = [
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.RReLU,
    nn.Threshold,
    nn.SiLU,
    nn.Mish,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
]
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _chain(module: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The leaves of a Sequential in call order, nested plain Sequentials expanded."""
    leaves = []
    for name, child in module.named_children():
        if _is_plain_sequential(child):
            leaves.extend(_chain(child, f"{prefix}{name}."))
        else:
            leaves.append((f"{prefix}{name}", child))
    return leaves


def _is_inplace(module: nn.Module) -> bool:
    return isinstance(module, tuple(INPLACE_MODULES)) and getattr(module, "inplace", False) is True


def _owns_trainable_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


@register_module_validator(nn.Sequential)
def validate(module: nn.Sequential) -> list[UnsupportedModuleError]:
    """Reports in-place modules that directly follow a hooked layer in a Sequential.

    Args:
        module: An ``nn.Sequential`` (subclasses with their own ``forward`` are skipped).

    Returns:
        One ``IllegalModuleConfigurationError`` per such module, naming it (not the Sequential).
        A pair inside a nested Sequential is left to that Sequential's own check.
    """
    if not _is_plain_sequential(module):
        return []
    errors: list[UnsupportedModuleError] = []
    previous = None
    for name, child in _chain(module):
        if previous is not None and _is_inplace(child):
            prev_name, prev = previous
            same_child = prev_name.split(".")[0] == name.split(".")[0] and "." in name
            if _owns_trainable_params(prev) and not same_child:
                error = IllegalModuleConfigurationError(
                    f"runs in place (inplace=True) right after {prev_name} "
                    f"({type(prev).__name__}), a layer whose per-sample gradient is computed from "
                    "hooks: it overwrites that layer's output, the tensor the backward hook "
                    "reads; engines built on full backward hooks (Opacus') fail on that in backward. "
                    "Fix: ModuleValidator.fix(model) sets "
                    "inplace=False (same result, one more tensor in memory)."
                )
                errors.append(error.for_child(name, type(child).__name__))
        if not isinstance(child, _VIEW_MODULES):
            previous = (name, child)
    return errors


@register_module_fixer(INPLACE_MODULES)
def fix(module: nn.Module, **kwargs) -> nn.Module:
    """An out-of-place copy of an in-place activation or dropout module.

    Args:
        module: An activation or dropout module.
        **kwargs: Ignored.

    Returns:
        ``module`` if it is not in place, else a copy with ``inplace=False``.
    """
    if not _is_inplace(module):
        return module
    new = copy.deepcopy(module)
    new.inplace = False
    return new
