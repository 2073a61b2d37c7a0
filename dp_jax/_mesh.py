"""Mesh helpers for data-parallel DP-SGD: build a data mesh, replicate state, shard batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dp_jax._types import PyTree

__all__ = [
    "data_mesh",
    "pad_to_multiple",
    "place",
    "replicate",
    "shard_batch",
]


def _check_mesh(mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; build one with "
            "dp_jax.data_mesh()."
        )


def _check_axis(mesh: Any, axis_name: Any) -> int:
    """The size of ``axis_name`` in ``mesh``; raises on a bad mesh or axis."""
    _check_mesh(mesh)
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh (axes {mesh.axis_names}); pass "
            "the name the mesh was built with."
        )
    return int(mesh.shape[axis_name])


def _check_multiple(size: int, multiple: int, name: str) -> None:
    if size % multiple:
        raise ValueError(
            f"{name} has {size} rows, not a multiple of the {multiple} devices of the data axis; "
            "pad it with dp_jax.pad_to_multiple (padded rows masked out) or use "
            "dp_jax.shard_batch / dp_jax.ShardedBatches, which pad."
        )


def _leading_size(tree: PyTree, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no array leaves; pass a pytree of arrays with a batch axis.")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if -1 in sizes or len(sizes) != 1:
        raise ValueError(
            f"every leaf of {name} needs the same leading (example) axis, got shapes "
            f"{[np.shape(x) for x in leaves]}."
        )
    return sizes.pop()


# --------------------------------------------------------------------------- mesh and placement


def data_mesh(devices: Optional[Sequence[Any]] = None, *, axis_name: str = "data") -> Mesh:
    """A one-axis mesh for data parallelism.

    Args:
        devices: The devices, in mesh order; default ``jax.devices()`` (every device of
            every process). They are ordered by ``(process_index, id)`` so each process
            owns a contiguous block of the batch.
        axis_name: Name of the mesh axis the batch is split along.

    Returns:
        ``jax.sharding.Mesh(devices, (axis_name,))``.

    Raises:
        ValueError: If ``devices`` is empty or repeats a device, or ``axis_name`` is not
            a non-empty string.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name must be a non-empty string, got {axis_name!r}.")
    chosen = list(jax.devices() if devices is None else devices)
    if not chosen:
        raise ValueError("devices is empty; pass at least one device (default jax.devices()).")
    if len({d.id for d in chosen}) != len(chosen):
        raise ValueError(f"devices repeats a device: {chosen}; pass each device once.")
    chosen.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(chosen, dtype=object), (axis_name,))


def replicate(tree: PyTree, mesh: Mesh) -> Any:
    """Place a pytree (parameters, optimizer state, a TrainState) on every device of ``mesh``.

    Every process must pass the same values (same initialisation and seed); with
    several processes ``jax.device_put`` checks that they do (one small collective
    per leaf) and raises otherwise.

    Args:
        tree: Pytree of arrays (PRNG key arrays included).
        mesh: The mesh.

    Returns:
        The pytree with every leaf a ``jax.Array`` with ``NamedSharding(mesh, P())``.
    """
    _check_mesh(mesh)
    return place(tree, NamedSharding(mesh, P()))


def place(tree: PyTree, shardings: Any) -> Any:
    """Put a pytree on a mesh with the given shardings (one per leaf, or a prefix).

    Every process passes the same global values; with several processes each leaf
    goes through the host so that ``jax.device_put`` builds the global array from
    them (and checks that the processes agree).

    Args:
        tree: Pytree of arrays (PRNG key arrays included).
        shardings: A ``jax.sharding.Sharding``, or a pytree of them that is a prefix
            of ``tree``.

    Returns:
        The pytree of global ``jax.Array`` with those shardings.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(sharding: Any, subtree: PyTree) -> Any:
        return jax.tree_util.tree_map(lambda leaf: _place_leaf(leaf, sharding), subtree)

    return jax.tree_util.tree_map(put, shardings, tree)


def _place_leaf(leaf: Any, sharding: Any) -> Any:
    """One leaf onto a multi-process mesh (``device_put`` checks all processes agree)."""
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _place_leaf(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        leaf = np.asarray(leaf)  # a process-local array: its host value is the input
    return jax.device_put(leaf, sharding)


def pad_to_multiple(batch: PyTree, mask: Any, multiple: int) -> tuple[Any, np.ndarray]:
    """Pad a host batch and its mask so the row count is a multiple of ``multiple``.

    Padded rows repeat row 0 (zeros for an empty batch, which becomes ``multiple``
    masked rows so every device has one) and are masked out, so they contribute
    exactly zero to the clipped sum.

    Args:
        batch: Pytree of arrays with a common leading axis ``B``.
        mask: ``[B]`` booleans (``None``: all rows are real).
        multiple: The number of devices along the data axis, ``>= 1``.

    Returns:
        ``(batch, mask)`` as numpy arrays with ``ceil(B / multiple) * multiple`` rows
        (``multiple`` rows for ``B = 0``).
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}.")
    size = _leading_size(batch, "batch")
    mask = np.ones(size, bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != (size,):
        raise ValueError(f"mask must have shape ({size},) (one flag per row), got {mask.shape}.")
    extra = multiple if size == 0 else -size % multiple
    if extra == 0:
        return jax.tree_util.tree_map(np.asarray, batch), mask

    def pad(leaf: Any) -> np.ndarray:
        arr = np.asarray(leaf)
        fill = arr[:1] if size else np.zeros((1,) + arr.shape[1:], arr.dtype)
        return np.concatenate([arr, np.repeat(fill, extra, axis=0)])

    return jax.tree_util.tree_map(pad, batch), np.concatenate([mask, np.zeros(extra, bool)])


def shard_batch(
    batch: PyTree, mask: Any, mesh: Mesh, *, axis_name: str = "data"
) -> tuple[Any, jax.Array]:
    """Pad a host batch to the data axis and place it sharded along that axis.

    Every process passes the same *global* batch; each process copies only the rows
    of its own devices. For per-process feeding use :class:`dp_jax.distributed.ShardedBatches`.

    Args:
        batch: Pytree of arrays with a common leading axis.
        mask: ``[B]`` booleans (``None``: all rows are real).
        mesh: The mesh.
        axis_name: The data axis of ``mesh``.

    Returns:
        ``(batch, mask)`` as global ``jax.Array`` with ``NamedSharding(mesh, P(axis_name))``.
    """
    n = _check_axis(mesh, axis_name)
    batch, mask = pad_to_multiple(batch, mask, n)
    sharding = NamedSharding(mesh, P(axis_name))
    place = lambda arr: jax.make_array_from_callback(arr.shape, sharding, lambda i: arr[i])
    return jax.tree_util.tree_map(place, batch), place(mask)
