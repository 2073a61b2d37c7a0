"""dp_jax: differentially private training in JAX, optax-style.

Per-example gradients by ``jax.vmap(jax.grad(...))`` or ghost clipping (norms
from layer inputs and output gradients, no per-example gradients), DP aggregation as optax
gradient transformations, Poisson batches padded to a few fixed shapes for
``jax.jit``, a ``PrivacyEngine`` with the accountants of :mod:`dpcore`, flax
(linen and nnx) helpers, model validation, checkpoints, and data-parallel
training over a ``jax.sharding`` mesh (one host or many).
"""

from dp_jax._checkpoint import load_checkpoint
from dp_jax._checkpoint import load_pytree
from dp_jax._checkpoint import save_checkpoint
from dp_jax._checkpoint import save_pytree
from dp_jax._data import PhysicalChunk
from dp_jax._data import PoissonBatches
from dp_jax._data import ShuffledBatches
from dp_jax._data import poisson_batches
from dp_jax._distributed import ShardedBatches
from dp_jax._distributed import data_mesh
from dp_jax._distributed import make_sharded_step
from dp_jax._distributed import pad_to_multiple
from dp_jax._distributed import psum_clipped
from dp_jax._distributed import replicate
from dp_jax._distributed import shard_batch
from dp_jax._distributed import sharded_clipped_grad
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
from dp_jax._transforms import AdaptiveClipState
from dp_jax._transforms import ClipAggregateState
from dp_jax._transforms import DPAccumulateAdaptiveState
from dp_jax._transforms import DPAccumulateState
from dp_jax._transforms import DPAggregateState
from dp_jax._transforms import DPMultiStepsState
from dp_jax._transforms import NoiseState
from dp_jax._transforms import adaptive_clip_update
from dp_jax._transforms import add_gaussian_noise
from dp_jax._transforms import clip_and_aggregate
from dp_jax._transforms import current_hyperparams
from dp_jax._transforms import dp_accumulate
from dp_jax._transforms import dp_accumulate_sums
from dp_jax._transforms import dp_accumulate_sums_adaptive
from dp_jax._transforms import dp_adam
from dp_jax._transforms import dp_aggregate
from dp_jax._transforms import dp_aggregate_adaptive
from dp_jax._transforms import dp_multi_steps
from dp_jax._transforms import dp_sgd
from dp_jax._transforms import noise_from_normals
from dp_jax._validate import GroupNormLinen
from dp_jax._validate import UnsupportedModuleError
from dp_jax._validate import fix
from dp_jax._validate import is_valid
from dp_jax._validate import validate

__all__ = [
    "AdaptiveClipState",
    "ClipAggregateState",
    "ClipAux",
    "DPAccumulateAdaptiveState",
    "DPAccumulateState",
    "DPAggregateState",
    "DPMultiStepsState",
    "GhostPlan",
    "GroupNormLinen",
    "NoiseState",
    "PhysicalChunk",
    "PoissonBatches",
    "PrivacyEngine",
    "PrivateTraining",
    "ShardedBatches",
    "ShuffledBatches",
    "TrainState",
    "UnsupportedModuleError",
    "adaptive_clip_update",
    "add_gaussian_noise",
    "clip_and_aggregate",
    "clip_per_example",
    "clipped_grad",
    "current_hyperparams",
    "data_mesh",
    "dp_accumulate",
    "dp_accumulate_sums",
    "dp_accumulate_sums_adaptive",
    "dp_adam",
    "dp_aggregate",
    "dp_aggregate_adaptive",
    "dp_multi_steps",
    "dp_sgd",
    "fix",
    "ghost_clipped_grad",
    "ghost_plan",
    "is_valid",
    "linen_loss",
    "load_checkpoint",
    "load_pytree",
    "make_sharded_step",
    "nnx_loss",
    "nnx_merge",
    "nnx_split_params",
    "noise_from_normals",
    "pad_to_multiple",
    "per_example_grads",
    "poisson_batches",
    "psum_clipped",
    "replicate",
    "save_checkpoint",
    "save_pytree",
    "shard_batch",
    "sharded_clipped_grad",
    "validate",
]
