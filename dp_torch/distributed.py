"""Data-parallel DP training across processes (Opacus' ``opacus.distributed``).

``DPDDP`` (:class:`DifferentiallyPrivateDistributedDataParallel`) broadcasts rank 0's parameters
and never all-reduces gradients itself; a plain ``DistributedDataParallel`` is accepted by
``make_private`` with its gradient synchronisation switched off (:func:`disable_gradient_sync`).

Guarantee: a step on ``W`` ranks is the step of one process training on the union of the ranks'
batches: each rank Poisson-samples its shard with the global rate, clips its own examples (nothing
unclipped leaves a rank), rank 0 adds the noise once, one all-reduce sums the clipped sums, and
``"mean"`` divides by the global expected batch size. If that all-reduce fails the optimizer
raises :class:`DistributedStepError` with nothing applied. Details: docs/design.md ("Distributed
training").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DifferentiallyPrivateDistributedDataParallel",
    "DistributedStepError",
    "all_reduce_sum",
    "average_gradients",
    "check_ddp",
    "disable_gradient_sync",
    "require_process_group",
]


class DistributedStepError(RuntimeError):
    """The all-reduce of a distributed DP step failed; nothing was applied.

    Raised by the distributed DP optimizers when a peer process crashed or timed
    out. Parameters, optimizer state and the privacy accountant are unchanged;
    restart every rank (e.g. from the last checkpoint).
    """


def require_process_group(what: str = "DifferentiallyPrivateDistributedDataParallel") -> None:
    """Raise ``RuntimeError`` naming ``what`` unless a ``torch.distributed`` group is initialised.

    Args:
        what: The object or call that needs the group (quoted in the message).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised process group; call "
            "torch.distributed.init_process_group(backend, ...) on every rank first."
        )


def average_gradients(model: nn.Module) -> None:
    """Average ``p.grad`` of every trainable parameter over all ranks (sum, then divide).

    Not a DP operation (the gradients are whatever ``p.grad`` holds); kept for
    Opacus compatibility.

    Args:
        model: The model whose gradients to average (each rank calls this).

    Raises:
        RuntimeError: If no process group is initialised.
    """
    require_process_group("average_gradients")
    world_size = dist.get_world_size()
    for param in model.parameters():
        if not param.requires_grad or param.grad is None:
            continue
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= world_size


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``tensors`` over all ranks in as few collectives as possible; inputs are not changed.

    Tensors are grouped by ``(device, dtype)``; each group is flattened into one
    buffer and reduced with one ``all_reduce``, in a fixed order, so every rank
    issues the same collectives.

    Args:
        tensors: The local tensors (same shapes, dtypes and order on every rank).

    Returns:
        New tensors holding the sums, shaped like the inputs.

    Raises:
        DistributedStepError: If a collective fails (peer crash or timeout).
    """
    out: list[Any] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (device, dtype), idx in groups.items():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        except RuntimeError as err:
            raise DistributedStepError(
                f"rank {dist.get_rank()}: the all-reduce of the clipped, noised gradient sums "
                f"failed ({type(err).__name__}: {str(err).strip()[:300]}). A peer process crashed "
                "or did not reach this step within the process group's timeout "
                "(init_process_group(timeout=...)). Nothing was applied: parameters, optimizer "
                "state and the privacy accountant are unchanged. Restart all ranks, e.g. from "
                "the last checkpoint."
            ) from err
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out


# --------------------------------------------------------------------------- torch DDP


def _local_only_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook that communicates nothing: the bucket keeps the local gradients.

    ``(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]``; left
    unannotated because DDP compares the annotations with the classes themselves and
    this module's annotations are strings (``from __future__ import annotations``).
    """
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _registered_comm_hook(ddp: nn.parallel.DistributedDataParallel) -> str:
    """Name of the communication hook registered on ``ddp`` (``""`` when none)."""
    try:
        return str(ddp._get_ddp_logging_data().get("comm_hook", "") or "")
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return ""


