"""Ghost ("book-keeping") clipping: per-example clipping without per-example weight gradients.

:func:`ghost_clipped_grad` has the contract of :func:`dp_jax.clipped_grad` and returns the
same clipped sum and :class:`~dp_jax.ClipAux`, but does not differentiate the kernels,
biases and embedding tables of flax's linear and embedding layers per example.

Linear layers. For an example ``i`` whose input rows to a layer are ``A_i`` (``[n, d_in]``:
one row per position, ``n = 1`` without a sequence axis) and whose loss gradient with
respect to the layer's output rows is ``G_i`` (``[n, d_out]``), the kernel gradient is
``A_i^T G_i`` and the bias gradient ``sum_t G_i[t]``. So

* ``||A_i^T G_i||^2 = |a_i|^2 |g_i|^2`` when ``n = 1``; for ``n > 1`` it is
  ``<A_i A_i^T, G_i G_i^T>`` (the Gram form, ``n^2 (d_in + d_out)`` operations), or, when
  that is the larger cost (long sequences, ``n^2 (d_in + d_out) > d_in d_out``), the
  per-example product ``A_i^T G_i`` is formed once and reused for the sum;
* the clipped sum of the kernel gradients is ``sum_i f_i A_i^T G_i``: ONE matrix product
  over all rows of the batch, the product a non-private step computes anyway.

Embedding layers. With token ids ``t_i`` and output gradients ``G_i``, the squared norm
of the table's gradient is ``sum_{s,t: t_is = t_it} <G_i[s], G_i[t]>`` (a Gram matrix
masked by token equality) and the clipped sum is one scatter-add of ``f_i G_i`` rows.
Used when ``n^2 <= 64 * num_embeddings``; otherwise the table is differentiated per
example (that is then the cheaper way).

``A_i``, the ids and ``G_i`` come from one ``jax.vmap`` of ``jax.value_and_grad`` of the
per-example loss: every call of a supported layer is intercepted, its input recorded and
a zero "probe" added to its output; differentiating with respect to the probes gives
``G_i``. The same pass differentiates the remaining parameters (convolutions,
normalisation layers, anything unrecognised) per example, as :func:`dp_jax.clipped_grad`
does, and their norms join the per-example total.

Supported layers: ``flax.linen.Dense``, ``DenseGeneral`` (no ``batch_dims``) and ``Embed``
(``__call__``, not ``attend``); ``flax.nnx.Linear``, ``LinearGeneral`` (no ``batch_axis``)
and ``Embed``; each with flax's default ``dot_general`` and ``promote_dtype`` (for nnx,
no ``preferred_element_type`` or ``out_sharding``) and not subclassed with a new
``__call__`` (linen). A layer may be called several times per example (weight sharing,
the same module applied twice): the rows of all calls are concatenated, so the
per-example gradient is the sum over the calls, as it must be.

Safety. A parameter takes the ghost path only if it is proved to be used by intercepted
calls alone: a trace of the loss in which those calls read a *substitute* copy of their
parameters must not read the original parameter anywhere (the jaxpr is inspected). A
parameter also read elsewhere (tied weights, ``Embed.attend``, a regulariser on a
kernel, a layer called inside ``jax.lax.scan``, ``jax.checkpoint``, a nested
``jax.jit`` or a flax lifted transformation, whose calls are not intercepted) is
differentiated per example instead. The result is therefore
:func:`dp_jax.clipped_grad`'s up to floating-point rounding; :func:`ghost_plan` lists
which parameters took which path.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.tracers import current_trace
from flax.linen import dtypes as linen_dtypes
from flax.nnx.nn import dtypes as nnx_dtypes

from dp_jax import _tree
from dp_jax._grads import (
    ClipAux,
    _as_mask,
    _check_clipping,
    _check_flat_bound,
    _factor,
    _norm_dtype,
    _weighted_sum,
    _wide,
)

__all__ = ["GhostPlan", "ghost_clipped_grad", "ghost_plan"]

_HIGHEST = jax.lax.Precision.HIGHEST
# Largest per-example kernel-gradient tensor (elements, whole batch) the direct form stores.
_DIRECT_MAX_ELEMENTS = 2**27
# An embedding takes the ghost path when rows**2 <= this * num_embeddings.
_EMBED_GRAM_FACTOR = 64


# ------------------------------------------------------------------ supported layer calls


class _Call(NamedTuple):
    """One call of a supported layer, with what the layer itself reads."""

    kind: str  # "linear" or "embed"
    framework: str  # "linen" or "nnx": which promote_dtype signature applies
    inputs: Any
    kernel: Any  # the kernel, or the embedding table
    bias: Any  # None without a bias (always None for embeddings)
    axes: tuple[int, ...]  # contracted input axes, sorted, non-negative (linear)
    dtype: Any  # the layer's ``dtype`` attribute (None: inferred)
    precision: Any


def _as_tuple(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,)


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a if a >= 0 else ndim + a for a in axes))


def _only_input(args: tuple, kwargs: dict, allowed_none: tuple[str, ...]) -> Any:
    """The single positional input of a layer call, or None if the call has more."""
    if len(args) != 1 or any(k not in allowed_none or v is not None for k, v in kwargs.items()):
        return None
    return args[0]


def _is_ints(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer)


_LINEN_CALLS = (nn.Dense.__call__, nn.DenseGeneral.__call__, nn.Embed.__call__)


def _linen_call(module: Any, args: tuple, kwargs: dict) -> Optional[_Call]:
    method = type(module).__call__
    if not any(method is known for known in _LINEN_CALLS):
        return None
    inputs = _only_input(args, kwargs, ())
    if inputs is None or module.scope is None or (
            module.promote_dtype is not linen_dtypes.promote_dtype):
        return None
    params = module.variables.get("params", {})
    if method is nn.Embed.__call__:
        table = params.get("embedding")
        if table is None or not _is_ints(inputs):
            return None
        return _Call("embed", "linen", inputs, table, None, (), module.dtype, None)
    if method is nn.Dense.__call__:
        axes_attr: Any = -1
    elif method is nn.DenseGeneral.__call__ and not _as_tuple(module.batch_dims):
        axes_attr = module.axis
    else:
        return None
    if module.dot_general is not None or module.dot_general_cls is not None:
        return None
    kernel = params.get("kernel")
    bias = params.get("bias") if module.use_bias else None
    if kernel is None or (module.use_bias and bias is None):
        return None
    axes = _normalize_axes(_as_tuple(axes_attr), jnp.ndim(inputs))
    return _Call("linear", "linen", inputs, kernel, bias, axes, module.dtype, module.precision)


def _nnx_linear_ok(module: Any) -> Optional[Any]:
    """The ``axis`` attribute of a supported nnx linear layer, else None."""
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis or module.dot_general_cls is not None or (
                module.dot_general not in (None, jax.lax.dot_general)):
            return None
        return module.axis
    if isinstance(module, nnx.Linear) and module.dot_general is jax.lax.dot_general:
        return -1
    return None


def _nnx_call(module: Any, args: tuple, kwargs: dict) -> Optional[_Call]:
    inputs = _only_input(args, kwargs, ("out_sharding",))
    if inputs is None or not isinstance(module, _NNX_CLASSES) or (
            module.promote_dtype is not nnx_dtypes.promote_dtype):
        return None
    if isinstance(module, nnx.Embed):
        if not _is_ints(inputs):
            return None
        table = module.embedding.get_value()
        return _Call("embed", "nnx", inputs, table, None, (), module.dtype, None)
    axes_attr = _nnx_linear_ok(module)
    if axes_attr is None or getattr(module, "preferred_element_type", None) is not None:
        return None
    kernel = module.kernel.get_value()
    bias = module.bias.get_value() if module.bias is not None else None
    axes = _normalize_axes(_as_tuple(axes_attr), jnp.ndim(inputs))
    return _Call("linear", "nnx", inputs, kernel, bias, axes, module.dtype, module.precision)


def _describe(framework: str, module: Any, args: tuple, kwargs: dict) -> Optional[_Call]:
    """The call as a :class:`_Call` if it is a supported layer, else None."""
    call = _linen_call(module, args, kwargs) if framework == "linen" else _nnx_call(
        module, args, kwargs)
    if call is None:
        return None
    if call.kind == "embed":
        return call if jnp.ndim(call.kernel) == 2 else None
    in_dims = tuple(jnp.shape(call.inputs)[a] for a in call.axes)
    if jnp.ndim(call.kernel) <= len(call.axes) or (
            tuple(jnp.shape(call.kernel)[: len(call.axes)]) != in_dims):
        return None
    return call


def _promote(call: _Call, *arrays: Any, inexact: bool = True) -> list:
    if call.framework == "linen":
        return linen_dtypes.promote_dtype(*arrays, dtype=call.dtype, inexact=inexact)
    return list(nnx_dtypes.promote_dtype(arrays, dtype=call.dtype, inexact=inexact))


def _layer_out(call: _Call, kernel: Any, bias: Any) -> jax.Array:
    """What the layer computes with the given parameters (flax's own arithmetic)."""
    if call.kind == "embed":
        (table,) = _promote(call, kernel, inexact=False)
        if table.shape[0] == 1:
            return jnp.broadcast_to(table, jnp.shape(call.inputs) + table.shape[1:])
        return jnp.take(table, call.inputs, axis=0)
    x, k, b = _promote(call, call.inputs, kernel, bias)
    contract = (call.axes, tuple(range(len(call.axes))))
    y = jax.lax.dot_general(x, k, (contract, ((), ())), precision=call.precision)
    if b is not None:
        y = y + jnp.reshape(b, (1,) * (y.ndim - b.ndim) + b.shape)
    return y


def _record(call: _Call, dtype: Any) -> jax.Array:
    """What the norms need from one example's call.

    Linear: the input as ``[rows, d_in]`` (contracted axes last, in order), in ``dtype``.
    Embedding: the row ids as ``[rows]``, negative ids wrapped as ``jnp.take`` does and
    out-of-range ids (whose gradient ``jnp.take`` drops) replaced by ``num_embeddings``.
    """
    if call.kind == "embed":
        size = jnp.shape(call.kernel)[0]
        ids = jnp.reshape(jnp.asarray(call.inputs), (-1,))
        if size == 1:
            return jnp.zeros(ids.shape, jnp.int32)
        ids = jnp.where(ids < 0, ids + size, ids)
        return jnp.where((ids >= 0) & (ids < size), ids, size).astype(jnp.int32)
    x = jnp.asarray(call.inputs).astype(dtype)
    n_in = len(call.axes)
    x = jnp.moveaxis(x, call.axes, tuple(range(x.ndim - n_in, x.ndim)))
    return jnp.reshape(x, (-1, int(np.prod(x.shape[x.ndim - n_in:]))))


# ------------------------------------------------------------------ interception


_Handler = Callable[[str, Any, Callable[..., Any], tuple, dict], Any]

_LOCAL = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]
_NNX_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Embed)


