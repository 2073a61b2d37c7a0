"""Registration decorators and wrapper factories (mirrors ``opacus.grad_sample.utils``)."""

from __future__ import annotations

from typing import Any, Union

import torch.nn as nn

from ._registry import register_grad_sampler, register_norm_sampler
from .grad_sample_module import GradSampleHooks, GradSampleModule
from .grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from .gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule

__all__ = [
    "get_gsm_class",
    "get_hooks_class",
    "prepare_module",
    "register_grad_sampler",
    "register_norm_sampler",
    "wrap_model",
]

_MODES = ("hooks", "functorch", "ghost")


def _check_mode(grad_sample_mode: Any) -> None:
    if grad_sample_mode not in _MODES:
        raise ValueError(
            f"Unexpected grad_sample_mode: {grad_sample_mode!r}. Supported: 'hooks', 'functorch' "
            "(hooks with the torch.func fallback for every layer) and 'ghost' (fast gradient "
            "clipping); Opacus' 'ew', 'no_op' and the distributed ghost modes are not provided."
        )


def get_gsm_class(grad_sample_mode: str) -> type:
    """The ``nn.Module`` wrapper class for a ``grad_sample_mode``.

    Args:
        grad_sample_mode: ``"hooks"`` or ``"functorch"`` (:class:`GradSampleModule`; use
            ``force_functorch=True`` for the latter, as :func:`wrap_model` does) or
            ``"ghost"`` (:class:`GradSampleModuleFastGradientClipping`).

    Raises:
        ValueError: For any other mode.
    """
    _check_mode(grad_sample_mode)
    return GradSampleModuleFastGradientClipping if grad_sample_mode == "ghost" else GradSampleModule


def get_hooks_class(grad_sample_mode: str) -> type:
    """The non-wrapping hooks class for a ``grad_sample_mode`` (see :func:`get_gsm_class`)."""
    _check_mode(grad_sample_mode)
    return GradSampleHooksFastGradientClipping if grad_sample_mode == "ghost" else GradSampleHooks


def prepare_module(
    model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args: Any, **kwargs: Any
) -> Union[AbstractGradSampleModule, AbstractGradSampleHooks]:
    """Attach per-sample-gradient machinery to ``model`` for ``grad_sample_mode``.

    Args:
        model: The model.
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"``.
        wrap_model: ``True`` returns an ``nn.Module`` wrapper (use it as the model);
            ``False`` attaches hooks to ``model`` itself and returns the hooks object.
        *args: Passed to the class.
        **kwargs: Passed to the class (``batch_first``, ``loss_reduction``, ``strict``,
            ``max_grad_norm`` and ``use_ghost_clipping`` for ghost mode, ...).

    Returns:
        The wrapper or hooks object.

    Raises:
        ValueError: For an unknown mode.
    """
    _check_mode(grad_sample_mode)
    if grad_sample_mode == "functorch":
        kwargs["force_functorch"] = True
    cls = get_gsm_class(grad_sample_mode) if wrap_model else get_hooks_class(grad_sample_mode)
    return cls(model, *args, **kwargs)


def wrap_model(
    model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args: Any, **kwargs: Any
) -> Union[AbstractGradSampleModule, AbstractGradSampleHooks]:
    """Alias of :func:`prepare_module` (the Opacus name)."""
    return prepare_module(model, grad_sample_mode, wrap_model, *args, **kwargs)
