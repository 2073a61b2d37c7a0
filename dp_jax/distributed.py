"""Data-parallel DP-SGD over a ``jax.sharding`` mesh, on one process or many.

Build a mesh with :func:`data_mesh`, replicate the state with :func:`replicate`,
iterate :class:`ShardedBatches` and step with :func:`make_sharded_step` (or pass
``mesh=`` to :meth:`dp_jax.PrivacyEngine.make_private`).

Guarantee:
    A sharded step releases what the one-device step releases for the same
    logical batch: one Gaussian draw on the global clipped sum, computed
    identically by every device.
"""

from dp_jax._distributed import ShardedBatches
from dp_jax._distributed import data_mesh
from dp_jax._distributed import make_sharded_step
from dp_jax._distributed import pad_to_multiple
from dp_jax._distributed import psum_clipped
from dp_jax._distributed import replicate
from dp_jax._distributed import shard_batch
from dp_jax._distributed import sharded_clipped_grad

__all__ = [
    "ShardedBatches",
    "data_mesh",
    "make_sharded_step",
    "pad_to_multiple",
    "psum_clipped",
    "replicate",
    "shard_batch",
    "sharded_clipped_grad",
]