def _nnx_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        handlers = getattr(_LOCAL, "handlers", None)
        if not handlers:
            return original(self, *args, **kwargs)
        return handlers[-1]("nnx", self, functools.partial(original, self), args, kwargs)

    return __call__


@contextlib.contextmanager
def _nnx_patched() -> Iterator[None]:
    """Route ``__call__`` of the supported nnx classes through this thread's handler.

    The classes are patched while any thread is inside :func:`_intercept`; a thread
    without a handler goes straight to the original method.
    """
    with _PATCH_LOCK:
        if _PATCH_DEPTH[0] == 0:
            for cls in _NNX_CLASSES:
                cls.__call__ = _nnx_wrapper(cls.__dict__["__call__"])
        _PATCH_DEPTH[0] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH[0] -= 1
            if _PATCH_DEPTH[0] == 0:
                for cls in _NNX_CLASSES:
                    cls.__call__ = cls.__dict__["__call__"].__wrapped__


@contextlib.contextmanager
def _intercept(handler: _Handler) -> Iterator[None]:
    """Send every linen ``__call__`` and every call of a patched nnx class to ``handler``."""

    def linen_interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        return handler("linen", context.module, next_fun, args, kwargs)

    stack = getattr(_LOCAL, "handlers", None)
    if stack is None:
        stack = _LOCAL.handlers = []
    with _nnx_patched(), nn.intercept_methods(linen_interceptor):
        stack.append(handler)
        try:
            yield
        finally:
            stack.pop()


