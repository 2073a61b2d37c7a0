"""nn.RNN -> dp_torch.layers.DPRNN (weights carried over)."""

from __future__ import annotations

import torch.nn as nn

from ..layers import DPRNN
from ._recurrent import register_recurrent

__all__ = ["validate", "fix"]

validate, fix = register_recurrent(nn.RNN, DPRNN, "nonlinearity")
