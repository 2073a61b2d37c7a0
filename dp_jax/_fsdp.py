"""Sharded parameters (FSDP-style) for DP-SGD over a mesh: where each array lives.

With ``param_sharding`` the parameters, the optimizer state (every subtree shaped
like the parameters: the clipped-sum accumulator, Adam's moments, ...) and the
frozen parameters are split along the mesh's data axis, the batch too, and the
step is ONE ``jax.jit`` computation of the single-device step with those input and
output shardings: XLA inserts the all-gathers and reduce-scatters. Nothing is
written per device, so per-example norms are taken over whole parameters and the
noise is drawn for the global parameters from the replicated key.

Guarantee:
    A step with sharded parameters computes the function the one-device step
    computes (the same per-example norms, clip factors and Gaussian draw for the
    same key); only the order of floating-point additions may differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dp_jax._mesh import _check_axis, place
from dp_jax._types import PyTree

__all__ = [
    "FSDP_MIN_SIZE",
    "ShardingPlan",
    "fsdp_specs",
    "plan_sharding",
]

#: Arrays with fewer elements than this stay replicated under ``param_sharding="fsdp"``.
FSDP_MIN_SIZE = 1024

_CHOICES = ("fsdp",)


def _fsdp_spec(shape: tuple[int, ...], axis_name: str, axis_size: int, min_size: int) -> P:
    """Shard the largest dimension divisible by ``axis_size`` (the first of equals)."""
    if math.prod(shape) < min_size:
        return P()
    sizes = [(size, -dim) for dim, size in enumerate(shape) if size >= axis_size and
             size % axis_size == 0]
    if not sizes:
        return P()
    dim = -max(sizes)[1]
    return P(*([None] * dim), axis_name)


def fsdp_specs(
    params: PyTree, mesh: Mesh, *, axis_name: str = "data", min_size: int = FSDP_MIN_SIZE
) -> PyTree:
    """The ``PartitionSpec`` of every leaf under the FSDP rule (``param_sharding="fsdp"``).

    Each array of at least ``min_size`` elements is split along ``axis_name`` on its
    largest dimension divisible by the axis size (the first of equal ones); smaller
    arrays, and arrays with no such dimension, are replicated (``PartitionSpec()``).

    Args:
        params: Pytree of arrays (or of ``jax.ShapeDtypeStruct``).
        mesh: The mesh.
        axis_name: The mesh axis to split along (the data axis).
        min_size: Smallest element count that is split; ``1`` splits every array
            that has a divisible dimension.

    Returns:
        A pytree like ``params`` of ``jax.sharding.PartitionSpec``; pass it (or an
        edited copy) as ``make_private(param_sharding=...)``.

    Raises:
        ValueError: If ``axis_name`` is not an axis of ``mesh`` or ``min_size < 0``.
    """
    size = _check_axis(mesh, axis_name)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}.")
    return jax.tree_util.tree_map(
        lambda x: _fsdp_spec(tuple(np.shape(x)), axis_name, size, min_size), params
    )


def _check_spec(path: str, spec: Any, shape: tuple[int, ...], mesh: Mesh) -> None:
    """One leaf's spec: a ``PartitionSpec`` of mesh axes that divide the dimensions."""
    where = f"param_sharding{path}"
    if not isinstance(spec, P):
        raise TypeError(
            f"{where} must be a jax.sharding.PartitionSpec, got {spec!r}; build the tree with "
            "dp_jax.distributed.fsdp_specs(params, mesh) or jax.tree_util.tree_map(lambda x: "
            "PartitionSpec(...), params)."
        )
    if len(spec) > len(shape):
        raise ValueError(
            f"{where}={spec} names {len(spec)} dimensions but the parameter has shape {shape}; "
            "give at most one entry per dimension."
        )
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"{where}={spec} names mesh axes {unknown} that the mesh (axes "
                f"{mesh.axis_names}) lacks; use the mesh's axis names."
            )
        parts = math.prod(int(mesh.shape[a]) for a in axes)
        if shape[dim] % parts:
            raise ValueError(
                f"{where}={spec} splits dimension {dim} of shape {shape} into {parts} parts, "
                f"which does not divide {shape[dim]}; replicate that dimension (None) or use "
                'param_sharding="fsdp", which only splits divisible dimensions.'
            )


def _check_spec_tree(specs: PyTree, params: PyTree, mesh: Mesh) -> None:
    want = jax.tree_util.tree_structure(params)
    got = jax.tree_util.tree_structure(specs)
    if got != want:
        raise ValueError(
            f"param_sharding must be \"fsdp\", None or a pytree of PartitionSpec with the "
            f"structure of params ({want}); got {specs!r} with structure {got}. Build it with "
            "dp_jax.distributed.fsdp_specs(params, mesh) or jax.tree_util.tree_map(lambda x: "
            "PartitionSpec(...), params)."
        )
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), spec in zip(flat, jax.tree_util.tree_leaves(specs)):
        _check_spec(jax.tree_util.keystr(path), spec, tuple(np.shape(leaf)), mesh)


def _param_specs(param_sharding: Any, params: PyTree, mesh: Mesh, axis_name: str) -> PyTree:
    if isinstance(param_sharding, str):
        if param_sharding not in _CHOICES:
            raise ValueError(
                f"param_sharding must be one of {list(_CHOICES)}, None or a pytree of "
                f"PartitionSpec; got {param_sharding!r}. Use \"fsdp\" to split every large "
                "parameter along the data axis."
            )
        return fsdp_specs(params, mesh, axis_name=axis_name)
    _check_spec_tree(param_sharding, params, mesh)
    return param_sharding


