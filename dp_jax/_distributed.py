"""Data-parallel DP-SGD over a ``jax.sharding`` mesh, on one process or many.

Every chunk is sharded along the mesh's data axis; each device clips its own rows
(:func:`sharded_clipped_grad`), the clipped sums and counts are ``psum``-ed
(:func:`psum_clipped`), and the noise is added once to the global sum from the
replicated state and key (:func:`make_sharded_step`). For several processes,
call :func:`jax.distributed.initialize` in every process before any other JAX
call; every process then runs the same program on the same data and
:class:`ShardedBatches` broadcasts each logical batch's indices from process 0.
If a process dies, a collective with it fails and JAX terminates the others
once its heartbeats stop; a step is one XLA computation, so no partially
noised update is applied.

Guarantee:
    A sharded step releases exactly what the one-device step releases for the
    same logical batch: one Gaussian draw on the global clipped sum, computed
    identically by every device, with replicated outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dp_jax._grads import ClipAux
from dp_jax._mesh import (
    _check_axis,
    _check_multiple,
    _leading_size,
    data_mesh,
    pad_to_multiple,
    place,
    replicate,
    shard_batch,
)
from dp_jax._sharded_batches import ShardedBatches
from dp_jax._step import make_step_fn
from dp_jax._types import PyTree


def psum_clipped(clipped_sum: PyTree, aux: ClipAux, axis_name: str) -> tuple[Any, ClipAux]:
    """Reduce one device's clipping result over the data axis (call inside ``shard_map``).

    The clipped sums and the counts are added with ``jax.lax.psum``; the mean loss is
    re-weighted by the local example counts, so it is the mean over all real rows of
    the global batch. Per-example norms stay local (they are per row).

    Args:
        clipped_sum: This device's params-shaped clipped sum.
        aux: This device's :class:`~dp_jax.ClipAux`.
        axis_name: The mesh axis to reduce over.

    Returns:
        ``(global_clipped_sum, aux)`` with global counts and loss, local norms.
    """
    total = jax.lax.psum(clipped_sum, axis_name)
    count = jax.lax.psum(aux.num_examples, axis_name)
    loss = aux.loss
    if loss is not None:
        weighted = jax.lax.psum(loss * aux.num_examples.astype(loss.dtype), axis_name)
        loss = weighted / jnp.maximum(count, 1).astype(loss.dtype)
    return total, aux._replace(
        num_nonfinite=jax.lax.psum(aux.num_nonfinite, axis_name),
        num_unclipped=jax.lax.psum(aux.num_unclipped, axis_name),
        num_examples=count,
        loss=loss,
    )


def _aux_specs(axis_name: str) -> ClipAux:
    row = P(axis_name)
    return ClipAux(norms=row, num_nonfinite=P(), num_unclipped=P(), num_examples=P(),
                   loss=P(), layer_norms=row)


def _is_traced(bound: Any) -> bool:
    """Whether a clipping bound holds JAX arrays (traced under ``jit``)."""
    return any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(bound))


def sharded_clipped_grad(
    grad_fn: Callable[..., tuple[Any, ClipAux]], mesh: Mesh, *, axis_name: str = "data"
) -> Callable[..., tuple[Any, ClipAux]]:
    """Turn a per-device ``grad_fn`` into a global one that clips on each device and psums.

    Args:
        grad_fn: ``grad_fn(params, batch, mask, max_grad_norm=None) -> (clipped_sum,
            ClipAux)``, e.g. :func:`dp_jax.clipped_grad`'s result.
        mesh: The mesh.
        axis_name: The data axis of ``mesh``.

    Returns:
        ``fn(params, batch, mask, max_grad_norm=None) -> (clipped_sum, aux)`` (traceable;
        call it inside ``jax.jit``). ``params`` are replicated, ``batch`` and ``mask``
        sharded along ``axis_name`` (their row count a multiple of the axis size). The
        result's clipped sum, counts and loss are global and replicated; ``aux.norms``
        (and ``layer_norms``) are the ``[B]`` global per-row norms, sharded by rows.
    """
    n = _check_axis(mesh, axis_name)
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}.")

    # check_vma=False in both shard_maps below: with JAX's replication typing on, every
    # device-invariant value that meets a per-device one inside grad_fn (the replicated
    # parameters, or the zero probes of ghost clipping) is cast to varying, and autodiff
    # transposes that cast into a psum -- the gradient of each example would be added to
    # the examples in the same row of the other devices. Each device's gradients must stay
    # its own; the only reduction is the explicit psum_clipped after clipping.
    def body(params: PyTree, batch: PyTree, mask: jax.Array, bound: Any):
        kwargs = {} if bound is None else {"max_grad_norm": bound}
        clipped_sum, aux = grad_fn(params, batch, mask, **kwargs)
        return psum_clipped(clipped_sum, aux, axis_name)

    def fn(params: PyTree, batch: PyTree, mask: Any, max_grad_norm: Any = None):
        size = _leading_size(batch, "batch")
        _check_multiple(size, n, "batch")
        mask = jnp.ones((size,), bool) if mask is None else jnp.asarray(mask, dtype=bool)
        if mask.shape != (size,):
            raise ValueError(f"mask must have shape ({size},), got {mask.shape}.")
        if _is_traced(max_grad_norm):  # an injected or adaptive bound: an input
            mapped = jax.shard_map(
                body, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name), P()),
                out_specs=(P(), _aux_specs(axis_name)), check_vma=False,
            )
            return mapped(params, batch, mask, max_grad_norm)
        # A static bound (a float, or per-layer bounds as a list) stays a Python value.
        mapped = jax.shard_map(
            lambda p, b, m: body(p, b, m, max_grad_norm), mesh=mesh,
            in_specs=(P(), P(axis_name), P(axis_name)), out_specs=(P(), _aux_specs(axis_name)),
            check_vma=False,
        )
        return mapped(params, batch, mask)

    return fn


# --------------------------------------------------------------------------- the step


def _check_tx(tx: Any) -> None:
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"tx must be an optax GradientTransformation taking the clipped SUM, got "
            f"{type(tx).__name__}; e.g. optax.chain(optax.scale(1 / m), "
            "dp_jax.add_gaussian_noise(sigma, C, m, key), optax.sgd(lr))."
        )


def make_sharded_step(
    grad_fn: Callable[..., tuple[Any, ClipAux]],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    bound_of: Optional[Callable[[Any], Any]] = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Build the jitted data-parallel DP step.

    ``step(state, batch, mask, apply_update, noise=None) -> (state, metrics)``:

    1. on each device, ``grad_fn(params, local_batch, local_mask, max_grad_norm=...)``
       clips the device's rows and sums them (padded rows contribute zero);
    2. :func:`psum_clipped` adds the sums and the counts over ``axis_name``;
    3. ``tx.update(global_clipped_sum, opt_state, params, clip_aux=aux,
       apply_update=apply_update[, noise=noise])`` (the keyword arguments only when
       ``tx`` is an ``optax.GradientTransformationExtraArgs``, as ``optax.chain``
       results are) adds the noise once, from the replicated key, and averages;
    4. the update is applied; the new state and the metrics are replicated.

    ``state`` is any NamedTuple with fields ``params``, ``opt_state`` and ``step``
    (e.g. :class:`dp_jax.TrainState`), placed with :func:`replicate` (``jax.jit``
    refuses a state committed to a single device); ``step`` is incremented by
    ``apply_update``. An extra-args ``tx`` must accept the keywords ``clip_aux`` and
    ``apply_update`` (``**extra`` will do; ``optax.chain`` passes them on). A ``tx``
    that takes no extra arguments is applied at every call whatever ``apply_update``
    says: each call is then one whole logical batch (a chunk of a virtual batch
    would get its own noise).

    Args:
        grad_fn: ``grad_fn(params, batch, mask, max_grad_norm=None) -> (clipped_sum,
            ClipAux)``, e.g. ``dp_jax.clipped_grad(loss_fn, C)``.
        tx: The optax transformation taking the clipped SUM and adding the noise.
        mesh: The device mesh (:func:`data_mesh`).
        axis_name: The data axis of ``mesh``.
        bound_of: ``bound_of(opt_state) -> max_grad_norm`` for a bound that lives in
            the optimizer state (injected or adaptive); ``None`` uses ``grad_fn``'s.

    Returns:
        The jitted ``step``. ``batch`` and ``mask`` must have a row count that is a
        multiple of the data axis size (:func:`shard_batch` / :class:`ShardedBatches`
        pad); ``metrics`` is ``{"loss": mean loss over the real rows, "applied": bool}``.

    Raises:
        TypeError: If ``grad_fn``/``bound_of`` is not callable, ``tx`` is not a
            transformation or ``mesh`` not a ``Mesh``.
        ValueError: If ``axis_name`` is not an axis of ``mesh``.
    """
    _check_tx(tx)
    if bound_of is not None and not callable(bound_of):
        raise TypeError(f"bound_of must be callable or None, got {type(bound_of).__name__}.")
    clip = sharded_clipped_grad(grad_fn, mesh, axis_name=axis_name)
    replicated = NamedSharding(mesh, P())
    step = make_step_fn(clip, tx, bound_of)
    return jax.jit(step, out_shardings=replicated)
