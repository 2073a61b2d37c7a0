"""DP-friendly layers: ``torch.nn`` layers rebuilt from ``nn.Linear`` submodules (as ``opacus.layers``)."""

from .dp_multihead_attention import DPMultiheadAttention
from .dp_multihead_attention import SequenceBias
from .dp_rnn import DPGRU
from .dp_rnn import DPGRUCell
from .dp_rnn import DPLSTM
from .dp_rnn import DPLSTMCell
from .dp_rnn import DPRNN
from .dp_rnn import DPRNNBase
from .dp_rnn import DPRNNCell
from .dp_rnn import DPRNNCellBase
from .dp_rnn import RNNLinear
from .frozen_batch_norm import FrozenBatchNorm
from .param_rename import RenameParamsMixin

__all__ = [
    "DPGRU",
    "DPGRUCell",
    "DPLSTM",
    "DPLSTMCell",
    "DPMultiheadAttention",
    "DPRNN",
    "DPRNNBase",
    "DPRNNCell",
    "DPRNNCellBase",
    "FrozenBatchNorm",
    "RNNLinear",
    "RenameParamsMixin",
    "SequenceBias",
]
