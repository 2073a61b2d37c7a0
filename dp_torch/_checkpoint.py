"""Checkpoints of a private PyTorch run: one ``torch.save`` file.

A checkpoint holds the module's and optimizer's state dicts, the privacy ledger
(the accountant's history), the schedulers' states, the DP optimizer's settings
and noise-generator state (:meth:`dp_torch.optimizers.DPOptimizer.dp_state_dict`),
the Poisson sampler's position, and the user's own entries. Every object
serialises itself; this module only gathers the parts, and restores them in
order.

Guarantee: :func:`load_checkpoint` is all or nothing: if any part fails to load,
every part loaded before it is restored and the error is raised.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Mapping
from typing import IO, Any, BinaryIO, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from dp_torch._engine_checks import distributed_kind
from dp_torch.grad_sample import GradSampleHooksFastGradientClipping
from dp_torch.optimizers import DPOptimizer
from dpcore.accounting import validate_history

__all__ = ["CHECKPOINT_KEYS", "PRIVACY_STATE_NAME", "load_checkpoint", "read_privacy_state", "save_checkpoint"]

#: The privacy-state file of folder checkpoints (``DPTrainer``'s, sharded FSDP runs'): the
#: accountant's ledger and the DP optimizer's settings.
PRIVACY_STATE_NAME = "dp_privacy_state.pt"


def read_privacy_state(directory: str, writer: str) -> dict[str, Any]:
    """Load ``directory``'s :data:`PRIVACY_STATE_NAME` (tensors and plain values only).

    Args:
        directory: The checkpoint folder.
        writer: What writes such checkpoints, named in the error.

    Raises:
        FileNotFoundError: If the file is missing (resuming without the ledger would
            under-report epsilon).
    """
    path = os.path.join(directory, PRIVACY_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: a {writer} checkpoint carries the privacy ledger there, and "
            f"resuming without it would under-report epsilon. Resume from a checkpoint written by {writer}."
        )
    return torch.load(path, weights_only=True)

#: Checkpoint keys written by :func:`save_checkpoint`; user keys may not use them.
CHECKPOINT_KEYS = (
    "module_state_dict",
    "privacy_accountant_state_dict",
    "optimizer_state_dict",
    "noise_scheduler_state_dict",
    "grad_clip_scheduler_state_dict",
    "dp_optimizer_state_dict",
    "data_loader_sampler_state_dict",
    "dp_torch_checkpoint_version",
)
_CHECKPOINT_VERSION = 1

PathOrFile = Union[str, os.PathLike, BinaryIO, IO[bytes]]
#: ``(snapshot, apply, restore)``: take the current state, load the new one, put the old back.
Step = tuple[Callable[[], Any], Callable[[], None], Callable[[Any], None]]


# --------------------------------------------------------------------------- helpers


def _stateful_sampler(data_loader: Optional[DataLoader]) -> Any:
    """The Poisson batch sampler behind ``data_loader`` (through BatchMemoryManager), or ``None``."""
    sampler = getattr(data_loader, "batch_sampler", None)
    while sampler is not None:
        if callable(getattr(sampler, "state_dict", None)) and callable(
            getattr(sampler, "load_state_dict", None)
        ):
            return sampler
        sampler = getattr(sampler, "sampler", None)
    return None


def _process_rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _toggle_ddp_prefix(key: str) -> str:
    """``key`` with the ``module.`` of a DDP wrapper added or removed (after a GSM's ``_module.``)."""
    head = "_module." if key.startswith("_module.") else ""
    rest = key[len(head):]
    if rest.startswith("module."):
        return head + rest[len("module."):]
    return head + "module." + rest


def _match_ddp_prefix(saved: Any, module: nn.Module) -> Any:
    """``saved`` re-keyed across a DDP wrapper's ``module.`` prefix when that makes the keys match.

    A checkpoint of ``GradSampleModule(DPDDP(net))`` has keys ``_module.module.*``, one of
    ``GradSampleModule(net)`` has ``_module.*``; either loads into the other. Anything else
    is returned unchanged (and ``load_state_dict`` reports the mismatch as usual).
    """
    if not isinstance(saved, Mapping):
        return saved
    target = set(module.state_dict().keys())
    if set(saved) == target:
        return saved
    toggled = {_toggle_ddp_prefix(k): v for k, v in saved.items()}
    if len(toggled) == len(saved) and set(toggled) == target:
        return type(saved)(toggled) if isinstance(saved, dict) else toggled
    return saved


def _module_snapshot(module: nn.Module) -> dict[str, Any]:
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in module.state_dict().items()
    }


def _apply_all(steps: list[Step]) -> None:
    """Run ``(snapshot, apply, restore)`` steps in order; on an error undo the done ones."""
    done: list[tuple[Callable[[Any], None], Any]] = []
    try:
        for snapshot, apply, restore in steps:
            saved = snapshot()
            done.append((restore, saved))
            apply()
    except BaseException:
        for restore, saved in reversed(done):
            restore(saved)
        raise


