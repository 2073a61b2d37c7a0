"""Ghost clipping, trace side: which parameters may take the ghost path, and the vmapped pass.

Guarantee:
    A parameter takes the ghost path only if a trace in which the intercepted
    calls read a substitute copy of their parameters never reads the original
    one (the jaxpr is inspected); anything else (tied weights, ``Embed.attend``,
    a regulariser on a kernel, calls inside ``jax.lax.scan``, ``jax.checkpoint``,
    a nested ``jax.jit`` or a flax lifted transformation other than a short
    ``RNN``, which is unrolled: :mod:`dp_jax._ghost_rnn`) is differentiated per
    example. :func:`ghost_plan` lists which parameters took which path, and why
    calls it saw were not intercepted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.core.tracers import current_trace

from dp_jax import _ghost_rnn as rnn
from dp_jax._ghost_layers import (_Call, _describe, _intercept, _layer_out, _matcher, _promote,
                                  _record)
from dp_jax._types import PyTree


# An embedding takes the ghost path when rows**2 <= this * num_embeddings.
_EMBED_GRAM_FACTOR = 64
# Largest per-example kernel-gradient tensor (elements, whole batch) the direct form stores.
_DIRECT_MAX_ELEMENTS = 2**27


class _Site(NamedTuple):
    """One probed layer call: which ghost leaves it feeds and its per-example shapes."""

    kind: str  # "linear", "conv", "embed" or "norm"
    kernel: Optional[int]  # leaf index of a ghost kernel / table / scale, else None
    bias: Optional[int]  # leaf index of a ghost bias, else None
    d_in: int  # kernel rows (embedding: num_embeddings; convolution: window x C / groups;
    # normalisation: features, as d_out)
    d_out: int  # kernel columns (embedding: features; convolution: all output channels)
    rows: int  # rows per example (positions)
    out_shape: tuple[int, ...]
    dtype: Any  # the layer's computation (output) dtype
    precision: Any
    groups: int = 1  # feature_group_count of a convolution

    def role(self, leaf: int) -> tuple:
        if leaf == self.bias:
            return ("bias", self.d_out)
        return (self.kind, self.d_in, self.d_out, self.groups)


class _Plan(NamedTuple):
    ghost: frozenset[int]  # leaf indices taking the ghost path
    sites: tuple[_Site, ...]  # probed calls in call order
    notes: tuple[str, ...] = ()  # calls seen but not intercepted, and why


def _site_of(call: _Call, out: jax.Array, kernel: Optional[int], bias: Optional[int]) -> _Site:
    if call.kind == "norm":
        d = int(np.prod([jnp.shape(call.inputs)[a] for a in call.axes]))
        return _Site("norm", kernel, bias, d, d, int(np.prod(out.shape)) // d, tuple(out.shape),
                     out.dtype, None)
    n_in = 1 if call.kind == "embed" else len(call.axes)
    shape = jnp.shape(call.kernel)
    d_in, d_out = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
    if call.kind == "conv":
        d_in, d_out = int(np.prod(shape[:-1])), int(shape[-1])
    rows = int(np.prod(out.shape)) // d_out
    groups = call.geom.groups if call.kind == "conv" else 1
    return _Site(call.kind, kernel, bias, d_in, d_out, rows, tuple(out.shape), out.dtype,
                 call.precision, groups)


def _used_inputs(jaxpr: Any) -> set[int]:
    """Positions of ``jaxpr``'s inputs that any equation or output reads."""
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in jaxpr.outvars}
    return {i for i, v in enumerate(jaxpr.invars) if id(v) in read}


# emit(call, kernel_leaf, bias_leaf, compute, original) -> the call's output, where
# compute(kernel, bias) is the call's arithmetic and original() (or None) flax's own call.
_Emit = Callable[[_Call, Optional[int], Optional[int], Callable[[Any, Any], Any],
                  Optional[Callable[[], Any]]], Any]


def _where(framework: str, module: Any) -> str:
    scope = getattr(module, "scope", None) if framework == "linen" else None
    path = "/".join(scope.path) if scope is not None and scope.path else ""
    return f"{type(module).__name__}" + (f" at {path!r}" if path else "")


def _lora_apply(call: _Call, ka: Optional[int], kb: Optional[int], emit: _Emit) -> Any:
    """``x @ lora_a @ lora_b`` (+ the base module) as two linear calls, as nnx.LoRA computes it."""
    x, _, _ = _promote(call, call.inputs, call.kernel, call.bias)
    first = _Call("linear", "nnx", x, call.kernel, None, (x.ndim - 1,), call.dtype, None)
    h = emit(first, ka, None, lambda a, _: x @ jnp.asarray(a, x.dtype), None)
    second = _Call("linear", "nnx", h, call.bias, None, (h.ndim - 1,), call.dtype, None)
    out = emit(second, kb, None, lambda b, _: h @ jnp.asarray(b, h.dtype), None)
    if call.module.base_module is not None:
        out = out + call.module.base_module(x)
    return out