def _matcher(leaves: list, top: Any) -> Callable[[str, Any, tuple, dict], Any]:
    """``match(...) -> (call, kernel_index, bias_index)`` or None for a pass-through call.

    A call is matched when it is a supported layer called at the loss's own trace level
    (not inside a scan, checkpoint, nested jit, ...) and reads one of ``leaves`` (by
    identity: the very array the loss received).
    """
    ids = {id(x): i for i, x in enumerate(leaves)}

    def match(framework, module, args, kwargs):
        call = _describe(framework, module, args, kwargs)
        if call is None or current_trace() != top:
            return None
        k = ids.get(id(call.kernel))
        b = None if call.bias is None else ids.get(id(call.bias))
        if k is None and b is None:
            return None
        return call, k, b

    return match


# ------------------------------------------------------------------ the plan (trace time)


class _Site(NamedTuple):
    """One probed layer call: which ghost leaves it feeds and its per-example shapes."""

    kind: str  # "linear" or "embed"
    kernel: Optional[int]  # leaf index of a ghost kernel / table, else None
    bias: Optional[int]  # leaf index of a ghost bias, else None
    d_in: int  # kernel rows (embedding: num_embeddings)
    d_out: int  # kernel columns (embedding: features)
    rows: int  # rows per example (positions)
    out_shape: tuple[int, ...]
    dtype: Any  # the layer's computation (output) dtype
    precision: Any

    def role(self, leaf: int) -> tuple:
        if leaf == self.bias:
            return ("bias", self.d_out)
        return (self.kind, self.d_in, self.d_out)


