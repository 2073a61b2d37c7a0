"""``ModuleValidator``: find and fix modules that break DP-SGD (as ``opacus.validators``).

Validators and fixers are registered per module class with
:func:`~dp_torch.validators.register_module_validator` and
:func:`~dp_torch.validators.register_module_fixer`; a module uses the entry of the most
specific class in its MRO that has one.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional

import torch.nn as nn

from .errors import IllegalModuleConfigurationError, UnsupportedModuleError

__all__ = ["ModuleValidator"]

logger = logging.getLogger(__name__)


def _label(name: str, type_name: str) -> str:
    return f"{name or '<root>'} ({type_name})"


def _is_within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


class ModuleValidator:
    """Validates a model for private training and fixes what can be fixed.

    Also the namespace holding the registries ``VALIDATORS`` and ``FIXERS`` (class -> function).
    """

    VALIDATORS: dict[type, Callable] = {}
    FIXERS: dict[type, Callable] = {}

    @classmethod
    def _lookup(cls, registry: dict[type, Callable], module_type: type) -> Optional[Callable]:
        for klass in module_type.__mro__:
            if klass in registry:
                return registry[klass]
        return None

    @staticmethod
    def _locate(error: Exception, name: str, module: nn.Module) -> Exception:
        """Writes the qualified name and class of the offending module into ``error``."""
        if not isinstance(error, UnsupportedModuleError) or error.module_name is not None:
            return error
        relative = error.relative_name
        qualified = ".".join(part for part in (name, relative) if part)
        type_name = error.module_type or type(module).__name__
        error.module_name = qualified
        error.module_type = type_name
        label = _label(qualified, type_name)
        if error.args and isinstance(error.args[0], str):
            error.args = (f"{label}: {error.args[0]}",) + error.args[1:]
        else:
            error.args = (label,) + error.args
        return error

    @classmethod
    def _mode_errors(cls, root: nn.Module) -> list[UnsupportedModuleError]:
        if root.training:
            return []
        error = IllegalModuleConfigurationError(
            "the model is in eval mode. Model needs to be in training mode for private training "
            "(as in Opacus): the validators judge the modules as they behave in training, and an "
            "eval-mode BatchNorm or Dropout would hide what training does. Call model.train() "
            "before validating it or making it private."
        )
        return [cls._locate(error, "", root)]

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> list[UnsupportedModuleError]:
        """Runs the registered validators on ``module`` and all its submodules.

        Args:
            module: The model to check.
            strict: Raise instead of returning when a problem is found.

        Returns:
            Every problem found (empty if ``module`` is fit for private training). Each error
            names its submodule in ``module_name`` and at the start of its message.

        Raises:
            TypeError: If ``module`` is not an ``nn.Module``.
            UnsupportedModuleError: If ``strict`` and a problem was found; the message lists
                all of them and ``errors`` holds them.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        errors: list = cls._mode_errors(module)
        for name, sub in module.named_modules():
            validator = cls._lookup(cls.VALIDATORS, type(sub))
            if validator is not None:
                errors.extend(cls._locate(error, name, sub) for error in validator(sub))
        if strict and errors:
            lines = "\n".join(f"  - {error}" for error in errors)
            raise UnsupportedModuleError(
                f"{len(errors)} problem(s) make this model unfit for private training:\n{lines}\n"
                "ModuleValidator.fix(model) fixes those that say so.",
                errors=errors,
            )
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        """Whether :meth:`validate` finds no problem.

        Args:
            module: The model to check.

        Returns:
            ``True`` if ``module`` is fit for private training.
        """
        return not cls.validate(module, strict=False)

    @classmethod
    def fix(cls, module: nn.Module, **kwargs) -> nn.Module:
        """Returns a fixed copy of ``module``; ``module`` itself is left untouched.

        Each submodule whose class has a registered fixer is replaced by what the fixer
        returns (weights carried over where the replacement computes the same function, e.g.
        ``nn.LSTM`` -> ``DPLSTM``). Replacements keep the original's training mode and device.

        Args:
            module: The model to fix.
            **kwargs: Passed to every fixer, e.g. ``num_groups`` or ``replace_bn_with_in`` for
                BatchNorm.

        Returns:
            The fixed copy (a new object even if nothing needed fixing).

        Raises:
            TypeError: If ``module`` is not an ``nn.Module`` or cannot be deep-copied.
            ValueError: If a lazy submodule has not been materialised yet.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for name, sub in module.named_modules():
            if isinstance(sub, nn.modules.lazy.LazyModuleMixin) and sub.has_uninitialized_params():
                raise ValueError(
                    f"{_label(name, type(sub).__name__)} is a lazy module that has not seen an "
                    "input yet (its shapes are unknown and it cannot be copied); run one forward "
                    "pass before ModuleValidator.fix"
                )
        try:
            root = copy.deepcopy(module)
        except Exception as exc:  # noqa: BLE001 - re-raised with advice
            raise TypeError(
                f"ModuleValidator.fix works on a copy, but {type(module).__name__} cannot be "
                f"deep-copied ({exc}); make it copyable (e.g. remove hooks holding unpicklable "
                "objects) and retry"
            ) from exc
        replacements: dict[int, nn.Module] = {}
        replaced: list[str] = []
        for name, sub in list(root.named_modules(remove_duplicate=False)):
            if any(_is_within(name, prefix) for prefix in replaced):
                continue
            new = replacements.get(id(sub))
            if new is None:
                fixer = cls._lookup(cls.FIXERS, type(sub))
                if fixer is None:
                    continue
                new = fixer(sub, **kwargs)
                if new is not sub:
                    cls._match_placement(new, sub)
                replacements[id(sub)] = new
            if new is sub:
                continue
            if name == "":
                root = new
            else:
                parent_name, _, leaf = name.rpartition(".")
                setattr(root.get_submodule(parent_name), leaf, new)
            replaced.append(name)
            logger.info("Replaced %s with %s", _label(name, type(sub).__name__), type(new).__name__)
        return root

    @staticmethod
    def _match_placement(new: nn.Module, old: nn.Module) -> None:
        """Gives ``new`` the training mode and device of ``old``."""
        new.train(old.training)
        tensors = list(old.parameters()) + list(old.buffers())
        if tensors:
            new.to(device=tensors[0].device)

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        """:meth:`fix`, then :meth:`validate` with ``strict=True``.

        Args:
            module: The model to fix.
            **kwargs: Passed to every fixer.

        Returns:
            The fixed copy.

        Raises:
            UnsupportedModuleError: If the fixed model still has problems (e.g. eval mode).
        """
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed
