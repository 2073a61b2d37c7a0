"""Registration of validators and fixers by decorator (as ``opacus.validators.utils``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, TypeVar, Union

from .module_validator import ModuleValidator

__all__ = ["register_module_validator", "register_module_fixer", "DEFAULT_MODULE_VALIDATOR"]

DEFAULT_MODULE_VALIDATOR = ModuleValidator

F = TypeVar("F", bound=Callable)


def _target_list(target_class_or_classes: Union[type, Sequence[type]]) -> list[type]:
    targets = (
        list(target_class_or_classes)
        if isinstance(target_class_or_classes, Sequence)
        else [target_class_or_classes]
    )
    for target in targets:
        if not isinstance(target, type):
            raise TypeError(
                f"target_class_or_classes must be a class or a sequence of classes, got "
                f"{target!r} in {target_class_or_classes!r}"
            )
    return targets


def _registering(
    target_class_or_classes: Union[type, Sequence[type]], validator_class: type, registry: str
) -> Callable[[F], F]:
    """A decorator storing its function in ``validator_class.<registry>`` for each target."""
    targets = _target_list(target_class_or_classes)

    def decorator(f: F) -> F:
        table = getattr(validator_class, registry)
        for target in targets:
            table[target] = f
        return f

    return decorator


def register_module_validator(
    target_class_or_classes: Union[type, Sequence[type]],
    validator_class: type = DEFAULT_MODULE_VALIDATOR,
) -> Callable[[F], F]:
    """Registers the decorated function as the validator of one or more module classes.

    The validator is called with each submodule of that class (or of a subclass, unless a more
    specific class has its own validator) and returns a list of
    :class:`~dp_torch.validators.errors.UnsupportedModuleError` (empty when the module is fine).
    ``ModuleValidator`` adds the submodule's qualified name to each error.

    Example:
        >>> @register_module_validator(MyLayer)
        ... def validate(module: MyLayer) -> list[UnsupportedModuleError]:
        ...     return []

    Args:
        target_class_or_classes: The class, or classes, the validator applies to.
        validator_class: The ``ModuleValidator`` (sub)class whose ``VALIDATORS`` registry
            receives it.

    Returns:
        The decorator, which returns the function unchanged.
    """
    return _registering(target_class_or_classes, validator_class, "VALIDATORS")


def register_module_fixer(
    target_class_or_classes: Union[type, Sequence[type]],
    validator_class: type = DEFAULT_MODULE_VALIDATOR,
) -> Callable[[F], F]:
    """Registers the decorated function as the fixer of one or more module classes.

    The fixer is called as ``fixer(module, **kwargs)`` with the keyword arguments given to
    ``ModuleValidator.fix`` and returns the module to put in place of ``module`` (``module``
    itself when there is nothing to fix). It must not modify ``module``.

    Example:
        >>> @register_module_fixer(MyLayer)
        ... def fix(module: MyLayer, **kwargs) -> nn.Module:
        ...     return MyDPLayer.from_module(module)

    Arguments and result are those of :func:`register_module_validator`, with the ``FIXERS``
    registry in place of ``VALIDATORS``.
    """
    return _registering(target_class_or_classes, validator_class, "FIXERS")