# --------------------------------------------------------------------------- save


def _check_can_save(user: Mapping[str, Any], optimizer: Any) -> None:
    clash = sorted(set(user) & set(CHECKPOINT_KEYS))
    if clash:
        raise ValueError(
            f"checkpoint_dict uses reserved keys {clash}; rename them (the engine writes "
            f"{list(CHECKPOINT_KEYS)})."
        )
    if optimizer is not None and getattr(optimizer, "_is_last_step_skipped", False):
        raise ValueError(
            "save_checkpoint was called in the middle of a logical batch (the optimizer holds "
            "clipped gradients of skipped BatchMemoryManager chunks, which a checkpoint does not "
            "keep); save after the optimizer step that adds the noise."
        )


def _optimizer_entries(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict and, for a DP optimizer, its DP settings."""
    entries = {"optimizer_state_dict": optimizer.state_dict()}
    if isinstance(optimizer, DPOptimizer):
        entries["dp_optimizer_state_dict"] = optimizer.dp_state_dict()
    return entries


def save_checkpoint(
    *, path: PathOrFile, accountant: Any, module: nn.Module, optimizer: Any,
    schedulers: Mapping[str, Any], checkpoint_dict: Optional[dict[str, Any]],
    module_state_dict_kwargs: Optional[dict[str, Any]], torch_save_kwargs: Optional[dict[str, Any]],
    data_loader: Optional[DataLoader],
) -> None:
    """Write the checkpoint (see :meth:`dp_torch.PrivacyEngine.save_checkpoint`).

    Args:
        path: File path or binary file object.
        accountant: The engine's accountant.
        module: The (wrapped) model.
        optimizer: The (DP) optimizer, or ``None``.
        schedulers: Checkpoint key to scheduler (``None`` ones are skipped).
        checkpoint_dict: The user's entries.
        module_state_dict_kwargs: Passed to ``module.state_dict()``.
        torch_save_kwargs: Passed to ``torch.save()``.
        data_loader: Loader whose sampler position to save, or ``None``.

    Raises:
        ValueError: On a user key that clashes with an engine key, or in the middle
            of a logical batch.
    """
    user = dict(checkpoint_dict or {})
    _check_can_save(user, optimizer)
    if distributed_kind(module) is not None and _process_rank() != 0:
        return  # rank 0 writes; the ranks hold the same module, optimizer and ledger
    checkpoint = dict(user)
    checkpoint["dp_torch_checkpoint_version"] = _CHECKPOINT_VERSION
    checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
    checkpoint["privacy_accountant_state_dict"] = accountant.state_dict()
    if optimizer is not None:
        checkpoint.update(_optimizer_entries(optimizer))
    for key, scheduler in schedulers.items():
        if scheduler is not None:
            checkpoint[key] = scheduler.state_dict()
    sampler = _stateful_sampler(data_loader)
    if sampler is not None:
        checkpoint["data_loader_sampler_state_dict"] = sampler.state_dict()
    torch.save(checkpoint, path, **(torch_save_kwargs or {}))


# --------------------------------------------------------------------------- load


def _state_step(obj: Any, saved: Any) -> Step:
    """Step loading ``saved`` into ``obj`` through its ``load_state_dict``."""
    return (lambda: copy.deepcopy(obj.state_dict()),
            lambda: obj.load_state_dict(saved),
            obj.load_state_dict)


def _scheduler_step(scheduler: Any, saved: Any) -> Step:
    if not isinstance(saved, Mapping):
        raise ValueError(f"a scheduler state in the checkpoint is not a dict: {type(saved).__name__}.")
    return _state_step(scheduler, dict(saved))


def _ghost_bound_step(module: GradSampleHooksFastGradientClipping, bound: Any) -> Step:
    """Ghost clipping clips in the backward pass with the module's bound: the optimizer's."""

    def restore(value: Any) -> None:
        module.max_grad_norm = value

    return (lambda: module.max_grad_norm, lambda: restore(float(bound)), restore)


def _optimizer_steps(
    checkpoint: Mapping[str, Any], optimizer: Any, module: nn.Module
) -> list[Step]:
    """Steps restoring the optimizer, its DP settings and a ghost module's bound."""
    optimizer_state = checkpoint.get("optimizer_state_dict")
    if (optimizer is not None) != (optimizer_state is not None):
        warnings.warn(
            f"the checkpoint {'has' if optimizer_state is not None else 'has no'} optimizer "
            f"state but optimizer={'None' if optimizer is None else 'given'}; the optimizer "
            "state is not restored.",
            UserWarning,
            stacklevel=5,
        )
    dp_state = checkpoint.get("dp_optimizer_state_dict")
    if not isinstance(optimizer, DPOptimizer) or dp_state is None:
        return [] if optimizer_state is None or optimizer is None else [
            _state_step(optimizer, optimizer_state)]
    key = DPOptimizer.DP_STATE_KEY
    steps: list[Step] = [(
        lambda: copy.deepcopy({**optimizer.state_dict(), key: optimizer.dp_state_dict()}),
        (lambda: optimizer.load_dp_state_dict(dp_state)) if optimizer_state is None
        else (lambda: optimizer.load_state_dict({**optimizer_state, key: dp_state})),
        optimizer.load_state_dict,
    )]
    if isinstance(module, GradSampleHooksFastGradientClipping) and isinstance(
        dp_state, Mapping
    ) and "max_grad_norm" in dp_state:
        steps.append(_ghost_bound_step(module, dp_state["max_grad_norm"]))
    return steps


def _sampler_steps(checkpoint: Mapping[str, Any], data_loader: Optional[DataLoader]) -> list[Step]:
    sampler_state = checkpoint.get("data_loader_sampler_state_dict")
    if sampler_state is None:
        return []
    sampler = _stateful_sampler(data_loader)
    if sampler is None:
        warnings.warn(
            "the checkpoint holds the Poisson sampler's position but there is no data loader "
            "to restore it into; call make_private before load_checkpoint (or pass "
            "data_loader=) to continue with the same batches.",
            UserWarning,
            stacklevel=5,
        )
        return []
    return [(sampler.state_dict, lambda: sampler.load_state_dict(sampler_state),
             sampler.load_state_dict)]


def _checkpoint_steps(
    checkpoint: Mapping[str, Any],
    accountant: Any,
    module: nn.Module,
    optimizer: Any,
    schedulers: Mapping[str, Any],
    module_kwargs: dict[str, Any],
    data_loader: Optional[DataLoader],
) -> list[Step]:
    """Validate what can be validated up front; return the steps in loading order."""
    accountant_state = checkpoint["privacy_accountant_state_dict"]
    if not isinstance(accountant_state, Mapping) or "history" not in accountant_state:
        raise ValueError("the checkpoint's privacy_accountant_state_dict has no 'history'.")
    validate_history(accountant_state["history"])
    module_state = _match_ddp_prefix(checkpoint["module_state_dict"], module)
    steps: list[Step] = [
        (lambda: _module_snapshot(module),
         lambda: module.load_state_dict(module_state, **module_kwargs),
         module.load_state_dict),
        (accountant.state_dict, lambda: accountant.load_state_dict(accountant_state),
         accountant.load_state_dict),
    ]
    steps += _optimizer_steps(checkpoint, optimizer, module)
    for key, scheduler in schedulers.items():
        if scheduler is not None and key in checkpoint:
            steps.append(_scheduler_step(scheduler, checkpoint[key]))
    return steps + _sampler_steps(checkpoint, data_loader)


def load_checkpoint(
    *, path: PathOrFile, accountant: Any, module: nn.Module, optimizer: Any,
    schedulers: Mapping[str, Any], module_load_dict_kwargs: Optional[dict[str, Any]],
    torch_load_kwargs: Optional[dict[str, Any]], data_loader: Optional[DataLoader],
) -> dict[str, Any]:
    """Restore a checkpoint, all or nothing (see :meth:`dp_torch.PrivacyEngine.load_checkpoint`).

    Args:
        path: File path or binary file object.
        accountant: The engine's accountant; its history is replaced.
        module: The (wrapped) model to load into.
        optimizer: The (DP) optimizer to load into, or ``None``.
        schedulers: Checkpoint key to scheduler (``None`` ones are skipped).
        module_load_dict_kwargs: Passed to ``module.load_state_dict()``.
        torch_load_kwargs: Passed to ``torch.load()`` (default ``weights_only=True``).
        data_loader: Loader whose sampler position to restore, or ``None``.

    Returns:
        The user's entries.

    Raises:
        ValueError: If the file is not such a checkpoint or a part does not fit.
    """
    load_kwargs = {"weights_only": True, **(torch_load_kwargs or {})}
    checkpoint = torch.load(path, **load_kwargs)
    if not isinstance(checkpoint, Mapping) or not {
        "module_state_dict", "privacy_accountant_state_dict"
    } <= set(checkpoint):
        raise ValueError(
            f"{path!r} is not a PrivacyEngine checkpoint: it needs the keys "
            "'module_state_dict' and 'privacy_accountant_state_dict'."
        )
    steps = _checkpoint_steps(
        checkpoint, accountant, module, optimizer, schedulers,
        module_load_dict_kwargs or {}, data_loader,
    )
    _apply_all(steps)
    return {k: v for k, v in checkpoint.items() if k not in CHECKPOINT_KEYS}
