"""DP-SGD with Hugging Face ``accelerate``: :func:`make_private_with_accelerator`.

The model, optimizer and data loader are made private first
(:meth:`dp_torch.PrivacyEngine.make_private` with ``wrap_model=False``: the
per-sample-gradient hooks are attached to the user's module, which stays the model
to train and to save), then handed to ``Accelerator.prepare``. In one process,
``prepare`` keeps the Poisson batch sampler (so the batches, the sampling rate and
the accounting are unchanged), wraps the DP optimizer in an ``AcceleratedOptimizer``
whose ``step`` and ``zero_grad`` call the DP optimizer's, and places the model.

A training loop is then the usual ``accelerate`` one::

    result = make_private_with_accelerator(
        accelerator, engine, module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y in result.data_loader:
        loss = criterion(result.model(x), y)   # result.criterion in ghost mode
        accelerator.backward(loss)
        result.optimizer.step()
        result.optimizer.zero_grad()

What is refused, and why: several processes (use :mod:`dp_torch.distributed`), the
``Accelerator``'s own gradient accumulation (it would accumulate per-example
gradients of several Poisson batches; split a logical batch with
:class:`~dp_torch.utils.batch_memory_manager.BatchMemoryManager` around
``result.dp_optimizer`` instead, which adds the noise once per logical batch) and
``fp16`` (its loss scaler; use ``bf16``).

Guarantee: that of :meth:`~dp_torch.PrivacyEngine.make_private`: every batch comes
from ``result.data_loader`` and every update from ``result.optimizer``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from accelerate import Accelerator
from torch import nn, optim
from torch.utils.data import DataLoader

from dp_torch.optimizers import DPOptimizer
from dp_torch.privacy_engine import PrivacyEngine
from dp_torch.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

__all__ = ["PrivateAccelerated", "make_private_with_accelerator"]


class PrivateAccelerated(NamedTuple):
    """What :func:`make_private_with_accelerator` returns.

    Attributes:
        model: The user's module, prepared by the accelerator (hooks attached in place).
        optimizer: The ``AcceleratedOptimizer`` around :attr:`dp_optimizer`.
        data_loader: The Poisson data loader, prepared by the accelerator.
        criterion: The ghost-clipping loss (``grad_sample_mode="ghost"``), else ``None``.
        dp_optimizer: The DP optimizer itself (for ``BatchMemoryManager``, checkpoints).
        hooks: The per-sample-gradient hooks object (``hooks.cleanup()`` removes them).
    """

    model: nn.Module
    optimizer: Any
    data_loader: DataLoader
    criterion: Optional[DPLossFastGradientClipping]
    dp_optimizer: DPOptimizer
    hooks: Any


def _check_accelerator(accelerator: Any) -> None:
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}.")
    if accelerator.num_processes != 1:
        raise NotImplementedError(
            f"make_private_with_accelerator runs in one process (got {accelerator.num_processes}); "
            "for several, use dp_torch.distributed (DPDDP) with make_private."
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}) "
            "would accumulate several Poisson batches; use gradient_accumulation_steps=1 and split "
            "each logical batch with dp_torch's BatchMemoryManager(optimizer=result.dp_optimizer)."
        )
    if accelerator.mixed_precision == "fp16":
        raise ValueError("fp16 (with its loss scaler) is not supported here; use mixed_precision='bf16'.")


def make_private_with_accelerator(
    accelerator: Accelerator,
    privacy_engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: optim.Optimizer,
    data_loader: DataLoader,
    **make_private_kwargs: Any,
) -> PrivateAccelerated:
    """``privacy_engine.make_private(..., wrap_model=False)``, then ``accelerator.prepare``.

    Args:
        accelerator: A one-process ``Accelerator`` without gradient accumulation or fp16.
        privacy_engine: The engine (its accountant records the steps).
        module: The model.
        optimizer: An optimizer over ``module``'s parameters.
        data_loader: The training loader (made Poisson by ``make_private``).
        **make_private_kwargs: The other :meth:`~dp_torch.PrivacyEngine.make_private`
            arguments (``noise_multiplier``, ``max_grad_norm``, ``grad_sample_mode``,
            ``criterion``, ...), except ``wrap_model``.

    Returns:
        The prepared objects (see :class:`PrivateAccelerated`).

    Raises:
        TypeError: If ``wrap_model`` is passed or ``accelerator`` is not an ``Accelerator``.
        ValueError: For gradient accumulation or fp16 in the accelerator, or as
            ``make_private``.
        NotImplementedError: For more than one process.
    """
    if "wrap_model" in make_private_kwargs:
        raise TypeError("make_private_with_accelerator always uses wrap_model=False; do not pass it.")
    _check_accelerator(accelerator)
    out = privacy_engine.make_private(
        module=module, optimizer=optimizer, data_loader=data_loader, wrap_model=False,
        **make_private_kwargs,
    )
    hooks, dp_optimizer, loader = out[0], out[1], out[-1]
    criterion = out[2] if len(out) == 4 else None
    model, accelerated, prepared_loader = accelerator.prepare(module, dp_optimizer, loader)
    return PrivateAccelerated(model, accelerated, prepared_loader, criterion, dp_optimizer, hooks)
