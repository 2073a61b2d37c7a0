"""nn.MultiheadAttention -> dp_torch.layers.DPMultiheadAttention (weights carried over)."""

from __future__ import annotations

import torch.nn as nn

from ..layers import DPMultiheadAttention
from ._common import factory_kwargs, has_trainable_params, replacement_errors
from .errors import UnsupportedModuleError
from .utils import register_module_fixer, register_module_validator

__all__ = ["validate", "fix"]


@register_module_validator(nn.MultiheadAttention)
def validate(module: nn.MultiheadAttention) -> list[UnsupportedModuleError]:
    """One ``ShouldReplaceModuleError`` for a trainable nn.MultiheadAttention, else nothing."""
    return replacement_errors(
        module,
        "nn.MultiheadAttention keeps its input projections in one packed parameter used "
        "through a functional kernel, out of reach of per-layer gradient hooks. Fix: "
        "ModuleValidator.fix(model) replaces it with dp_torch.layers.DPMultiheadAttention, "
        "the same function built from nn.Linear modules, keeping its weights.",
    )


def _param_targets(new: DPMultiheadAttention) -> dict[str, list[nn.Parameter]]:
    """nn.MultiheadAttention parameter name -> the DPMultiheadAttention parameters holding it."""
    linears = [new.qlinear, new.klinear, new.vlinear]
    targets = {
        "in_proj_weight": [lin.weight for lin in linears],
        "q_proj_weight": [new.qlinear.weight],
        "k_proj_weight": [new.klinear.weight],
        "v_proj_weight": [new.vlinear.weight],
        "in_proj_bias": [lin.bias for lin in linears],
        "out_proj.weight": [new.out_proj.weight],
        "out_proj.bias": [new.out_proj.bias],
    }
    if new.seq_bias_k is not None and new.seq_bias_v is not None:
        targets["bias_k"] = [new.seq_bias_k.proj.weight]
        targets["bias_v"] = [new.seq_bias_v.proj.weight]
    return targets


@register_module_fixer(nn.MultiheadAttention)
def fix(module: nn.MultiheadAttention, **kwargs) -> nn.Module:
    """A DPMultiheadAttention computing the same function (``module`` itself if frozen).

    Args:
        module: The layer.
        **kwargs: Ignored.

    Returns:
        The replacement, with the same arguments, dtype, device, weights and ``requires_grad``.
    """
    if not has_trainable_params(module):
        return module
    new = DPMultiheadAttention(
        embed_dim=module.embed_dim,
        num_heads=module.num_heads,
        dropout=module.dropout,
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=module.add_zero_attn,
        kdim=module.kdim,
        vdim=module.vdim,
        batch_first=module.batch_first,
        **factory_kwargs(module),
    )
    new.load_state_dict(module.state_dict())
    targets = _param_targets(new)
    for name, param in module.named_parameters():
        for target in targets[name]:
            target.requires_grad_(param.requires_grad)
    return new
