"""Ghost ("book-keeping") clipping: per-example clipping without per-example weight gradients.

:func:`ghost_clipped_grad` has the contract of :func:`dp_jax.clipped_grad` and returns the
same clipped sum and :class:`~dp_jax.ClipAux`, but does not differentiate the kernels,
biases and embedding tables of flax's linear, convolution and embedding layers, the
scales and biases of its LayerNorm, RMSNorm and GroupNorm, the factors of ``nnx.LoRA``
(``nnx.LoRALinear``) and the cells of a short ``RNN`` (unrolled) per example: their norms
come from the layers' inputs (a convolution's input patches, a normalisation layer's
normalised input) and output gradients, recorded in one ``jax.vmap`` of
``jax.value_and_grad`` of the per-example loss with a zero probe added to each layer's
output, either by the Gram
form or, where that is cheaper, by forming the per-example product (mixed ghost
clipping; :attr:`GhostPlan.methods` says which), and their clipped sums come from the
same records in the same pass (book-keeping: one backward pass, no second one). Every
other parameter is differentiated per example, as :func:`dp_jax.clipped_grad` does.
Clipped sums are float32 or wider (see :func:`dp_jax.clipped_grad`).

Guarantee:
    The result is :func:`dp_jax.clipped_grad`'s up to floating-point rounding: a
    parameter takes the ghost path only when it is proved to be used by
    intercepted calls alone; :func:`ghost_plan` lists which parameters took
    which path (and, in ``notes``, the layer calls it left to vmap and why).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dp_jax import _tree
from dp_jax._ghost_norms import _clip_flat, _clip_per_layer, _ghost_part, _vmap_part
from dp_jax._ghost_plan import GhostPlan, _make_plan, _per_example_fn, ghost_plan
from dp_jax._grads import ClipAux, _as_mask, _check_clipping, _check_flat_bound
from dp_jax._types import PyTree

__all__ = [
    "GhostPlan",
    "ghost_clipped_grad",
    "ghost_plan",
]


def _ghost_step(loss_fn: Callable, kind: str, params: PyTree, batch: PyTree, mask: jax.Array,
                bound: Any) -> tuple[Any, ClipAux]:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    plan = _make_plan(loss_fn, params, batch)
    ghost_idx = sorted(plan.ghost)
    rest_idx = [i for i in range(len(leaves)) if i not in plan.ghost]
    per_example = _per_example_fn(loss_fn, treedef, plan, rest_idx, ghost_idx)
    size = _tree.batch_size_of(batch)
    probes = [jnp.zeros((size,) + s.out_shape, s.dtype) for s in plan.sites]
    vgrad = jax.vmap(jax.value_and_grad(per_example, argnums=(0, 1), has_aux=True),
                     in_axes=(None, 0, None, 0))
    (losses, records), (rest_grads, probe_grads) = vgrad(
        [leaves[i] for i in rest_idx], probes, [leaves[i] for i in ghost_idx], batch)
    rest_of = dict(zip(rest_idx, rest_grads))
    parts = [
        _vmap_part(rest_of[i]) if i in rest_of
        else _ghost_part(i, leaves[i], plan, records, probe_grads)
        for i in range(len(leaves))
    ]
    if kind == "flat":
        out, aux = _clip_flat(parts, bound, mask)
    else:
        out, aux = _clip_per_layer(parts, bound, mask, treedef)
    loss_sum = jnp.sum(jnp.where(mask, losses, jnp.zeros((), losses.dtype)))
    loss = loss_sum / jnp.maximum(aux.num_examples, 1).astype(loss_sum.dtype)
    return jax.tree_util.tree_unflatten(treedef, out), aux._replace(loss=loss)


def ghost_clipped_grad(
    loss_fn: Callable[[Any, Any], jax.Array],
    max_grad_norm: Any,
    *,
    clipping: str = "flat",
) -> Callable[..., tuple[Any, ClipAux]]:
    """Build ``grad_fn(params, batch, mask=None) -> (clipped_sum, ClipAux)`` by ghost clipping.

    The contract and the result are those of :func:`dp_jax.clipped_grad`: ``clipped_sum =
    sum_{i: mask_i} g_i * min(1, C / (||g_i|| + 1e-6))``; a non-finite norm gives factor 0
    and is counted; padded rows contribute exactly zero whatever their inputs; the same
    :class:`~dp_jax.ClipAux`. But the parameters of flax linear, convolution and
    embedding layers are not differentiated per example: their per-example norms come from the layers' inputs
    and output gradients and their clipped sum from one product per layer (see the module
    docstring). A DP step of an MLP then costs about one forward and one backward pass.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example (e.g.
            :func:`dp_jax.linen_loss` or :func:`dp_jax.nnx_loss`); ``example`` is ``batch``
            without its leading axis.
        max_grad_norm: ``C > 0`` for ``"flat"``; for ``"per_layer"`` a pytree with the
            structure of the parameters, or a sequence of floats in leaf order. ``grad_fn``
            also takes a keyword ``max_grad_norm=`` to override it per call (may be traced).
        clipping: ``"flat"`` or ``"per_layer"``.

    Returns:
        ``grad_fn(params, batch, mask=None, *, max_grad_norm=None)``. It is jitted (one
        compilation per shape; the layers are found while tracing) and can be called
        inside ``jax.jit``. Its :class:`~dp_jax.ClipAux` has the mean masked loss in
        ``loss``.

    Raises:
        ValueError: If ``clipping`` or a concrete bound is invalid (also per call).
    """
    kind = _check_clipping(clipping)
    if kind == "flat":
        _check_flat_bound(max_grad_norm)
    default_bound = max_grad_norm
    compiled = jax.jit(functools.partial(_ghost_step, loss_fn, kind))

    def grad_fn(params: PyTree, batch: PyTree, mask: Any = None, *, max_grad_norm: Any = None):
        bound = default_bound if max_grad_norm is None else max_grad_norm
        m = _as_mask(mask, _tree.batch_size_of(batch))
        if kind == "flat":
            bound = _check_flat_bound(bound)
        else:
            bound = _tree.leaf_bounds(bound, params)
        return compiled(params, batch, m, bound)

    return grad_fn
