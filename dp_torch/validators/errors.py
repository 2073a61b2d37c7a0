"""Errors reported by :class:`~dp_torch.validators.ModuleValidator` (as ``opacus.validators.errors``).

Every error ``ModuleValidator.validate`` returns carries the qualified name of the offending
submodule in ``module_name`` (``""`` for the root) and its class name in ``module_type``, and its
message starts with ``"<name> (<Type>): "``, e.g. ``"features.3 (BatchNorm2d): ..."``.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "UnsupportedError",
    "UnsupportedModuleError",
    "UnsupportableModuleError",
    "NotYetSupportedModuleError",
    "ShouldReplaceModuleError",
    "IllegalModuleConfigurationError",
]


class UnsupportedError(ValueError):
    """Raised for components that cannot be trained with differential privacy as they are."""


class UnsupportedModuleError(UnsupportedError):
    """A module that cannot be trained privately as it is.

    Attributes:
        module_name: Qualified name of the offending submodule, set by ``ModuleValidator``.
        module_type: Class name of the offending submodule.
        errors: When raised by ``ModuleValidator.validate(..., strict=True)``, every problem
            found (each itself an ``UnsupportedModuleError``); empty otherwise.
    """

    module_name: Optional[str] = None
    module_type: Optional[str] = None
    relative_name: Optional[str] = None

    def __init__(self, *args: object, errors: Optional[list] = None) -> None:
        super().__init__(*args)
        self.errors: list = list(errors or [])

    def for_child(self, relative_name: str, module_type: str) -> "UnsupportedModuleError":
        """Marks the error as being about a descendant of the validated module.

        A validator registered for a container (such as ``nn.Sequential``) uses this so that
        the error names the child, not the container.

        Args:
            relative_name: Path of the child below the validated module, e.g. ``"2"``.
            module_type: Class name of the child.

        Returns:
            ``self``.
        """
        self.relative_name = relative_name
        self.module_type = module_type
        return self


class UnsupportableModuleError(UnsupportedModuleError):
    """A module that can never be supported (its output mixes examples)."""


class NotYetSupportedModuleError(UnsupportedModuleError):
    """A module that is not supported yet."""


class ShouldReplaceModuleError(UnsupportedModuleError):
    """A module supported through a replacement that ``ModuleValidator.fix`` installs."""


class IllegalModuleConfigurationError(UnsupportedModuleError):
    """A supported module in a configuration that breaks privacy or per-sample gradients.

    Examples: the model is not in training mode; InstanceNorm tracks running statistics; an
    in-place activation overwrites the output of a layer whose gradient is hooked.
    """
