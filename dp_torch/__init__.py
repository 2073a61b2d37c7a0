"""dp_torch: an Opacus-1.x-compatible differentially private training backend for PyTorch.

Moving from Opacus is a change of import prefix (``opacus.X`` -> ``dp_torch.X``).
The privacy rules (accounting, sampling, clipping, noise) come from :mod:`dpcore`,
shared with the JAX backend.
"""

__version__ = "0.1.0"

from dp_torch import utils
from dp_torch.grad_sample import GradSampleModule
from dp_torch.grad_sample import GradSampleModuleFastGradientClipping
from dp_torch.privacy_engine import PrivacyEngine

__all__ = [
    "GradSampleModule",
    "GradSampleModuleFastGradientClipping",
    "PrivacyEngine",
    "__version__",
    "utils",
]
