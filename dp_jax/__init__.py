"""dp_jax: differentially private training in JAX, optax-style.

The top level holds what a user starts with: :class:`PrivacyEngine`, the DP
optimizers :func:`dp_sgd`, :func:`dp_adam` and :func:`dp_aggregate`, the
clipped-gradient functions :func:`clipped_grad` and :func:`ghost_clipped_grad`,
Poisson batches (:func:`poisson_batches`), flax helpers (:func:`linen_loss`,
:func:`nnx_loss`), model validation (:func:`validate`, :func:`fix`) and
:func:`data_mesh`. The rest lives in three public submodules:

* :mod:`dp_jax.transforms`: every DP optax transformation and its state;
* :mod:`dp_jax.distributed`: data-parallel training over a ``jax.sharding`` mesh;
* :mod:`dp_jax.checkpoint`: checkpoints of a private run.

Compatibility: every name those submodules hold is also resolved at the top
level (``dp_jax.dp_accumulate_sums``, ``dp_jax.save_checkpoint``, ...) by a
module ``__getattr__``, silently, so code written against the former flat
namespace keeps working; new code should import them from the submodules.
"""

from typing import Any

from dp_jax import checkpoint
from dp_jax import distributed
from dp_jax import transforms
from dp_jax._data import PhysicalChunk
from dp_jax._data import PoissonBatches
from dp_jax._data import ShuffledBatches
from dp_jax._data import poisson_batches
from dp_jax._engine import PrivacyEngine
from dp_jax._engine import PrivateTraining
from dp_jax._engine import TrainState
from dp_jax._flax import linen_loss
from dp_jax._flax import nnx_loss
from dp_jax._flax import nnx_merge
from dp_jax._flax import nnx_split_params
from dp_jax._ghost import GhostPlan
from dp_jax._ghost import ghost_clipped_grad
from dp_jax._ghost import ghost_plan
from dp_jax._grads import ClipAux
from dp_jax._grads import clip_per_example
from dp_jax._grads import clipped_grad
from dp_jax._grads import per_example_grads
from dp_jax._mesh import data_mesh
from dp_jax._optax_contrib import differentially_private_aggregate
from dp_jax._optax_contrib import dpsgd
from dp_jax._transforms import dp_adam
from dp_jax._transforms import dp_aggregate
from dp_jax._transforms import dp_sgd
from dp_jax._validate import GroupNormLinen
from dp_jax._validate import UnsupportedModuleError
from dp_jax._validate import fix
from dp_jax._validate import is_valid
from dp_jax._validate import validate

__all__ = [
    "ClipAux",
    "GhostPlan",
    "GroupNormLinen",
    "PhysicalChunk",
    "PoissonBatches",
    "PrivacyEngine",
    "PrivateTraining",
    "ShuffledBatches",
    "TrainState",
    "UnsupportedModuleError",
    "checkpoint",
    "clip_per_example",
    "clipped_grad",
    "data_mesh",
    "differentially_private_aggregate",
    "distributed",
    "dp_adam",
    "dp_aggregate",
    "dp_sgd",
    "dpsgd",
    "fix",
    "ghost_clipped_grad",
    "ghost_plan",
    "is_valid",
    "linen_loss",
    "nnx_loss",
    "nnx_merge",
    "nnx_split_params",
    "per_example_grads",
    "poisson_batches",
    "transforms",
    "validate",
]

_COMPAT_MODULES = (transforms, distributed, checkpoint)


def __getattr__(name: str) -> Any:
    """Resolve a name of the former flat namespace from its public submodule.

    Args:
        name: An attribute of :mod:`dp_jax` not defined at the top level.

    Returns:
        The object of that name in :mod:`dp_jax.transforms`,
        :mod:`dp_jax.distributed` or :mod:`dp_jax.checkpoint`.

    Raises:
        AttributeError: If no submodule exports ``name``.
    """
    for module in _COMPAT_MODULES:
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module 'dp_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The top-level names plus those resolved for compatibility."""
    return sorted({*globals(), *(n for m in _COMPAT_MODULES for n in m.__all__)})
