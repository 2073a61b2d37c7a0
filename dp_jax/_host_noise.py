"""Secure-mode noise, drawn on the host from OS entropy and fed to the jitted step.

Guarantee:
    On the chunk that ends each logical batch the noise is drawn once by
    :class:`dpcore.noise.NoiseSource` in secure mode (OS entropy, hardened
    against floating-point attacks) with standard deviation ``sigma * C`` for
    the current multiplier and bound; the other chunks get an all-zero tree the
    accumulator ignores. With several processes, process 0's draw is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dp_jax import _distributed, _tree
from dp_jax._optimizer import DPParts
from dp_jax._types import PyTree
from dpcore import noise as core_noise

__all__ = ["HostNoise", "with_host_noise"]


class HostNoise:
    """Secure-mode noise, drawn on the host from :class:`dpcore.noise.NoiseSource` (OS entropy).

    Float64 draws in JAX leaf order with std ``sigma * C`` read from the state,
    kept in each leaf's dtype widened to float32 or wider (a bfloat16 or float16
    leaf gets float32 noise: the noise is rounded once, with the update, never
    before it is added) and copied to the device (a params-sized transfer per
    logical step); then the adaptive count noise, if any.
    """

    def __init__(
        self, params: PyTree, parts: DPParts, mesh: Any = None,
        place: Optional[Callable[[PyTree], Any]] = None,
    ) -> None:
        """Prepare the draws.

        Args:
            params: The parameters (the noise has their shapes).
            parts: The DP transformation's readers (noise std, count noise).
            mesh: The mesh, or ``None`` for one device.
            place: How to put the noise on the mesh (default: replicated); the
                sharded-parameter step passes its plan's placement, so each device
                receives only its slice of the one global draw.
        """
        leaves, self._treedef = jax.tree_util.tree_flatten(params)
        self._specs = [(tuple(np.shape(x)), _tree.wide_dtype(jnp.result_type(x))) for x in leaves]
        self._count_dtype = _tree.wide_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
        self._std_of = parts.noise_std_of
        self._count_std = parts.count_std
        self._source = core_noise.NoiseSource(secure_mode=True)
        self._mesh = mesh
        self._put = place if place is not None else (
            lambda tree: _distributed.replicate(tree, mesh))
        self._zeros: Any = None

    def draw(self, opt_state: PyTree) -> tuple[Any, Any]:
        """Fresh noise for the release that ends the current logical batch."""
        std = self._std_of(opt_state)
        noise = [np.asarray(self._source.normal(shape, std), dtype) for shape, dtype in self._specs]
        count = None
        if self._count_std is not None:
            count = np.asarray(self._source.normal((), self._count_std), self._count_dtype)
        return self._place((self._treedef.unflatten(noise), count))

    def _place(self, tree: PyTree) -> Any:
        """On the device, or on the mesh (replicated or split), process 0's draw everywhere."""
        if self._mesh is None:
            return jax.device_put(tree)
        if jax.process_count() > 1:  # one draw for all processes: process 0's
            tree = multihost_utils.broadcast_one_to_all(tree)
        return self._put(tree)

    def zeros(self) -> tuple[Any, Any]:
        """Placeholder for chunks that only accumulate (ignored; cached on the device)."""
        if self._zeros is None:
            noise = [jnp.zeros(shape, dtype) for shape, dtype in self._specs]
            count = None if self._count_std is None else jnp.zeros((), self._count_dtype)
            self._zeros = (self._treedef.unflatten(noise), count)
            if self._mesh is not None:
                self._zeros = self._put(self._zeros)
        return self._zeros


def with_host_noise(jitted: Callable, host_noise: HostNoise) -> Callable:
    """``step(state, batch, mask, apply_update)`` that feeds host noise to ``jitted``."""

    def step(state: Any, batch: PyTree, mask: Any, apply_update: Any):
        if isinstance(apply_update, jax.core.Tracer):
            raise TypeError(
                "In secure mode step needs a concrete apply_update (a Python or numpy bool): the "
                "noise is drawn on the host when it is true. Call it outside jax.jit."
            )
        apply = bool(np.asarray(apply_update))
        noise, count_noise = host_noise.draw(state.opt_state) if apply else host_noise.zeros()
        return jitted(state, batch, mask, apply, noise, count_noise)

    return step
