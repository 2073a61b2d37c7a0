"""Small helpers over ``nn.Module`` trees (mirrors ``opacus.utils.module_utils``).

Which submodules and parameters a DP wrapper looks at:

* :func:`parametrized_modules`: modules that *own* parameters directly;
* :func:`trainable_modules`: those owning at least one parameter with ``requires_grad``;
* :func:`trainable_parameters`: every parameter with ``requires_grad``, by name.

Plus :func:`clone_module`, :func:`get_submodule` and :func:`are_state_dict_equal`.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "are_state_dict_equal",
    "clone_module",
    "get_submodule",
    "has_trainable_params",
    "parametrized_modules",
    "requires_grad",
    "trainable_modules",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)


def has_trainable_params(module: nn.Module) -> bool:
    """Whether ``module`` directly owns a parameter with ``requires_grad`` (children ignored).

    Args:
        module: The module.
    """
    return any(p.requires_grad for p in module.parameters(recurse=False))


def parametrized_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, submodule)`` for every submodule that directly owns a parameter.

    Containers that only hold other modules (``nn.Sequential``, a model class whose
    layers carry all the weights) are skipped. ``module`` itself is included, as ``""``,
    when it owns parameters.

    Args:
        module: The root module.
    """
    for name, sub in module.named_modules():
        if next(sub.parameters(recurse=False), None) is not None:
            yield name, sub


def trainable_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, submodule)`` for every submodule owning a parameter that requires grad.

    Args:
        module: The root module.
    """
    for name, sub in parametrized_modules(module):
        if has_trainable_params(sub):
            yield name, sub


def trainable_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(name, parameter)`` for every parameter of ``module`` that requires grad.

    Args:
        module: The root module; names are relative to it (``"0.weight"``).
    """
    for name, p in module.named_parameters():
        if p.requires_grad:
            yield name, p


def requires_grad(module: nn.Module, *, recurse: bool = False) -> bool:
    """Whether any parameter of ``module`` requires grad.

    Args:
        module: The module.
        recurse: Also look at the parameters of its submodules (default: only its own).
    """
    return any(p.requires_grad for p in module.parameters(recurse=recurse))


def clone_module(module: nn.Module) -> nn.Module:
    """An independent copy of ``module`` (parameters, buffers, attributes), on the same device.

    ``copy.deepcopy`` is tried first. Some modules refuse it (for example one holding a
    non-leaf tensor as an attribute); those are copied by a round trip through
    ``torch.save`` / ``torch.load`` in memory. That round trip unpickles only the bytes
    just written here, never a file.

    Args:
        module: The module to copy.

    Returns:
        The copy; changing it leaves ``module`` untouched.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    try:
        return copy.deepcopy(module)
    except (RuntimeError, TypeError) as err:
        logger.debug("deepcopy of %s failed (%s); copying through torch.save", type(module).__name__, err)
    with io.BytesIO() as buffer:
        torch.save(module, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)


def get_submodule(module: nn.Module, target: str) -> nn.Module:
    """The submodule of ``module`` at the dotted path ``target`` (``""`` is ``module`` itself).

    Args:
        module: The root module.
        target: A path as in ``named_modules()``, e.g. ``"encoder.layers.0"``.

    Returns:
        The submodule.

    Raises:
        AttributeError: If a step of the path is missing or is not an ``nn.Module``; the
            message names the step and the path walked so far.
    """
    if not isinstance(target, str):
        raise TypeError(f"target must be a dotted path string, got {type(target).__name__}.")
    current = module
    walked: list[str] = []
    for atom in target.split(".") if target else []:
        if not hasattr(current, atom):
            where = ".".join(walked) or "<root>"
            raise AttributeError(
                f"{type(current).__name__} at {where!r} has no attribute {atom!r} (looking up "
                f"target={target!r}); use a name listed by module.named_modules()."
            )
        current = getattr(current, atom)
        walked.append(atom)
        if not isinstance(current, nn.Module):
            raise AttributeError(
                f"{'.'.join(walked)!r} is a {type(current).__name__}, not an nn.Module "
                f"(looking up target={target!r})."
            )
    return current


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        dtype = torch.promote_types(a.dtype, b.dtype)
        return bool(torch.allclose(a.to(dtype), b.to(device=a.device, dtype=dtype), equal_nan=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return bool(a == b)


def are_state_dict_equal(sd1: Mapping[str, Any], sd2: Mapping[str, Any]) -> bool:
    """Whether two state dicts have the same keys and (up to ``torch.allclose``) the same values.

    Tensors must have equal shapes; their values are compared with ``torch.allclose``
    (default tolerances, NaNs equal) in their common dtype. The first discrepancy is
    logged at INFO level on this module's logger.

    Args:
        sd1: A state dict.
        sd2: Another state dict.
    """
    if set(sd1) != set(sd2):
        logger.info("state dicts differ in keys: %s", sorted(set(sd1) ^ set(sd2)))
        return False
    for key, value in sd1.items():
        if not _values_equal(value, sd2[key]):
            logger.info("state dicts differ at %r", key)
            return False
    return True
