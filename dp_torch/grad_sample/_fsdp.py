"""What the FSDP2 ghost mode needs to know about a ``fully_shard``-ed model (internal).

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter twice: the registered
parameter is a *sharded* ``DTensor`` (each rank holds a slice of dimension 0), and around a
module's forward and backward FSDP swaps in an *unsharded* ``nn.Parameter`` gathered from
all ranks. Layer hooks therefore see unsharded parameters, while the model's
``parameters()`` (and the optimizer) hold the sharded ones. :func:`unsharded_aliases`
maps the first to the second, so that per-example norms computed in a hook land on the
parameter the optimizer steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

try:  # FSDP2 (torch >= 2.6); absent from trimmed builds
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - builds without torch.distributed
    FSDPModule = None

__all__ = ["FSDPModule", "fsdp_modules", "is_fsdp_model", "unmanaged_trainable", "unsharded_aliases"]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every ``fully_shard``-ed module inside ``model`` (itself included), in module order."""
    if FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules was passed to ``fully_shard``."""
    return bool(fsdp_modules(model))


def _fsdp_params(model: nn.Module) -> Iterator[Any]:
    """FSDP's record of every parameter it manages in ``model`` (``sharded_param``, and
    ``_unsharded_param`` once gathered)."""
    for module in fsdp_modules(model):
        group = module._get_fsdp_state()._fsdp_param_group
        yield from group.fsdp_params if group is not None else ()


def unsharded_aliases(model: nn.Module) -> dict[int, nn.Parameter]:
    """``{id(unsharded parameter): sharded parameter}`` for every FSDP-managed parameter.

    FSDP2 creates a parameter's unsharded ``nn.Parameter`` at its first all-gather and keeps
    the object afterwards (freeing only its storage), so the map is stable between steps.
    Parameters not gathered yet are absent.

    Args:
        model: The model (a ``fully_shard``-ed module or one containing them).
    """
    aliases: dict[int, nn.Parameter] = {}
    for fsdp_param in _fsdp_params(model):
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None:
            aliases[id(unsharded)] = fsdp_param.sharded_param
    return aliases


def unmanaged_trainable(model: nn.Module) -> list[str]:
    """Names of trainable parameters of ``model`` that no ``fully_shard`` manages.

    Their gradients would stay local to each rank (FSDP reduce-scatters only its own
    parameters), so a DP step over them would miss the other ranks' examples.
    """
    managed = {id(fp.sharded_param) for fp in _fsdp_params(model)}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in managed]


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` (an FSDP-sharded parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)
