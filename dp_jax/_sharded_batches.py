"""Poisson batches as global arrays sharded along a mesh's data axis, for one process or many.

Guarantee:
    Each logical batch is the same Poisson batch of the whole data set that the
    wrapped iterator gives; with several processes the indices are drawn by
    process 0 and broadcast, so every process agrees on it, in secure mode too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dp_jax._data import PhysicalChunk
from dp_jax._mesh import _check_axis
from dpcore import sampling as core_sampling

__all__ = [
    "ShardedBatches",
]


_INT32_MAX = np.iinfo(np.int32).max


class ShardedBatches:
    """Poisson (or shuffled) batches as global arrays sharded along the mesh's data axis.

    Wraps a :class:`dp_jax.PoissonBatches` (or :class:`dp_jax.ShuffledBatches`): each
    logical batch is the same Poisson batch of the whole data set that the wrapped
    iterator would give, padded to its buckets, each chunk rounded up to a multiple
    of the data axis size (extra rows masked out), and every chunk is a global
    ``jax.Array`` with ``NamedSharding(mesh, P(axis_name))``. Each process gathers
    only the rows placed on its own devices. With several processes the indices are
    drawn by process 0 and broadcast (two small collectives per logical batch), so
    the processes agree even in secure mode; the other processes' samplers are
    advanced but their draws unused.

    Args:
        batches: The wrapped batches; their ``sampler`` draws the global indices,
            their ``gather`` reads examples, their ``buckets`` give the shapes.
        mesh: The mesh.
        axis_name: The data axis of ``mesh``.

    Attributes:
        batches: The wrapped iterator (its ``state_dict`` is the position).
        mesh: The mesh.
        axis_name: The data axis.
    """

    def __init__(self, batches: Any, mesh: Mesh, *, axis_name: str = "data") -> None:
        self._size = _check_axis(mesh, axis_name)
        for name in ("sampler", "gather", "buckets"):
            if not hasattr(batches, name):
                raise TypeError(
                    f"batches must be a dp_jax.PoissonBatches (or ShuffledBatches), got "
                    f"{type(batches).__name__} without {name!r}."
                )
        if batches.num_samples > _INT32_MAX:
            raise ValueError(
                f"ShardedBatches supports at most {_INT32_MAX} examples, got {batches.num_samples}."
            )
        self.batches = batches
        self.mesh = mesh
        self.axis_name = axis_name
        self._sharding = NamedSharding(mesh, P(axis_name))

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped iterator's position (see :meth:`dp_jax.PoissonBatches.state_dict`)."""
        return self.batches.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume the wrapped iterator (see :meth:`dp_jax.PoissonBatches.load_state_dict`)."""
        self.batches.load_state_dict(state_dict)

    def __iter__(self) -> Iterator[list[PhysicalChunk]]:
        for indices in self.batches.sampler:
            yield self.chunks(self._agree(np.asarray(indices, dtype=np.int64)))

    def chunks(self, indices: np.ndarray) -> list[PhysicalChunk]:
        """Pad one logical batch's global indices and place each chunk sharded.

        Args:
            indices: The global example indices of one logical batch (the same on
                every process).

        Returns:
            The chunks; ``batch`` and ``mask`` are global sharded ``jax.Array``.
        """
        out = []
        for padded, mask in core_sampling.pad_to_buckets(indices, self.batches.buckets):
            extra = -padded.size % self._size
            padded = np.concatenate([padded, np.zeros(extra, np.int64)])
            mask = np.concatenate([mask, np.zeros(extra, bool)])
            out.append(PhysicalChunk(self._place_rows(padded), self._place(mask)))
        return out

    def _place(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, self._sharding, lambda i: array[i])

    def _place_rows(self, padded: np.ndarray) -> Any:
        """Gather only this process's rows of ``padded`` and build global arrays."""
        index_map = self._sharding.addressable_devices_indices_map((padded.size,))
        spans = sorted({(s[0].indices(padded.size)[:2]) for s in index_map.values()})
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        offset = dict(zip(spans, np.cumsum([0] + [b - a for a, b in spans[:-1]])))
        local = self.batches.gather(padded[rows])

        def place(leaf: Any) -> jax.Array:
            arr = np.asarray(leaf)
            shape = (padded.size,) + arr.shape[1:]

            def block(index: tuple[slice, ...]) -> np.ndarray:
                a, b = index[0].indices(padded.size)[:2]
                start = offset[(a, b)]
                return arr[(slice(start, start + b - a),) + tuple(index[1:])]

            return jax.make_array_from_callback(shape, self._sharding, block)

        return jax.tree_util.tree_map(place, local)

    def _agree(self, indices: np.ndarray) -> np.ndarray:
        """Process 0's indices on every process (identity with one process)."""
        if jax.process_count() == 1:
            return indices
        count = int(multihost_utils.broadcast_one_to_all(np.array([indices.size], np.int32))[0])
        buf = np.zeros(_broadcast_length(count, self.batches.buckets), np.int32)
        if jax.process_index() == 0:
            buf[:count] = indices
        agreed = multihost_utils.broadcast_one_to_all(buf)
        return np.asarray(agreed, dtype=np.int64)[:count]


def _broadcast_length(count: int, buckets: Sequence[int]) -> int:
    """A buffer length from a small set (one compile each) that holds ``count`` indices.

    The smallest bucket that holds them, or a multiple of the largest bucket for an
    oversized batch; plus one so that an empty batch still has a non-empty buffer.
    """
    largest = buckets[-1]
    if count > largest:
        return 1 + -(-count // largest) * largest
    return 1 + next(b for b in buckets if b >= count)