def check_ddp(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Raise if ``ddp`` cannot be trained privately; changes nothing.

    Refused: a DDP with its own communication hook (it would all-reduce gradients
    before clipping), ``static_graph=True`` (it schedules a delayed all-reduce),
    ``find_unused_parameters=True`` and buffer broadcasting over a model with
    buffers (both run collectives in forward or backward passes; ranks whose
    Poisson batches are split into different numbers of ``BatchMemoryManager``
    chunks would then issue different collectives and hang).

    Args:
        ddp: The ``torch.nn.parallel.DistributedDataParallel`` model.

    Raises:
        ValueError: Naming the setting and the fix.
    """
    hook = _registered_comm_hook(ddp)
    if hook and hook != _local_only_hook.__qualname__:
        raise ValueError(
            f"the DistributedDataParallel model has the communication hook {hook!r}; DP training "
            "must not all-reduce gradients before they are clipped. Pass a DDP without a "
            "communication hook (make_private installs a local-only one) or use DPDDP."
        )
    if getattr(ddp, "static_graph", False):
        raise ValueError(
            "DistributedDataParallel(static_graph=True) schedules its own delayed all-reduce "
            "in the first backward pass; DP training must not all-reduce gradients before "
            "clipping. Use static_graph=False or DPDDP."
        )
    if ddp.find_unused_parameters:
        raise ValueError(
            "DistributedDataParallel(find_unused_parameters=True) runs a collective in every "
            "backward pass, which deadlocks when ranks take different numbers of physical "
            "steps (Poisson batches of different sizes under BatchMemoryManager). Use "
            "find_unused_parameters=False or DPDDP."
        )
    buffers = [name for name, _ in ddp.module.named_buffers()]
    if buffers and getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", False)):
        raise ValueError(
            f"DistributedDataParallel with buffer broadcasting (broadcast_buffers / "
            f"forward_sync_buffers=True, the default) over a model with buffers "
            f"({buffers[:3]}{' ...' if len(buffers) > 3 else ''}) broadcasts them in every "
            "forward pass, which deadlocks when ranks take different numbers of physical steps. "
            "Pass forward_sync_buffers=False (broadcast_buffers=False before torch 2.13; DP "
            "models have no running statistics to sync) or use DPDDP."
        )


def disable_gradient_sync(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Make ``ddp`` a purely local module: it never communicates gradients.

    ``make_private`` calls it for a ``DistributedDataParallel`` model, so that DDP
    never all-reduces the *unclipped* gradients of the backward pass; the DP
    optimizer all-reduces the clipped, noised sums instead. Two switches:

    * ``ddp.require_backward_grad_sync = False`` (what ``ddp.no_sync()`` sets for
      its block, here for good): DDP's reducer stays idle, so there is no bucket
      work and no collective in any forward or backward pass, including the
      one-time bucket rebuild after the first iteration (a broadcast that would
      otherwise hang ranks taking different numbers of ``BatchMemoryManager``
      chunks);
    * a local-only communication hook, so that even if synchronisation is switched
      back on, the buckets are never all-reduced.

    Idempotent. A DDP communication hook cannot be removed again.

    Args:
        ddp: The DDP model (checked with :func:`check_ddp`).

    Raises:
        ValueError: See :func:`check_ddp`.
    """
    check_ddp(ddp)
    if _registered_comm_hook(ddp) != _local_only_hook.__qualname__:
        ddp.register_comm_hook(state=None, hook=_local_only_hook)
    ddp.require_backward_grad_sync = False


# --------------------------------------------------------------------------- DPDDP


class DifferentiallyPrivateDistributedDataParallel(nn.Module):
    """Wrap a model for data-parallel DP training (Opacus' ``DPDDP``).

    Construction broadcasts the model's parameters and buffers from rank 0 (in
    place, without autograd), so every rank holds rank 0's initialisation.
    ``forward`` calls the wrapped model. Gradients are *not* synchronised here:
    each rank keeps its per-example gradients, and the distributed DP optimizer
    that ``PrivacyEngine.make_private`` builds for this model all-reduces the
    clipped, noised sums (see the module docstring).

    Attributes:
        module: The wrapped model (state-dict keys get the ``module.`` prefix).

    Example:
        >>> torch.distributed.init_process_group("gloo", ...)
        >>> model = DPDDP(Net())
        >>> model, optimizer, loader = PrivacyEngine().make_private(
        ...     module=model, optimizer=SGD(model.parameters(), lr=0.1),
        ...     data_loader=DataLoader(dataset, batch_size=256),  # global expected batch
        ...     noise_multiplier=1.0, max_grad_norm=1.0)
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
        require_process_group()
        super().__init__()
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)
        self.module = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self.module(*args, **kwargs)
