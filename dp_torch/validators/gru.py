"""nn.GRU -> dp_torch.layers.DPGRU (weights carried over)."""

from __future__ import annotations

import torch.nn as nn

from ..layers import DPGRU
from ._recurrent import register_recurrent

__all__ = ["validate", "fix"]

validate, fix = register_recurrent(nn.GRU, DPGRU)
