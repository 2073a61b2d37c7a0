"""FSDP2 helpers (Opacus' ``opacus.utils.fsdp_utils``): sharding a model and sharded checkpoints.

* :func:`FSDP2Wrapper` shards a model with ``torch.distributed.fsdp.fully_shard`` the way
  ``grad_sample_mode="ghost_fsdp"`` expects: one FSDP unit per module that owns
  parameters, then the root.
* :func:`save_fsdp_checkpoint` / :func:`load_fsdp_checkpoint` write and read a run as a
  ``torch.distributed.checkpoint`` directory (each rank writes its shards) plus the
  privacy state (ledger and DP optimizer settings, the same on every rank). A checkpoint
  can be loaded on a different number of ranks: DCP re-shards the tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dp_torch._checkpoint import PRIVACY_STATE_NAME, read_privacy_state
from dp_torch.grad_sample import AbstractGradSampleModule
from dp_torch.grad_sample._fsdp import is_fsdp_model
from dpcore.accounting import validate_history

__all__ = ["FSDP2Wrapper", "has_params", "iterate_submodules", "load_fsdp_checkpoint", "save_fsdp_checkpoint"]


def has_params(module: nn.Module) -> bool:
    """Whether ``module`` owns parameters directly (not through its children)."""
    return next(module.parameters(recurse=False), None) is not None


def iterate_submodules(module: nn.Module) -> Iterator[nn.Module]:
    """The modules under ``module`` (itself excluded) that own parameters directly, in module
    order: those :func:`FSDP2Wrapper` shards as units of their own."""
    for child in module.modules():
        if child is not module and has_params(child):
            yield child


def FSDP2Wrapper(model: nn.Module, **kwargs: Any) -> nn.Module:  # noqa: N802 (Opacus' name)
    """Shard ``model`` with FSDP2: ``fully_shard`` on every module owning parameters, then the root.

    Every parameter then belongs to the smallest unit around it, so a unit's parameters are
    gathered only around that module's forward and backward (lowest memory; for large
    transformers, sharding whole blocks with ``fully_shard`` yourself issues fewer, larger
    collectives and works with ``grad_sample_mode="ghost_fsdp"`` as well).

    Args:
        model: The model, on this rank's device (``torch.distributed`` initialised).
        **kwargs: Passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ...).

    Returns:
        ``model`` itself, now an ``FSDPModule``.

    Raises:
        RuntimeError: If no process group is initialised.
        ValueError: If ``model`` is already sharded.
    """
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "FSDP2Wrapper needs an initialised process group; call "
            "torch.distributed.init_process_group(backend, ...) on every rank first."
        )
    if is_fsdp_model(model):
        raise ValueError(f"FSDP2Wrapper got a model that is already sharded ({type(model).__name__}).")
    for module in list(iterate_submodules(model)):
        fully_shard(module, **kwargs)
    return fully_shard(model, **kwargs)


def _inner(module: nn.Module) -> nn.Module:
    return module._module if isinstance(module, AbstractGradSampleModule) else module


def _states(module: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _inner(module)
    return {"model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer.original_optimizer)}


def save_fsdp_checkpoint(directory: str, *, module: nn.Module, optimizer: Any, privacy_engine: Any) -> None:
    """Save a sharded DP run to ``directory`` (a collective: call on every rank).

    Args:
        directory: The checkpoint directory (created if absent; shared by the ranks).
        module: The model ``make_private`` returned (or the FSDP model inside it).
        optimizer: The DP optimizer ``make_private`` returned.
        privacy_engine: The ``PrivacyEngine`` (its ledger is saved).
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(module, optimizer), checkpoint_id=directory)
    if dist.get_rank() == 0:
        privacy = {"accountant": privacy_engine.accountant.state_dict(),
                   "dp_optimizer": optimizer.dp_state_dict()}
        torch.save(privacy, os.path.join(directory, PRIVACY_STATE_NAME))
    dist.barrier()


def load_fsdp_checkpoint(directory: str, *, module: nn.Module, optimizer: Any, privacy_engine: Any) -> None:
    """Restore a run saved by :func:`save_fsdp_checkpoint`, on any number of ranks (collective).

    Build the model, shard it, and call ``make_private`` as for a new run first; then load.
    The privacy state is read and checked before the model and the optimizer are touched.

    Args:
        directory: The checkpoint directory.
        module: The model ``make_private`` returned.
        optimizer: The DP optimizer ``make_private`` returned.
        privacy_engine: The ``PrivacyEngine``; its ledger is replaced by the saved one.

    Raises:
        FileNotFoundError: If ``directory`` has no privacy state (not a DP checkpoint).
        ValueError: If the saved ledger is malformed or the DP settings do not fit ``optimizer``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    privacy = read_privacy_state(directory, "save_fsdp_checkpoint")
    validate_history(privacy["accountant"]["history"])  # both checked before any change
    apply_dp_state = optimizer._dp_state_loader(privacy["dp_optimizer"])
    states = _states(module, optimizer)
    dcp.load(states, checkpoint_id=directory)
    model = _inner(module)
    set_model_state_dict(model, states["model"])
    set_optimizer_state_dict(model, optimizer.original_optimizer, states["optimizer"])
    apply_dp_state()
    privacy_engine.accountant.load_state_dict(privacy["accountant"])
