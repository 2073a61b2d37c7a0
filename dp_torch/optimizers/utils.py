"""Small helpers shared by the DP optimizers (mirrors ``opacus.optimizers.utils``)."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

__all__ = ["params"]


def params(optimizer: Optimizer) -> list[nn.Parameter]:
    """Return the trainable parameters an optimizer updates, in ``param_groups`` order.

    Parameters with ``requires_grad=False`` are left out: they receive no
    per-sample gradient, no clipping and no noise.

    Args:
        optimizer: Any ``torch.optim.Optimizer`` (or a DP wrapper of one).

    Returns:
        A flat list of the parameters of every group, in order.
    """
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
