"""Ghost clipping, arithmetic side: per-example norms from layer inputs and output gradients.

For inputs ``A_i`` (``[n, d_in]``; a convolution's input patches, per group) and output
gradients ``G_i`` (``[n, d_out]``) the kernel gradient is ``A_i^T G_i``: its squared norm
is ``|a_i|^2 |g_i|^2`` for ``n = 1``, the Gram form ``<A_i A_i^T, G_i G_i^T>`` otherwise,
or the per-example product when that is cheaper (the choice of
:func:`~dp_jax._ghost_plan.leaf_method`); the clipped sum is one product over all rows
of the batch, or the weighted sum of the per-example products. An
embedding table's squared norm is a Gram matrix masked by token equality, its
clipped sum one scatter-add. A normalisation layer's scale gradient is the
per-example ``sum_rows xhat * g`` (``[B, features]``), its bias that of a dense layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dp_jax._ghost_conv import patch_to_kernel
from dp_jax._ghost_plan import _Plan, leaf_method
from dp_jax._grads import ClipAux, _factor, _norm_dtype, _weighted_sum, _wide


_HIGHEST = jax.lax.Precision.HIGHEST


class _Part(NamedTuple):
    """One parameter's per-example squared norm and its clipped sum as a function."""

    sq: jax.Array
    total: Callable[[jax.Array, jax.Array], jax.Array]  # (factor, keep) -> clipped sum


def _gram_sq(a: jax.Array, g: jax.Array) -> jax.Array:
    """``sum_groups ||A_i^T G_i||_F^2`` per example, ``a [B, n, G, d_in]``, ``g [B, n, G, d_out]``."""
    if a.shape[1] == 1:
        return jnp.sum(jnp.sum(jnp.square(a[:, 0]), -1) * jnp.sum(jnp.square(g[:, 0]), -1), -1)
    aa = jnp.einsum("bngd,bmgd->bgnm", a, a, precision=_HIGHEST)
    gg = jnp.einsum("bngd,bmgd->bgnm", g, g, precision=_HIGHEST)
    return jnp.sum(aa * gg, axis=(1, 2, 3))