def _frozen_specs(frozen: PyTree, param_sharding: Any, mesh: Mesh, axis_name: str) -> PyTree:
    """Frozen leaves already on ``mesh`` keep their spec; the rest follow "fsdp" or replicate."""
    rule = fsdp_specs(frozen, mesh, axis_name=axis_name) if param_sharding == "fsdp" else \
        jax.tree_util.tree_map(lambda _: P(), frozen)

    def keep(leaf: Any, spec: P) -> P:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return sharding.spec
        return spec

    return jax.tree_util.tree_map(keep, frozen, rule)


def _shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs)


class ShardingPlan:
    """Where the parameters, the optimizer state, the noise and the frozen parameters live.

    Attributes:
        mesh: The mesh.
        param_specs: A pytree like ``params`` of ``PartitionSpec``.
        frozen_specs: A pytree like ``frozen_params`` of ``PartitionSpec`` (or ``None``).
    """

    def __init__(self, mesh: Mesh, params: PyTree, param_specs: PyTree,
                 frozen_specs: PyTree = None) -> None:
        self.mesh = mesh
        self.param_specs = param_specs
        self.frozen_specs = frozen_specs
        self._treedef = jax.tree_util.tree_structure(params)
        self._shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(params)]

    def _like_params(self, node: Any) -> bool:
        if jax.tree_util.tree_structure(node) != self._treedef:
            return False
        return [np.shape(x) for x in jax.tree_util.tree_leaves(node)] == self._shapes

    def specs_of(self, tree: PyTree) -> PyTree:
        """Specs for any pytree: subtrees shaped like the parameters split like them, the rest whole."""
        return jax.tree_util.tree_map(
            lambda node: self.param_specs if self._like_params(node) else P(), tree,
            is_leaf=self._like_params,
        )

    def shardings_of(self, tree: PyTree) -> PyTree:
        """:meth:`specs_of` as ``NamedSharding``."""
        return _shardings(self.specs_of(tree), self.mesh)

    def place(self, tree: PyTree) -> Any:
        """``tree`` on the mesh with :meth:`shardings_of` (a state, the noise, a checkpoint)."""
        return place(tree, self.shardings_of(tree))

    def place_frozen(self, frozen: PyTree) -> Any:
        """The frozen parameters on the mesh with :attr:`frozen_specs`."""
        return place(frozen, _shardings(self.frozen_specs, self.mesh))

    def gathered(self, grad_fn: Callable) -> Callable:
        """``grad_fn`` that sees the parameters whole (gathered), the batch still split.

        As FSDP does: each device computes its rows' per-example gradients with the
        full parameters; the clipped sum is split again when it is accumulated.
        Without the constraint XLA may split the attention heads against the batch
        and copy whole activations between devices.
        """
        whole = NamedSharding(self.mesh, P())

        def fn(params: PyTree, batch: PyTree, mask: Any, **kwargs: Any) -> Any:
            params = jax.lax.with_sharding_constraint(params, whole)
            return grad_fn(params, batch, mask, **kwargs)

        return fn

    def jit(self, body: Callable, state: PyTree) -> Callable:
        """``jax.jit(body)`` whose new state is placed like ``state`` and metrics replicated."""
        out = (self.shardings_of(state), NamedSharding(self.mesh, P()))
        return jax.jit(body, out_shardings=out)


def plan_sharding(
    param_sharding: Any, params: PyTree, mesh: Any, axis_name: str, frozen_params: PyTree = None,
) -> Optional[ShardingPlan]:
    """Check ``make_private``'s sharding arguments; change nothing.

    Args:
        param_sharding: ``None``, ``"fsdp"`` or a pytree like ``params`` of ``PartitionSpec``.
        params: The parameters.
        mesh: The mesh (``None``: one device).
        axis_name: The data axis of ``mesh``.
        frozen_params: The frozen parameters, or ``None``.

    Returns:
        The plan, or ``None`` for the replicated data-parallel step (no ``param_sharding``
        and no ``frozen_params``) and for one device.

    Raises:
        ValueError: If ``param_sharding`` is given without a mesh, is an unknown string,
            or does not fit ``params`` and the mesh.
        TypeError: If a leaf of a ``param_sharding`` tree is not a ``PartitionSpec``.
    """
    if mesh is None:
        if param_sharding is not None:
            raise ValueError(
                f"param_sharding={param_sharding!r} needs a mesh to split the parameters over, "
                "but mesh=None; pass mesh=dp_jax.data_mesh() (and the same axis_name), or "
                "param_sharding=None to train on one device."
            )
        return None
    _check_axis(mesh, axis_name)
    if param_sharding is None and frozen_params is None:
        return None
    if param_sharding is None:  # frozen parameters need the compiled step: replicate all
        specs = jax.tree_util.tree_map(lambda _: P(), params)
    else:
        specs = _param_specs(param_sharding, params, mesh, axis_name)
    frozen = None if frozen_params is None else _frozen_specs(
        frozen_params, param_sharding, mesh, axis_name)
    return ShardingPlan(mesh, params, specs, frozen)