class _Plan(NamedTuple):
    ghost: frozenset[int]  # leaf indices taking the ghost path
    sites: tuple[_Site, ...]  # probed calls in call order


def _site_of(call: _Call, out: jax.Array, kernel: Optional[int], bias: Optional[int]) -> _Site:
    n_in = 1 if call.kind == "embed" else len(call.axes)
    shape = jnp.shape(call.kernel)
    d_in, d_out = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
    rows = int(np.prod(out.shape)) // d_out
    return _Site(call.kind, kernel, bias, d_in, d_out, rows, tuple(out.shape), out.dtype,
                 call.precision)


def _used_inputs(jaxpr: Any) -> set[int]:
    """Positions of ``jaxpr``'s inputs that any equation or output reads."""
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in jaxpr.outvars}
    return {i for i, v in enumerate(jaxpr.invars) if id(v) in read}


def _trace_sites(loss_fn: Callable, treedef: Any, leaves: list, example: Any
                 ) -> tuple[list[_Site], set[int]]:
    """Trace one example with substituted parameters: the calls seen, the originals read."""
    sites: list[_Site] = []

    def check_fn(orig: list, sub: list, ex: Any) -> Any:
        match = _matcher(orig, current_trace())

        def handler(framework, module, next_fun, args, kwargs):
            found = match(framework, module, args, kwargs)
            if found is None:
                return next_fun(*args, **kwargs)
            call, k, b = found
            out = _layer_out(call, call.kernel if k is None else sub[k],
                             call.bias if b is None else sub[b])
            sites.append(_site_of(call, out, k, b))
            return out

        with _intercept(handler):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, list(orig)), ex)

    closed = jax.make_jaxpr(check_fn)(leaves, leaves, example)
    used = _used_inputs(closed.jaxpr)
    return sites, {i for i in range(len(leaves)) if i in used}


def _ghost_leaves(sites: list[_Site], orig_read: set[int], leaves: list) -> frozenset[int]:
    """Leaves read only by intercepted calls, always in one role with one shape."""
    roles: dict[int, set[tuple]] = {}
    rows: dict[int, int] = {}
    for s in sites:
        for leaf in (s.kernel, s.bias):
            if leaf is not None:
                roles.setdefault(leaf, set()).add(s.role(leaf))
                rows[leaf] = rows.get(leaf, 0) + s.rows
    ghost = set()
    for i, r in roles.items():
        if len(r) != 1 or i in orig_read or not jnp.issubdtype(leaves[i].dtype, jnp.inexact):
            continue
        (role,) = r
        if role[0] == "embed" and rows[i] ** 2 > _EMBED_GRAM_FACTOR * role[1]:
            continue
        ghost.add(i)
    return frozenset(ghost)


