"""The per-layer sampler registries and their lookup (internal).

A *grad sampler* is a function ``(layer, activations, backprops) -> {param: grad_sample}``;
a *norm sampler* has the same signature and returns per-example gradient *norms*
(shape ``[batch]``) instead. Both are registered per module class; a subclass resolves
to the sampler of its nearest registered ancestor (method resolution order), but only
when it does not override ``forward``: a subclass that computes something else must
get its own sampler or the ``torch.func`` fallback, never a silently wrong one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn

__all__ = [
    "GRAD_SAMPLERS",
    "NORM_SAMPLERS",
    "BATCH_GRAD_SAMPLERS",
    "CALL_CONCATENATORS",
    "Sampler",
    "defer_registration",
    "find_call_concatenator",
    "find_sampler",
    "register_batch_grad_sampler",
    "register_grad_sampler",
    "register_norm_sampler",
]

#: Signature of a grad or norm sampler.
Sampler = Callable[[nn.Module, list, torch.Tensor], dict]

#: module class -> grad sampler (per-example gradients).
GRAD_SAMPLERS: dict[type, Sampler] = {}
#: module class -> norm sampler (per-example gradient norms, ghost clipping).
NORM_SAMPLERS: dict[type, Sampler] = {}
#: module class -> batch-gradient sampler: ``sum_i grad_i`` for the given (already clip-scaled)
#: backprops, without materialising the per-example gradients (ghost clipping's clipped sum).
BATCH_GRAD_SAMPLERS: dict[type, Sampler] = {}
#: module class -> function merging several calls' ``(activations, backprops)`` into one
#: call whose norm sampler gives the norm of the *summed* gradient (internal; Linear and
#: Embedding register one).
CALL_CONCATENATORS: dict[type, Callable[[list], tuple]] = {}


#: Registrations waiting for an optional library (internal): each function registers its
#: samplers once the library is imported (it never imports the library itself) and returns
#: whether it did; it is dropped once it has.
_DEFERRED: list[Callable[[], bool]] = []


def defer_registration(register: Callable[[], bool]) -> None:
    """Run ``register`` now and before every sampler lookup until it returns ``True``.

    For layers of an optional library: ``register`` checks whether the library is already
    imported (``sys.modules``) and registers its samplers if so, so dp_torch itself never
    imports the library, yet a model built from it finds its samplers.

    Args:
        register: ``() -> bool``, idempotent.
    """
    if not register():
        _DEFERRED.append(register)


def _run_deferred() -> None:
    if _DEFERRED:
        _DEFERRED[:] = [register for register in _DEFERRED if not register()]


def _as_classes(target: Union[type, Sequence[type]], fn_name: str) -> list[type]:
    classes = list(target) if isinstance(target, Sequence) else [target]
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(
                f"{fn_name}: target_class_or_classes must be nn.Module subclasses, got {cls!r}; "
                f"pass the layer class itself, e.g. {fn_name}(nn.Linear)."
            )
    return classes


def _registering(
    registry: dict[type, Sampler], target: Union[type, Sequence[type]], fn_name: str
) -> Callable[[Sampler], Sampler]:
    """A decorator storing its function in ``registry`` under each class of ``target``."""
    classes = _as_classes(target, fn_name)

    def decorator(fn: Sampler) -> Sampler:
        for cls in classes:
            registry[cls] = fn
        return fn

    return decorator


def register_grad_sampler(target_class_or_classes: Union[type, Sequence[type]]) -> Callable:
    """Register the decorated function as the grad sampler of one or more module classes.

    The function is called as ``fn(layer, activations, backprops)`` where ``activations``
    is the list of the layer's positional inputs (batch first, detached; keyword inputs
    are on ``activations.kwargs``) and ``backprops`` the gradient of the loss with respect
    to the layer's output, batch first and already multiplied by the batch size when the
    loss is a mean. It returns ``{parameter: per_example_gradient}`` with shapes
    ``[batch, *parameter.shape]``, for the layer's trainable parameters.

    Example:
        >>> @register_grad_sampler(MyLayer)
        ... def compute_my_layer_grad_sample(layer, activations, backprops):
        ...     return {layer.weight: ...}

    Args:
        target_class_or_classes: An ``nn.Module`` subclass or a sequence of them.

    Returns:
        The decorator (it returns the function unchanged).
    """
    return _registering(GRAD_SAMPLERS, target_class_or_classes, "register_grad_sampler")


def register_norm_sampler(target_class_or_classes: Union[type, Sequence[type]]) -> Callable:
    """Register the decorated function as the norm sampler (ghost clipping) of module classes.

    Same call convention as :func:`register_grad_sampler`, but the function returns
    ``{parameter: per_example_gradient_norm}`` with shapes ``[batch]``, computed without
    materialising the per-example gradients.

    Arguments and result as for :func:`register_grad_sampler`.
    """
    return _registering(NORM_SAMPLERS, target_class_or_classes, "register_norm_sampler")


def register_batch_grad_sampler(target_class_or_classes: Union[type, Sequence[type]]) -> Callable:
    """Register the decorated function as the batch-gradient sampler of module classes.

    Same call convention as :func:`register_grad_sampler`, but the function returns
    ``{parameter: sum over the batch of the per-example gradients}`` with the parameter's
    own shape, computed without materialising the per-example gradients. Ghost clipping
    calls it once per layer with ``backprops`` already multiplied by each example's clip
    factor, which gives the layer's share of the clipped sum ``sum_i c_i grad_i`` without a
    second backward pass. A layer without one gets ``grad_sampler(...)`` summed over the batch.

    Arguments and result as for :func:`register_grad_sampler`.
    """
    return _registering(BATCH_GRAD_SAMPLERS, target_class_or_classes, "register_batch_grad_sampler")


def find_sampler(registry: dict[type, Any], module: nn.Module) -> Optional[Any]:
    """Return the registry entry for ``type(module)`` or its nearest registered ancestor.

    An ancestor's entry is used only when the module's class inherits that ancestor's
    ``forward`` unchanged.

    Args:
        registry: One of the registries of this module.
        module: The layer.

    Returns:
        The entry, or ``None`` when there is none (the caller falls back to ``torch.func``).
    """
    cls = _registered_class(registry, module)
    return None if cls is None else registry[cls]


def _registered_class(registry: dict[type, Any], module: nn.Module) -> Optional[type]:
    _run_deferred()
    module_type = type(module)
    for cls in module_type.__mro__:
        if cls in registry:
            if cls is module_type or module_type.forward is cls.forward:
                return cls
            return None
    return None


def find_call_concatenator(sampler_registry: dict[type, Any], module: nn.Module) -> Optional[Callable]:
    """Return the :data:`CALL_CONCATENATORS` entry that may merge ``module``'s calls, or ``None``.

    Merging several calls into one and running the sampler once is valid only when the
    concatenator was written for the sampler that will run: both must resolve to the same
    registered class (a subclass with its own sampler but an inherited concatenator gets
    ``None``, so its calls are processed one by one).

    Args:
        sampler_registry: :data:`GRAD_SAMPLERS` or :data:`NORM_SAMPLERS`.
        module: The layer.

    Returns:
        ``concat(layer, [(activations, backprops), ...]) -> (activations, backprops)``, or ``None``.
    """
    cls = _registered_class(CALL_CONCATENATORS, module)
    if cls is None or _registered_class(sampler_registry, module) is not cls:
        return None
    return CALL_CONCATENATORS[cls]
