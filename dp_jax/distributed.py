"""Data-parallel DP-SGD over a ``jax.sharding`` mesh, on one process or many.

Build a mesh with :func:`data_mesh`, replicate the state with :func:`replicate`,
iterate :class:`ShardedBatches` and step with :func:`make_sharded_step` (or pass
``mesh=`` to :meth:`dp_jax.PrivacyEngine.make_private`). For a model whose
parameters do not fit on one device add ``param_sharding="fsdp"`` (or a tree
from :func:`fsdp_specs`): parameters and optimizer state are then split along
the data axis too.

Guarantee:
    A sharded step releases what the one-device step releases for the same
    logical batch: one Gaussian draw on the global clipped sum, computed
    identically by every device.
"""

from dp_jax._distributed import ShardedBatches
from dp_jax._distributed import data_mesh
from dp_jax._distributed import make_sharded_step
from dp_jax._distributed import pad_to_multiple
from dp_jax._distributed import place
from dp_jax._distributed import psum_clipped
from dp_jax._distributed import replicate
from dp_jax._distributed import shard_batch
from dp_jax._distributed import sharded_clipped_grad
from dp_jax._fsdp import FSDP_MIN_SIZE
from dp_jax._fsdp import fsdp_specs

__all__ = [
    "FSDP_MIN_SIZE",
    "ShardedBatches",
    "data_mesh",
    "fsdp_specs",
    "make_sharded_step",
    "pad_to_multiple",
    "place",
    "psum_clipped",
    "replicate",
    "shard_batch",
    "sharded_clipped_grad",
]