def _make_plan(loss_fn: Callable, params: Any, batch: Any) -> _Plan:
    leaves, treedef = jax.tree_util.tree_flatten(params)  # arrays, tracers or shapes
    example = jax.eval_shape(lambda b: jax.tree_util.tree_map(lambda x: x[0], b), batch)
    sites, orig_read = _trace_sites(loss_fn, treedef, leaves, example)
    ghost = _ghost_leaves(sites, orig_read, leaves)
    probed = []
    for s in sites:
        k = s.kernel if s.kernel in ghost else None
        b = s.bias if s.bias in ghost else None
        if k is not None or b is not None:
            probed.append(s._replace(kernel=k, bias=b))
    return _Plan(ghost, tuple(probed))


class GhostPlan(NamedTuple):
    """Which parameters :func:`ghost_clipped_grad` handles how.

    Attributes:
        ghost: Key paths (``jax.tree_util.keystr``) of the parameters whose per-example
            norms and clipped sum come from layer inputs and output gradients.
        fallback: Key paths of the parameters differentiated per example by
            ``jax.vmap(jax.grad(...))``.
        calls: Number of intercepted layer calls per example.
    """

    ghost: tuple[str, ...]
    fallback: tuple[str, ...]
    calls: int


def ghost_plan(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any) -> GhostPlan:
    """Report how :func:`ghost_clipped_grad` treats each parameter (traces shapes only).

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar``.
        params: The parameters (arrays or ``jax.ShapeDtypeStruct``).
        batch: A batch with a leading axis ``B`` (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        A :class:`GhostPlan`.
    """
    plan = _make_plan(loss_fn, params, batch)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return GhostPlan(
        ghost=tuple(p for i, p in enumerate(paths) if i in plan.ghost),
        fallback=tuple(p for i, p in enumerate(paths) if i not in plan.ghost),
        calls=len(plan.sites),
    )


# ------------------------------------------------------------------ the pass (run time)


def _sequence_error(detail: str) -> RuntimeError:
    return RuntimeError(
        f"ghost clipping: the model's layer calls differ between two traces of the same loss "
        f"({detail}); does the model depend on Python-level state? Use dp_jax.clipped_grad "
        f"for this model."
    )


def _per_example_fn(loss_fn: Callable, treedef: Any, plan: _Plan, rest_idx: list[int],
                    ghost_idx: list[int]) -> Callable:
    """``f(rest, probes, ghost, example) -> (loss, records)`` to vmap and differentiate."""
    n = len(rest_idx) + len(ghost_idx)
    sites = plan.sites

    def per_example(rest: list, probes: list, ghost: list, example: Any):
        leaves: list[Any] = [None] * n
        for i, x in zip(rest_idx, rest):
            leaves[i] = x
        for i, x in zip(ghost_idx, ghost):
            leaves[i] = x
        match = _matcher(leaves, current_trace())
        records: list[Any] = [None] * len(sites)
        count = [0]

        def handler(framework, module, next_fun, args, kwargs):
            found = match(framework, module, args, kwargs)
            if found is None:
                return next_fun(*args, **kwargs)
            call, k, b = found
            k = k if k in plan.ghost else None
            b = b if b in plan.ghost else None
            if k is None and b is None:
                return next_fun(*args, **kwargs)
            i = count[0]
            count[0] += 1
            out = next_fun(*args, **kwargs)
            if i >= len(sites) or (sites[i].kernel, sites[i].bias) != (k, b) or (
                    tuple(out.shape), out.dtype) != (sites[i].out_shape, sites[i].dtype):
                raise _sequence_error(f"unexpected call {i}")
            if k is not None:
                records[i] = _record(call, out.dtype)
            return out + probes[i]

        with _intercept(handler):
            loss = loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), example)
        if count[0] != len(sites):
            raise _sequence_error(f"{len(sites)} calls planned, {count[0]} traced")
        return loss, records

    return per_example