def _kept(x: jax.Array, keep: jax.Array) -> jax.Array:
    """``x`` with the rows of dropped examples set to 0 (NaN-safe, unlike a product)."""
    return jnp.where(jnp.reshape(keep, (-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _weights(factor: jax.Array, keep: jax.Array, like: jax.Array) -> jax.Array:
    w = jnp.where(keep, factor, 0.0).astype(like.dtype)
    return jnp.reshape(w, (-1,) + (1,) * (like.ndim - 1))


def _kernel_part(a: jax.Array, g: jax.Array, to_leaf: Callable[[jax.Array], jax.Array],
                 dtype: Any, precision: Any, direct: bool) -> _Part:
    """A kernel from inputs ``a [B, n, G, d_in]`` and output gradients ``g [B, n, G, d_out]``.

    ``to_leaf`` maps ``[..., G, d_in, d_out]`` products to the kernel's shape (leading
    axes kept); the sums come out in ``dtype``. ``direct``: form the per-example
    products (else the Gram form; :func:`~dp_jax._ghost_plan.leaf_method` chooses).
    """
    if direct:
        per_example = jnp.einsum("bngi,bngo->bgio", a, g, precision=precision)
        return _vmap_part(to_leaf(per_example).astype(dtype))

    def total(factor: jax.Array, keep: jax.Array) -> jax.Array:
        out = jnp.einsum("bngi,bngo->gio", _kept(a, keep), _kept(g, keep) * _weights(factor, keep, g),
                         precision=precision)
        return to_leaf(out).astype(dtype)

    return _Part(_gram_sq(a, g).astype(dtype), total)


def _bias_part(g: jax.Array, shape: tuple, dtype: Any, precision: Any) -> _Part:
    summed = jnp.sum(g, axis=1)  # [B, d_out]: the per-example bias gradients

    def total(factor: jax.Array, keep: jax.Array) -> jax.Array:
        w = jnp.where(keep, factor, 0.0).astype(summed.dtype)
        out = jnp.einsum("bo,b->o", _kept(summed, keep), w, precision=precision)
        return jnp.reshape(out, shape).astype(dtype)

    return _Part(jnp.sum(jnp.square(summed), axis=-1).astype(_wide(dtype)), total)


def _embed_part(ids: jax.Array, g: jax.Array, shape: tuple, dtype: Any) -> _Part:
    """Embedding table: Gram of the output gradients masked by equal ids."""
    size = shape[0]
    valid = ids < size
    g = jnp.where(valid[..., None], g, jnp.zeros((), g.dtype))  # ids jnp.take drops
    gg = jnp.einsum("bsd,btd->bst", g, g, precision=_HIGHEST)
    same = ids[:, :, None] == ids[:, None, :]
    sq = jnp.sum(jnp.where(same, gg, jnp.zeros((), gg.dtype)), axis=(1, 2))

    def total(factor: jax.Array, keep: jax.Array) -> jax.Array:
        rows = _kept(g, keep) * _weights(factor, keep, g)
        out = jnp.zeros((size, g.shape[-1]), g.dtype).at[jnp.reshape(ids, (-1,))].add(
            jnp.reshape(rows, (-1, g.shape[-1])), mode="drop")
        return jnp.reshape(out, shape).astype(dtype)

    return _Part(sq.astype(_wide(dtype)), total)


def _vmap_part(g: jax.Array) -> _Part:
    sq = jnp.sum(jnp.square(jnp.reshape(g, (g.shape[0], -1)).astype(_wide(g.dtype))), axis=1)
    return _Part(sq, lambda factor, keep: _weighted_sum(g, factor, keep))


def _ghost_part(leaf_index: int, leaf: Any, plan: _Plan, records: list, probe_grads: list
                ) -> _Part:
    """The :class:`_Part` of one ghost leaf from the records and output gradients."""
    chosen = [i for i, s in enumerate(plan.sites) if s.kernel == leaf_index] or [
        i for i, s in enumerate(plan.sites) if s.bias == leaf_index]
    sites = [plan.sites[i] for i in chosen]
    first = sites[0]
    dtype = _wide(jnp.promote_types(first.dtype, leaf.dtype))  # never 16-bit norms or sums
    size = probe_grads[chosen[0]].shape[0]
    g = jnp.concatenate([jnp.reshape(probe_grads[i], (size, -1, plan.sites[i].d_out))
                         for i in chosen], axis=1).astype(dtype)
    precisions = {s.precision for s in sites}
    precision = precisions.pop() if len(precisions) == 1 else _HIGHEST
    shape = tuple(jnp.shape(leaf))
    out_dtype = _wide(leaf.dtype)  # the clipped sum: float32 or wider, never rounded here
    if first.bias == leaf_index:
        return _bias_part(g, shape, out_dtype, precision)
    recorded = jnp.concatenate([records[i] for i in chosen], axis=1)
    if first.kind == "embed":
        return _embed_part(recorded, g, shape, out_dtype)
    if first.kind == "norm":  # a scale: sum over rows of xhat * g, per example
        per_example = jnp.einsum("bnc,bnc->bc", recorded.astype(dtype), g, precision=_HIGHEST)
        return _vmap_part(jnp.reshape(per_example, (size,) + shape).astype(out_dtype))
    groups = first.groups
    a = jnp.reshape(recorded.astype(dtype), recorded.shape[:2] + (groups, -1))
    g = jnp.reshape(g, g.shape[:2] + (groups, -1))
    direct = leaf_method(leaf_index, plan, size) == "per_example"
    return _kernel_part(a, g, _to_leaf(first.kind, shape), out_dtype, precision, direct)


def _to_leaf(kind: str, shape: tuple) -> Callable[[jax.Array], jax.Array]:
    """Map ``[..., G, d_in, d_out]`` kernel products to the leaf's layout."""
    if kind == "conv":
        return lambda x: patch_to_kernel(x, shape)
    return lambda x: jnp.reshape(x, x.shape[:-3] + shape)


# ------------------------------------------------------------------ clipping


def _sum_sq(sq: list[jax.Array], size: int) -> jax.Array:
    dtype = _norm_dtype(sq) if sq else jnp.float32
    return sum((s.astype(dtype) for s in sq), jnp.zeros((size,), dtype))


def _clip_flat(parts: list[_Part], bound: Any, mask: jax.Array) -> tuple[list, ClipAux]:
    norms = jnp.sqrt(_sum_sq([p.sq for p in parts], mask.shape[0]))
    finite = jnp.isfinite(norms)
    keep = mask & finite
    factor = jnp.where(keep, _factor(norms, bound), 0.0)
    aux = ClipAux(
        norms=norms,
        num_nonfinite=jnp.sum(mask & ~finite, dtype=jnp.int32),
        num_unclipped=jnp.sum(keep & (norms <= jnp.asarray(bound, norms.dtype)),
                              dtype=jnp.int32),
        num_examples=jnp.sum(mask, dtype=jnp.int32),
    )
    return [p.total(factor, keep) for p in parts], aux


def _clip_per_layer(parts: list[_Part], bounds: list, mask: jax.Array, treedef: Any
                    ) -> tuple[list, ClipAux]:
    layer_norms = [jnp.sqrt(p.sq) for p in parts]
    all_finite = jnp.ones(mask.shape, bool)
    for n in layer_norms:
        all_finite = all_finite & jnp.isfinite(n)
    keep = mask & all_finite
    unclipped = keep
    out = []
    for p, n, c in zip(parts, layer_norms, bounds):
        out.append(p.total(jnp.where(keep, _factor(n, c), 0.0), keep))
        unclipped = unclipped & (n <= jnp.asarray(c, n.dtype))
    aux = ClipAux(
        norms=jnp.sqrt(_sum_sq([p.sq for p in parts], mask.shape[0])),
        num_nonfinite=jnp.sum(mask & ~all_finite, dtype=jnp.int32),
        num_unclipped=jnp.sum(unclipped, dtype=jnp.int32),
        num_examples=jnp.sum(mask, dtype=jnp.int32),
        layer_norms=jax.tree_util.tree_unflatten(treedef, layer_norms),
    )
    return out, aux
