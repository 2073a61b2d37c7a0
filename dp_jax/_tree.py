"""Small pytree helpers shared by the per-example gradient and transform modules."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax._types import PyTree

__all__ = [
    "batch_size_of",
    "concrete_or_none",
    "leaf_bounds",
    "pad_and_chunk",
    "per_leaf_sq_norms",
    "tree_cast_like",
    "tree_wide",
    "tree_zeros_like",
    "unchunk",
    "wide_dtype",
]


def batch_size_of(tree: PyTree, name: str = "batch") -> int:
    """The common leading-axis size of every leaf of ``tree``.

    Raises:
        ValueError: If ``tree`` has no leaves, a scalar leaf, or leaves disagree.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no array leaves; pass a pytree of arrays with a batch axis.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(
            f"every leaf of {name} needs the same leading (example) axis, got shapes {shapes}."
        )
    return int(sizes.pop())


def host_array(value: Any) -> np.ndarray:
    """A numpy copy of ``value``; for a replicated global array, this process's copy.

    ``np.asarray`` refuses a ``jax.Array`` that spans devices of other processes (a
    multi-process mesh); every copy of a replicated array holds the same value.
    """
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return np.asarray(value)


def concrete_or_none(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array if it is concrete, ``None`` if it is a tracer."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def per_leaf_sq_norms(per_example_grads: PyTree) -> list[jax.Array]:
    """Squared L2 norm of each leaf of each example: one ``[B]`` array per leaf (leaf order)."""
    out = []
    for g in jax.tree_util.tree_leaves(per_example_grads):
        flat = jnp.reshape(g, (g.shape[0], -1))
        out.append(jnp.sum(jnp.square(flat), axis=1))
    return out


def tree_zeros_like(tree: PyTree) -> Any:
    """Zeros with the shapes and dtypes of ``tree``."""
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def wide_dtype(dtype: Any) -> Any:
    """``dtype``, or float32 if that is wider: what norms, sums, noise and accumulators use."""
    return jnp.promote_types(dtype, jnp.float32)


def tree_wide(tree: PyTree) -> Any:
    """``tree`` with every leaf in :func:`wide_dtype` of its dtype (16-bit floats to float32)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(wide_dtype(jnp.result_type(x))),
                                  tree)


def tree_cast_like(tree: PyTree, like: PyTree) -> Any:
    """``tree`` with each leaf cast to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda x, ref: x.astype(jnp.result_type(ref)), tree, like)


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, numbers.Real):
        return True
    return hasattr(x, "shape") and np.ndim(x) == 0


def leaf_bounds(max_grad_norm: Any, grads_tree: PyTree) -> list[Any]:
    """Per-layer bounds in the leaf order of ``grads_tree``.

    Args:
        max_grad_norm: A pytree with the structure of ``grads_tree`` whose leaves
            are positive scalars, or a sequence of positive scalars in leaf order.
        grads_tree: The (per-example or summed) gradient pytree.

    Returns:
        One scalar bound per leaf.

    Raises:
        ValueError: If the structure or the number of bounds does not match, or a
            concrete bound is not positive.
    """
    treedef = jax.tree_util.tree_structure(grads_tree)
    n = treedef.num_leaves
    bounds = None
    try:
        if jax.tree_util.tree_structure(max_grad_norm) == treedef:
            bounds = jax.tree_util.tree_leaves(max_grad_norm)
    except (TypeError, ValueError):  # pragma: no cover - defensive
        bounds = None
    if bounds is None and isinstance(max_grad_norm, (Sequence, np.ndarray, jax.Array)) and not (
        isinstance(max_grad_norm, (str, bytes))
    ):
        if np.ndim(max_grad_norm) == 1 and len(max_grad_norm) == n:
            bounds = [max_grad_norm[i] for i in range(n)]
    if bounds is None or not all(_is_number(b) for b in bounds):
        raise ValueError(
            f'clipping="per_layer" needs max_grad_norm as a pytree with the structure of the '
            f"parameters ({treedef}) or a sequence of {n} positive floats in leaf order, got "
            f"{max_grad_norm!r}."
        )
    for i, b in enumerate(bounds):
        value = concrete_or_none(b)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(
                f"max_grad_norm[{i}] must be a finite number > 0, got {b!r}; every per-layer "
                f"bound must be positive."
            )
    return list(bounds)


def pad_and_chunk(tree: PyTree, size: int, chunk: int) -> tuple[Any, int]:
    """Pad the leading axis of every leaf to a multiple of ``chunk`` and reshape to chunks.

    Padded rows are zeros; the caller must mask them out.

    Returns:
        ``(chunked, num_chunks)`` where each leaf has shape ``[num_chunks, chunk, ...]``.
    """
    num_chunks = -(-size // chunk)
    pad = num_chunks * chunk - size

    def one(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
        return jnp.reshape(x, (num_chunks, chunk) + x.shape[1:])

    return jax.tree_util.tree_map(one, tree), num_chunks


def unchunk(tree: PyTree, size: int) -> Any:
    """Inverse of :func:`pad_and_chunk`: merge the two leading axes and drop padding."""

    def one(x: jax.Array) -> jax.Array:
        return jnp.reshape(x, (x.shape[0] * x.shape[1],) + x.shape[2:])[:size]

    return jax.tree_util.tree_map(one, tree)