# ------------------------------------------------------------------ norms and sums


class _Part(NamedTuple):
    """One parameter's per-example squared norm and its clipped sum as a function."""

    sq: jax.Array
    total: Callable[[jax.Array, jax.Array], jax.Array]  # (factor, keep) -> clipped sum


def _use_direct(size: int, n: int, d_in: int, d_out: int) -> bool:
    """Whether forming ``A_i^T G_i`` per example beats the Gram form for one kernel.

    Both forms need ``B n d_in d_out`` multiply-adds for the (weighted) products. The
    Gram form adds ``B n^2 (d_in + d_out)`` for the norms; the direct form instead
    forms the per-example products, then only reduces them (``B d_in d_out``), but
    stores ``B d_in d_out`` numbers. It is chosen when the Gram term is the larger
    and that storage stays within :data:`_DIRECT_MAX_ELEMENTS`. Without a sequence
    axis (``n = 1``) the Gram form is ``|a_i|^2 |g_i|^2`` and always wins.
    """
    if n == 1:
        return False
    return n * n * (d_in + d_out) > d_in * d_out and size * d_in * d_out <= _DIRECT_MAX_ELEMENTS


def _gram_sq(a: jax.Array, g: jax.Array) -> jax.Array:
    """``||A_i^T G_i||_F^2`` per example for ``a [B, n, d_in]``, ``g [B, n, d_out]``."""
    if a.shape[1] == 1:
        return jnp.sum(jnp.square(a[:, 0]), -1) * jnp.sum(jnp.square(g[:, 0]), -1)
    aa = jnp.einsum("bnd,bmd->bnm", a, a, precision=_HIGHEST)
    gg = jnp.einsum("bnd,bmd->bnm", g, g, precision=_HIGHEST)
    return jnp.sum(aa * gg, axis=(1, 2))


def _kept(x: jax.Array, keep: jax.Array) -> jax.Array:
    """``x`` with the rows of dropped examples set to 0 (NaN-safe, unlike a product)."""
    return jnp.where(jnp.reshape(keep, (-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _weights(factor: jax.Array, keep: jax.Array, like: jax.Array) -> jax.Array:
    w = jnp.where(keep, factor, 0.0).astype(like.dtype)
    return jnp.reshape(w, (-1,) + (1,) * (like.ndim - 1))


def _kernel_part(a: jax.Array, g: jax.Array, shape: tuple, dtype: Any, precision: Any) -> _Part:
    if _use_direct(a.shape[0], a.shape[1], a.shape[2], g.shape[2]):
        per_example = jnp.einsum("bni,bno->bio", a, g, precision=precision)
        return _vmap_part(jnp.reshape(per_example, (a.shape[0],) + shape).astype(dtype))

    def total(factor: jax.Array, keep: jax.Array) -> jax.Array:
        out = jnp.einsum("bni,bno->io", _kept(a, keep), _kept(g, keep) * _weights(factor, keep, g),
                         precision=precision)
        return jnp.reshape(out, shape).astype(dtype)

    return _Part(_gram_sq(a, g).astype(_wide(dtype)), total)


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
    if first.bias == leaf_index:
        return _bias_part(g, shape, leaf.dtype, precision)
    recorded = jnp.concatenate([records[i] for i in chosen], axis=1)
    if first.kind == "embed":
        return _embed_part(recorded, g, shape, leaf.dtype)
    return _kernel_part(recorded.astype(dtype), g, shape, leaf.dtype, precision)


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


def _ghost_step(loss_fn: Callable, kind: str, params: Any, batch: Any, mask: jax.Array,
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
    :class:`~dp_jax.ClipAux`. But the parameters of flax linear and embedding layers are
    not differentiated per example: their per-example norms come from the layers' inputs
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

    def grad_fn(params: Any, batch: Any, mask: Any = None, *, max_grad_norm: Any = None):
        bound = default_bound if max_grad_norm is None else max_grad_norm
        m = _as_mask(mask, _tree.batch_size_of(batch))
        if kind == "flat":
            bound = _check_flat_bound(bound)
        else:
            bound = _tree.leaf_bounds(bound, params)
        return compiled(params, batch, m, bound)

    return grad_fn