class _Dispatch:
    """The interception handler shared by the check trace and the vmapped pass.

    It unrolls short RNNs, runs linen ``OptimizedLSTMCell`` steps and ``nnx.LoRA``
    calls as dense calls, hands every supported layer call to ``emit`` and lets
    anything else run untouched, noting (``notes``) supported calls it had to leave
    to vmap.
    """

    def __init__(self, leaves: list, emit: _Emit, top: Any,
                 notes: Optional[list[str]] = None) -> None:
        self._match = _matcher(leaves, top)
        self._ids = {id(x): i for i, x in enumerate(leaves)}
        self._emit, self._top, self._notes = emit, top, notes
        self._quiet = 0  # inside an RNN left to its scan: its note covers its cell's layers

    def _note(self, text: str) -> None:
        if self._notes is not None and text not in self._notes and not self._quiet:
            self._notes.append(text)

    def _dense(self, dtype: Any, x: Any, kernel: Any, bias: Any) -> Any:
        call = _Call("linear", "linen", x, kernel, bias, (jnp.ndim(x) - 1,), dtype, None)
        k, b = self._ids.get(id(kernel)), None if bias is None else self._ids.get(id(bias))
        return self._emit(call, k, b, lambda kk, bb: _layer_out(call, kk, bb), None)

    def _rnn(self, framework: str, module: Any, next_fun: Callable, args: tuple,
             kwargs: dict) -> Any:
        problem = rnn.unroll_problem(framework, module, args, kwargs)
        if problem is None:
            return rnn.unrolled(framework, module, args, kwargs)
        self._note(f"{_where(framework, module)}: not unrolled ({problem}); its cell's "
                   f"parameters are differentiated per example (vmap)")
        self._quiet += 1
        try:
            return next_fun(*args, **kwargs)
        finally:
            self._quiet -= 1

    def __call__(self, framework: str, module: Any, next_fun: Callable, args: tuple,
                 kwargs: dict) -> Any:
        nested = current_trace() != self._top
        cell = None if nested else rnn.optimized_lstm_params(module, args, kwargs)
        if cell is not None:
            return rnn.optimized_lstm(module, cell, *args,
                                      functools.partial(self._dense, module.dtype))
        if rnn.is_rnn(framework, module) and not nested:
            return self._rnn(framework, module, next_fun, args, kwargs)
        found = self._match(framework, module, args, kwargs)
        if found is None:
            if nested and _describe(framework, module, args, kwargs) is not None:
                self._note(f"{_where(framework, module)}: called inside a scan, checkpoint, "
                           f"nested jit or lifted transformation; its parameters are "
                           f"differentiated per example (vmap)")
            return next_fun(*args, **kwargs)
        call, k, b = found
        if call.kind == "lora":
            return _lora_apply(call, k, b, self._emit)
        return self._emit(call, k, b, lambda kk, bb: _layer_out(call, kk, bb),
                          lambda: next_fun(*args, **kwargs))


def _trace_sites(loss_fn: Callable, treedef: Any, leaves: list, example: PyTree
                 ) -> tuple[list[_Site], set[int], list[str]]:
    """Trace one example with substituted parameters: the calls seen, the originals read."""
    sites: list[_Site] = []
    notes: list[str] = []

    def check_fn(orig: list, sub: list, ex: Any) -> Any:
        def emit(call, k, b, compute, original):
            out = compute(call.kernel if k is None else sub[k], call.bias if b is None else sub[b])
            sites.append(_site_of(call, out, k, b))
            return out

        top = current_trace()
        with _intercept(_Dispatch(orig, emit, top, notes)):
            return loss_fn(jax.tree_util.tree_unflatten(treedef, list(orig)), ex)

    closed = jax.make_jaxpr(check_fn)(leaves, leaves, example)
    used = _used_inputs(closed.jaxpr)
    return sites, {i for i in range(len(leaves)) if i in used}, notes


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


def _make_plan(loss_fn: Callable, params: PyTree, batch: PyTree) -> _Plan:
    leaves, treedef = jax.tree_util.tree_flatten(params)  # arrays, tracers or shapes
    example = jax.eval_shape(lambda b: jax.tree_util.tree_map(lambda x: x[0], b), batch)
    sites, orig_read, notes = _trace_sites(loss_fn, treedef, leaves, example)
    ghost = _ghost_leaves(sites, orig_read, leaves)
    probed = []
    for s in sites:
        k = s.kernel if s.kernel in ghost else None
        b = s.bias if s.bias in ghost else None
        if k is not None or b is not None:
            probed.append(s._replace(kernel=k, bias=b))
    return _Plan(ghost, tuple(probed), tuple(notes))


