"""Base classes of the per-sample-gradient wrappers (mirrors ``opacus.grad_sample.gsm_base``).

:class:`AbstractGradSampleHooks` attaches to a model without wrapping it;
:class:`AbstractGradSampleModule` is an ``nn.Module`` wrapper around the model
(``_module``), so its ``state_dict`` keys carry the ``_module.`` prefix, as in Opacus.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch.nn as nn

__all__ = [
    "OPACUS_PARAM_MONKEYPATCH_ATTRS",
    "AbstractGradSampleHooks",
    "AbstractGradSampleModule",
    "check_wrapper_args",
]

logger = logging.getLogger(__name__)

#: Attributes this package may set on parameters; :meth:`AbstractGradSampleHooks.cleanup`
#: removes them.
OPACUS_PARAM_MONKEYPATCH_ATTRS = [
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
    "_dp_torch_name",
]

_LOSS_REDUCTIONS = ("mean", "sum")


def check_wrapper_args(module: Any, batch_first: Any, loss_reduction: Any) -> None:
    """Validate the arguments shared by every wrapper; raise before any state changes.

    Args:
        module: The model to wrap.
        batch_first: Whether the batch is on dimension 0.
        loss_reduction: ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module`` or ``batch_first`` not a bool.
        ValueError: If ``loss_reduction`` is not ``"mean"`` or ``"sum"``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"m must be a torch.nn.Module, got {type(module).__name__}; pass the model.")
    if not isinstance(batch_first, bool):
        raise TypeError(
            f"batch_first must be a bool, got {batch_first!r}; use True when inputs are "
            "[batch, ...] and False when they are [T, batch, ...]."
        )
    if loss_reduction not in _LOSS_REDUCTIONS:
        raise ValueError(
            f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}; use the reduction "
            "of your loss over the batch."
        )


class AbstractGradSampleHooks(ABC):
    """Attaches to a model so that its trainable parameters get a ``.grad_sample`` field.

    Attributes:
        batch_first: Whether the batch is dimension 0 of every layer input (else dimension 1).
        loss_reduction: ``"mean"`` or ``"sum"``, the reduction of the loss over the batch.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean"):
        """Store the model and set ``p.grad_sample = None`` on its trainable parameters.

        Args:
            m: The model.
            batch_first: ``True`` when layer inputs are ``[batch, ...]``, ``False`` when
                ``[K, batch, ...]``.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss aggregates the batch.
        """
        check_wrapper_args(m, batch_first, loss_reduction)
        self._module = m
        self.batch_first = batch_first
        self.loss_reduction = loss_reduction
        for p in m.parameters():
            if p.requires_grad:
                p.grad_sample = None

    def _model_parameters(self) -> list:
        """The model's registered parameters, those the optimizer steps (FSDP2 swaps stand-ins
        into the layers around their forward and backward; this list never changes)."""
        return list(self._module.parameters())

    def set_grad_sample_to_none(self) -> None:
        """Set ``p.grad_sample = None`` on every parameter of the model."""
        for p in self._model_parameters():
            p.grad_sample = None

    def del_grad_sample(self) -> None:
        """Delete the ``grad_sample`` attribute from every parameter that has one."""
        for p in self._model_parameters():
            if hasattr(p, "grad_sample"):
                del p.grad_sample

    def forbid_grad_accumulation(self) -> None:
        """Raise on a backward pass that would add to per-sample gradients not yet cleared."""

    def allow_grad_accumulation(self) -> None:
        """Let repeated backward passes accumulate per-sample gradients (the default)."""

    @abstractmethod
    def remove_hooks(self) -> None:
        """Remove every hook this object installed."""

    def cleanup(self) -> None:
        """Remove the hooks and every attribute this package set on the parameters."""
        try:
            self.remove_hooks()
        finally:
            for p in self._model_parameters():
                for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS:
                    if hasattr(p, attr):
                        delattr(p, attr)


class AbstractGradSampleModule(nn.Module, AbstractGradSampleHooks, ABC):
    """An ``nn.Module`` wrapper (``_module``) whose parameters get ``.grad_sample``."""

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean"):
        """Wrap ``m``.

        Args:
            m: The model.
            batch_first: ``True`` when layer inputs are ``[batch, ...]``.
            loss_reduction: ``"mean"`` or ``"sum"``.
        """
        check_wrapper_args(m, batch_first, loss_reduction)
        nn.Module.__init__(self)
        AbstractGradSampleHooks.__init__(self, m, batch_first=batch_first, loss_reduction=loss_reduction)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self._module(*args, **kwargs)

    def __getattr__(self, item: str) -> Any:
        """Fall back to the wrapped model's submodules by name (as Opacus does)."""
        prop = getattr(type(self), item, None)
        if isinstance(prop, property):
            return prop.fget(self)  # a property that raised AttributeError: keep its message
        try:
            return super().__getattr__(item)
        except AttributeError as err:
            modules = self.__dict__.get("_modules", {})
            inner = modules.get("_module")
            if inner is not None and item:
                submodules = dict(inner.named_modules())
                if item in submodules:
                    return submodules[item]
            raise err

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear ``p.grad`` and ``p.grad_sample`` of every parameter.

        Args:
            set_to_none: Passed to ``nn.Module.zero_grad`` for ``p.grad``;
                ``p.grad_sample`` is always set to ``None``, since per-sample gradients
                of different backward passes are kept as a list whose shape varies.
        """
        self.set_grad_sample_to_none()
        nn.Module.zero_grad(self, set_to_none)

    def to_standard_module(self) -> nn.Module:
        """Remove every hook and per-sample attribute and return the wrapped model."""
        self._close()
        return self._module

    def _close(self) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._module!r})"
