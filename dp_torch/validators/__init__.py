"""Module validation and fixing for private training (as ``opacus.validators``).

Importing this package registers the built-in validators and fixers: BatchNorm (-> GroupNorm,
or FrozenBatchNorm when frozen), InstanceNorm with running statistics, nn.LSTM / nn.GRU /
nn.RNN (-> DPLSTM / DPGRU / DPRNN), nn.MultiheadAttention (-> DPMultiheadAttention), and
in-place activations after hooked layers.
"""

from . import batch_norm  # noqa: F401  (registers validators and fixers)
from . import gru  # noqa: F401
from . import inplace  # noqa: F401
from . import instance_norm  # noqa: F401
from . import lstm  # noqa: F401
from . import multihead_attention  # noqa: F401
from . import rnn  # noqa: F401
from .errors import IllegalModuleConfigurationError
from .errors import NotYetSupportedModuleError
from .errors import ShouldReplaceModuleError
from .errors import UnsupportableModuleError
from .errors import UnsupportedError
from .errors import UnsupportedModuleError
from .module_validator import ModuleValidator
from .utils import register_module_fixer
from .utils import register_module_validator

__all__ = [
    "IllegalModuleConfigurationError",
    "ModuleValidator",
    "NotYetSupportedModuleError",
    "ShouldReplaceModuleError",
    "UnsupportableModuleError",
    "UnsupportedError",
    "UnsupportedModuleError",
    "register_module_fixer",
    "register_module_validator",
]
