"""nn.LSTM -> dp_torch.layers.DPLSTM (weights carried over)."""

from __future__ import annotations

import torch.nn as nn

from ..layers import DPLSTM
from ._recurrent import register_recurrent

__all__ = ["validate", "fix"]

validate, fix = register_recurrent(nn.LSTM, DPLSTM)
