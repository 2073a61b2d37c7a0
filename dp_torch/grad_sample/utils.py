"""Registration decorators and wrapper factories (mirrors ``opacus.grad_sample.utils``)."""

from __future__ import annotations

from typing import Any, Union

import torch.nn as nn

from ._registry import register_batch_grad_sampler, register_grad_sampler, register_norm_sampler
from .grad_sample_module import GradSampleHooks, GradSampleModule
from .grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from .grad_sample_module_fast_gradient_clipping_fsdp import (
    GradSampleHooksFastGradientClippingFSDP,
    GradSampleModuleFastGradientClippingFSDP,
)
from .gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule
from .gsm_exp_weights import GradSampleModuleExpandedWeights
from .gsm_no_op import GradSampleHooksNoOp, GradSampleModuleNoOp

__all__ = [
    "GHOST_MODES",
    "GRAD_SAMPLE_MODES",
    "check_mode_arguments",
    "get_gsm_class",
    "get_hooks_class",
    "prepare_module",
    "register_batch_grad_sampler",
    "register_grad_sampler",
    "register_norm_sampler",
    "wrap_model",
]

#: Every ``grad_sample_mode`` dp_torch provides.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "ghost_fsdp", "ew", "no_op")

#: The modes that clip with per-example norms only (a ghost-clipping loss wrapper, flat clipping).
GHOST_MODES = ("ghost", "ghost_fsdp")

_WRAPPERS = {
    "hooks": GradSampleModule,
    "functorch": GradSampleModule,
    "ghost": GradSampleModuleFastGradientClipping,
    "ghost_fsdp": GradSampleModuleFastGradientClippingFSDP,
    "ew": GradSampleModuleExpandedWeights,
    "no_op": GradSampleModuleNoOp,
}
_HOOKS = {
    "hooks": GradSampleHooks,
    "functorch": GradSampleHooks,
    "ghost": GradSampleHooksFastGradientClipping,
    "ghost_fsdp": GradSampleHooksFastGradientClippingFSDP,
    "no_op": GradSampleHooksNoOp,
}


def _check_mode(grad_sample_mode: Any) -> None:
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"Unexpected grad_sample_mode: {grad_sample_mode!r}. Supported: 'hooks', 'functorch' "
            "(hooks with the torch.func fallback for every layer), 'ghost' (fast gradient "
            "clipping), 'ghost_fsdp' (ghost clipping of an FSDP2 model), 'ew' (batch-first "
            "per-sample gradients, see gsm_exp_weights) and 'no_op' (you set p.grad_sample "
            "yourself); Opacus' tensor-parallel ghost mode is not provided."
        )


def check_mode_arguments(grad_sample_mode: Any, *, wrap_model: bool, batch_first: bool) -> None:
    """Raise, before anything is built, for a mode that cannot take these arguments.

    Args:
        grad_sample_mode: The requested mode.
        wrap_model: Whether an ``nn.Module`` wrapper (``True``) or a hooks object is wanted.
        batch_first: Whether inputs are ``[batch, ...]``.

    Raises:
        ValueError: For an unknown mode, or ``wrap_model=False`` with ``"ew"`` (that mode
            exists only as a wrapper, as in Opacus).
        NotImplementedError: For ``"ew"`` with ``batch_first=False``.
    """
    _check_mode(grad_sample_mode)
    if grad_sample_mode == "ew" and not wrap_model:
        raise ValueError(
            'grad_sample_mode="ew" exists only as a wrapper module; got wrap_model=False. Use '
            'wrap_model=True, or grad_sample_mode="hooks" to attach hooks to the model itself.'
        )
    if grad_sample_mode == "ew" and not batch_first:
        raise NotImplementedError(
            'grad_sample_mode="ew" needs batch_first=True, got batch_first=False; use '
            'grad_sample_mode="hooks", which supports [T, batch, ...] inputs.'
        )


def get_gsm_class(grad_sample_mode: str) -> type:
    """The ``nn.Module`` wrapper class for a ``grad_sample_mode``.

    Args:
        grad_sample_mode: ``"hooks"`` or ``"functorch"`` (:class:`GradSampleModule`; use
            ``force_functorch=True`` for the latter, as :func:`wrap_model` does),
            ``"ghost"`` (:class:`GradSampleModuleFastGradientClipping`), ``"ghost_fsdp"``
            (:class:`GradSampleModuleFastGradientClippingFSDP`), ``"ew"``
            (:class:`GradSampleModuleExpandedWeights`) or ``"no_op"``
            (:class:`GradSampleModuleNoOp`).

    Raises:
        ValueError: For any other mode.
    """
    _check_mode(grad_sample_mode)
    return _WRAPPERS[grad_sample_mode]


def get_hooks_class(grad_sample_mode: str) -> type:
    """The non-wrapping hooks class for a ``grad_sample_mode`` (see :func:`get_gsm_class`).

    Raises:
        ValueError: For an unknown mode, and for ``"ew"``, which exists only as a wrapper.
    """
    _check_mode(grad_sample_mode)
    if grad_sample_mode not in _HOOKS:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} has no hooks variant (it exists only as a "
            "wrapper module); use wrap_model=True."
        )
    return _HOOKS[grad_sample_mode]


def prepare_module(
    model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args: Any, **kwargs: Any
) -> Union[AbstractGradSampleModule, AbstractGradSampleHooks]:
    """Attach per-sample-gradient machinery to ``model`` for ``grad_sample_mode``.

    Args:
        model: The model.
        grad_sample_mode: ``"hooks"``, ``"functorch"``, ``"ghost"``, ``"ghost_fsdp"``, ``"ew"``
            or ``"no_op"``.
        wrap_model: ``True`` returns an ``nn.Module`` wrapper (use it as the model);
            ``False`` attaches hooks to ``model`` itself and returns the hooks object.
        *args: Passed to the class.
        **kwargs: Passed to the class (``batch_first``, ``loss_reduction``, ``strict``,
            ``max_grad_norm`` and ``use_ghost_clipping`` for ghost mode, ...).

    Returns:
        The wrapper or hooks object.

    Raises:
        ValueError: For an unknown mode, or ``"ew"`` with ``wrap_model=False``.
        NotImplementedError: For ``"ew"`` with ``batch_first=False``.
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
