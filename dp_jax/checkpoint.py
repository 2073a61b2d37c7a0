"""Checkpoints of a private JAX run: one ``.npz`` file, no pickle.

:func:`save_checkpoint` stores every leaf of the training state (PRNG key and DP
accumulators included), the sampler position, the privacy ledger and JSON extras;
:func:`load_checkpoint` restores them against a template state, checking
structure, shapes and dtypes before anything changes. :func:`save_pytree` and
:func:`load_pytree` do the same for a bare pytree.

Guarantee:
    A resumed run continues bit for bit, and its accountant holds exactly the
    steps recorded before the save: none lost, none counted twice.
"""

from dp_jax._checkpoint import load_checkpoint
from dp_jax._checkpoint import load_pytree
from dp_jax._checkpoint import save_checkpoint
from dp_jax._checkpoint import save_pytree

__all__ = [
    "load_checkpoint",
    "load_pytree",
    "save_checkpoint",
    "save_pytree",
]
