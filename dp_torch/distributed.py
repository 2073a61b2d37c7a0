"""Data-parallel DP training across processes (Opacus' ``opacus.distributed``).

:class:`DifferentiallyPrivateDistributedDataParallel` (``DPDDP``) is a thin
``nn.Module`` wrapper over ``torch.distributed``: at construction it broadcasts
every parameter and buffer from rank 0, so all ranks start from the same model,
and its ``forward`` calls the wrapped model. Unlike ``torch``'s
``DistributedDataParallel`` it does **not** all-reduce gradients in the backward
pass: in DP-SGD each rank must clip its own examples first, so the all-reduce of
the clipped, noised sums belongs to the distributed DP optimizer, as in Opacus.

Status: the distributed DP optimizers (Opacus' ``DistributedDPOptimizer`` family)
are a later issue of this project and are not in :mod:`dp_torch.optimizers` yet.
Until they are, ``PrivacyEngine.make_private`` refuses a ``DPDDP`` (or ``torch``
``DistributedDataParallel``) model with a ``NotImplementedError`` that says so;
wrapping a model, synchronising its parameters and :func:`average_gradients`
work today.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DifferentiallyPrivateDistributedDataParallel", "average_gradients"]


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "DifferentiallyPrivateDistributedDataParallel needs an initialised process group; "
            "call torch.distributed.init_process_group(backend, ...) on every rank first."
        )


def average_gradients(model: nn.Module) -> None:
    """Average ``p.grad`` of every trainable parameter over all ranks (sum, then divide).

    Args:
        model: The model whose gradients to average (each rank calls this).

    Raises:
        RuntimeError: If no process group is initialised.
    """
    _require_process_group()
    world_size = dist.get_world_size()
    for param in model.parameters():
        if not param.requires_grad or param.grad is None:
            continue
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= world_size


class DifferentiallyPrivateDistributedDataParallel(nn.Module):
    """Wrap a model for data-parallel DP training (Opacus' ``DPDDP``).

    Construction broadcasts the model's parameters and buffers from rank 0 (in
    place, without autograd), so every rank holds rank 0's initialisation.
    ``forward`` calls the wrapped model; gradients are not synchronised here (see
    the module docstring).

    Attributes:
        module: The wrapped model (state-dict keys get the ``module.`` prefix).

    Example:
        >>> torch.distributed.init_process_group("gloo", ...)
        >>> model = DPDDP(Net())
    """

    def __init__(self, model: nn.Module) -> None:
        """Broadcast ``model``'s state from rank 0 and wrap it.

        Args:
            model: The model (already on this rank's device).

        Raises:
            TypeError: If ``model`` is not an ``nn.Module``.
            RuntimeError: If no process group is initialised.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        _require_process_group()
        super().__init__()
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)
        self.module = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self.module(*args, **kwargs)