def _use_direct(size: int, n: int, d_in: int, d_out: int, groups: int = 1) -> bool:
    """Whether forming ``A_i^T G_i`` per example beats the Gram form for one kernel.

    Per group (``groups`` of a grouped convolution, else 1) both forms need
    ``B n d_in d_out`` multiply-adds for the (weighted) products. The Gram form adds
    ``B n^2 (d_in + d_out)`` for the norms; the direct form instead forms the
    per-example products, then only reduces them (``B d_in d_out``), but stores
    ``B groups d_in d_out`` numbers. It is chosen when the Gram term is the larger and
    that storage stays within :data:`_DIRECT_MAX_ELEMENTS` (the rule of mixed ghost
    clipping). Without a sequence axis (``n = 1``) the Gram form is
    ``|a_i|^2 |g_i|^2`` and always wins.
    """
    if n == 1:
        return False
    return n * n * (d_in + d_out) > d_in * d_out and (
        size * groups * d_in * d_out <= _DIRECT_MAX_ELEMENTS)


def leaf_method(leaf_index: int, plan: _Plan, size: int) -> str:
    """How a ghost leaf's norm is computed: ``"gram"`` or ``"per_example"`` (see the module)."""
    sites = [s for s in plan.sites if s.kernel == leaf_index]
    if not sites:
        return "per_example"  # a bias: the per-example sums of its output gradients
    first = sites[0]
    if first.kind == "embed":
        return "gram"
    if first.kind == "norm":
        return "per_example"  # a scale: the per-example sums of xhat * g
    n = sum(s.rows for s in sites)
    d_in, d_out = first.d_in, first.d_out // first.groups
    return "per_example" if _use_direct(size, n, d_in, d_out, first.groups) else "gram"


class GhostPlan(NamedTuple):
    """Which parameters :func:`ghost_clipped_grad` handles how.

    Attributes:
        ghost: Key paths (``jax.tree_util.keystr``) of the parameters whose per-example
            norms and clipped sum come from layer inputs and output gradients.
        fallback: Key paths of the parameters differentiated per example by
            ``jax.vmap(jax.grad(...))``.
        calls: Number of intercepted layer calls per example.
        methods: For every parameter, how its per-example norm is computed:
            ``"gram"`` (ghost: from the Gram matrices of the layer's inputs and output
            gradients, never forming a per-example gradient), ``"per_example"`` (ghost:
            the per-example gradient formed from inputs and output gradients, when that
            is cheaper, e.g. a convolution over many positions, or a bias or a
            normalisation layer's scale) or ``"vmap"`` (fallback).
        notes: Layer calls the ghost path saw but did not intercept, and why (a layer
            inside a scan or another transformation, an ``RNN`` too long or of an
            unsupported cell to unroll); their parameters are among ``fallback``.
    """

    ghost: tuple[str, ...]
    fallback: tuple[str, ...]
    calls: int
    methods: Mapping[str, str] = MappingProxyType({})
    notes: tuple[str, ...] = ()


def ghost_plan(loss_fn: Callable[[Any, Any], jax.Array], params: PyTree, batch: PyTree) -> GhostPlan:
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
    size = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
    methods = {p: leaf_method(i, plan, size) if i in plan.ghost else "vmap"
               for i, p in enumerate(paths)}
    return GhostPlan(
        ghost=tuple(p for i, p in enumerate(paths) if i in plan.ghost),
        fallback=tuple(p for i, p in enumerate(paths) if i not in plan.ghost),
        calls=len(plan.sites),
        methods=MappingProxyType(methods),
        notes=plan.notes,
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

    def per_example(rest: list, probes: list, ghost: list, example: PyTree):
        leaves: list[Any] = [None] * n
        for i, x in zip(rest_idx, rest):
            leaves[i] = x
        for i, x in zip(ghost_idx, ghost):
            leaves[i] = x
        records: list[Any] = [None] * len(sites)
        count = [0]

        def emit(call, k, b, compute, original):
            k = k if k in plan.ghost else None
            b = b if b in plan.ghost else None
            out = original() if original is not None else compute(call.kernel, call.bias)
            if k is None and b is None:
                return out
            i = count[0]
            count[0] += 1
            if i >= len(sites) or (sites[i].kernel, sites[i].bias) != (k, b) or (
                    tuple(out.shape), out.dtype) != (sites[i].out_shape, sites[i].dtype):
                raise _sequence_error(f"unexpected call {i}")
            if k is not None:
                records[i] = _record(call, out.dtype)
            return out + probes[i]

        top = current_trace()
        with _intercept(_Dispatch(leaves, emit, top)):
            loss = loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), example)
        if count[0] != len(sites):
            raise _sequence_error(f"{len(sites)} calls planned, {count[0]} traced")
        return loss, records

    return per_example
