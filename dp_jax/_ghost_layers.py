"""Ghost clipping, layer side: recognise and intercept flax's linear and embedding calls.

Supported layers: ``flax.linen.Dense``, ``DenseGeneral`` (no ``batch_dims``), ``Conv``
(no ``mask``) and ``Embed`` (``__call__``, not ``attend``); ``flax.nnx.Linear``,
``LinearGeneral`` (no ``batch_axis``), ``Conv`` (no ``mask``) and ``Embed``; each with
flax's default ``dot_general`` / ``conv_general_dilated`` and ``promote_dtype`` (for nnx,
no ``preferred_element_type`` or ``out_sharding``) and not subclassed with a new
``__call__`` (linen). Also the normalisation layers of :mod:`dp_jax._ghost_normlayers`
and ``flax.nnx.LoRA`` (``x @ lora_a @ lora_b``: two linear maps, the second on
``x @ lora_a``; ``nnx.LoRALinear`` calls one). Any other call runs untouched.
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

from dp_jax import _ghost_normlayers as norms
from dp_jax._ghost_conv import ConvGeometry, conv_apply, conv_geometry, conv_patches


_HIGHEST = jax.lax.Precision.HIGHEST


class _Call(NamedTuple):
    """One call of a supported layer, with what the layer itself reads."""

    kind: str  # "linear", "conv", "embed", "norm" or "lora"
    framework: str  # "linen" or "nnx": which promote_dtype signature applies
    inputs: Any
    kernel: Any  # the kernel, or the embedding table
    bias: Any  # None without a bias (always None for embeddings); LoRA: lora_b
    axes: tuple[int, ...]  # contracted input axes (linear); feature axes (norm)
    dtype: Any  # the layer's ``dtype`` attribute (None: inferred)
    precision: Any
    geom: Optional[ConvGeometry] = None  # convolutions only
    module: Any = None  # normalisation layers and LoRA: the module itself


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


_LINEN_CALLS = (nn.Dense.__call__, nn.DenseGeneral.__call__, nn.Embed.__call__,
                nn.Conv.__call__)


def _conv_call(framework: str, module: Any, inputs: Any, kernel: Any, bias: Any
               ) -> Optional[_Call]:
    geom = conv_geometry(module)
    if geom is None or not jnp.issubdtype(jnp.result_type(inputs), jnp.inexact):
        return None
    rank = len(geom.kernel_size)
    if jnp.ndim(inputs) < rank + 1 or jnp.ndim(kernel) != rank + 2:
        return None
    if jnp.shape(inputs)[-1] != jnp.shape(kernel)[-2] * geom.groups:
        return None
    return _Call("conv", framework, inputs, kernel, bias, (), module.dtype, module.precision,
                 geom)


def _norm_call(framework: str, module: Any, args: tuple, kwargs: dict, scale: Any, bias: Any
               ) -> Optional[_Call]:
    inputs = _only_input(args, {}, ()) if norms.norm_supported(module, kwargs) else None
    if inputs is None or not jnp.issubdtype(jnp.result_type(inputs), jnp.inexact):
        return None
    axes = norms.feature_axes(module, jnp.ndim(inputs))
    features = None if axes is None else tuple(jnp.shape(inputs)[a] for a in axes)
    if features is None or any(p is not None and int(np.prod(jnp.shape(p))) != int(
            np.prod(features)) for p in (scale, bias)):
        return None
    return _Call("norm", framework, inputs, scale, bias, axes, module.dtype, None,
                 module=module)


def _linen_call(module: Any, args: tuple, kwargs: dict) -> Optional[_Call]:
    method = type(module).__call__
    if any(method is known for known in norms.LINEN_NORM_CALLS):
        if module.scope is None:
            return None
        params = module.variables.get("params", {})
        wanted = [n for n, used in (("scale", module.use_scale),
                                    ("bias", getattr(module, "use_bias", False))) if used]
        if any(n not in params for n in wanted):
            return None
        return _norm_call("linen", module, args, kwargs, params.get("scale") if "scale" in wanted
                          else None, params.get("bias") if "bias" in wanted else None)
    if not any(method is known for known in _LINEN_CALLS):
        return None
    inputs = _only_input(args, kwargs, ())
    if inputs is None or module.scope is None or (
            module.promote_dtype is not linen_dtypes.promote_dtype):
        return None
    params = module.variables.get("params", {})
    if method is nn.Conv.__call__:
        if not isinstance(module, nn.Conv) or module.conv_general_dilated is not None or (
                module.conv_general_dilated_cls is not None):
            return None
        kernel = params.get("kernel")
        bias = params.get("bias") if module.use_bias else None
        if kernel is None or (module.use_bias and bias is None):
            return None
        return _conv_call("linen", module, inputs, kernel, bias)
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


def _value(variable: Any) -> Any:
    return None if variable is None else variable.get_value()


def _nnx_lora(module: Any, args: tuple, kwargs: dict) -> Optional[_Call]:
    inputs = _only_input(args, kwargs, ())
    if inputs is None or module.promote_dtype is not nnx_dtypes.promote_dtype or (
            jnp.ndim(inputs) < 1 or not jnp.issubdtype(jnp.result_type(inputs), jnp.inexact)):
        return None
    a, b = _value(module.lora_a), _value(module.lora_b)
    if jnp.ndim(a) != 2 or jnp.ndim(b) != 2 or jnp.shape(a)[1] != jnp.shape(b)[0] or (
            jnp.shape(inputs)[-1] != jnp.shape(a)[0]):
        return None
    return _Call("lora", "nnx", inputs, a, b, (), module.dtype, None, module=module)


def _nnx_call(module: Any, args: tuple, kwargs: dict) -> Optional[_Call]:
    if isinstance(module, norms.NNX_NORM_CLASSES):
        return _norm_call("nnx", module, args, kwargs, _value(module.scale),
                          _value(getattr(module, "bias", None)))
    if isinstance(module, nnx.LoRA):
        return _nnx_lora(module, args, kwargs)
    inputs = _only_input(args, kwargs, ("out_sharding",))
    if inputs is None or not isinstance(module, _NNX_CLASSES) or (
            module.promote_dtype is not nnx_dtypes.promote_dtype):
        return None
    if isinstance(module, nnx.Embed):
        if not _is_ints(inputs):
            return None
        table = module.embedding.get_value()
        return _Call("embed", "nnx", inputs, table, None, (), module.dtype, None)
    if isinstance(module, nnx.Conv):
        if module.conv_general_dilated is not jax.lax.conv_general_dilated or (
                module.preferred_element_type is not None):
            return None
        bias = module.bias.get_value() if module.bias is not None else None
        return _conv_call("nnx", module, inputs, module.kernel.get_value(), bias)
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
    if call is None or call.kind in ("norm", "lora"):
        return call
    if call.kind == "embed":
        return call if jnp.ndim(call.kernel) == 2 else None
    if call.kind == "conv":
        return call
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
    if call.kind == "norm":
        return norms.norm_out(call.module, call.inputs, kernel, bias, call.axes)
    if call.kind == "embed":
        (table,) = _promote(call, kernel, inexact=False)
        if table.shape[0] == 1:
            return jnp.broadcast_to(table, jnp.shape(call.inputs) + table.shape[1:])
        return jnp.take(table, call.inputs, axis=0)
    x, k, b = _promote(call, call.inputs, kernel, bias)
    if call.kind == "conv":
        return conv_apply(call.geom, x, k, b, call.precision)
    contract = (call.axes, tuple(range(len(call.axes))))
    y = jax.lax.dot_general(x, k, (contract, ((), ())), precision=call.precision)
    if b is not None:
        y = y + jnp.reshape(b, (1,) * (y.ndim - b.ndim) + b.shape)
    return y


def _record(call: _Call, dtype: Any) -> jax.Array:
    """What the norms need from one example's call.

    Linear: the input as ``[rows, d_in]`` (contracted axes last, in order), in ``dtype``.
    Convolution: the input patches as ``[positions, C * window]``, in ``dtype``.
    Embedding: the row ids as ``[rows]``, negative ids wrapped as ``jnp.take`` does and
    out-of-range ids (whose gradient ``jnp.take`` drops) replaced by ``num_embeddings``.
    Normalisation: the normalised input as ``[rows, features]``, in its own dtype
    (float32 or wider for a 16-bit layer: flax's statistics are).
    """
    if call.kind == "norm":
        return norms.norm_record(call.module, call.inputs, call.kernel, call.bias, call.axes)
    if call.kind == "embed":
        size = jnp.shape(call.kernel)[0]
        ids = jnp.reshape(jnp.asarray(call.inputs), (-1,))
        if size == 1:
            return jnp.zeros(ids.shape, jnp.int32)
        ids = jnp.where(ids < 0, ids + size, ids)
        return jnp.where((ids >= 0) & (ids < size), ids, size).astype(jnp.int32)
    x = jnp.asarray(call.inputs).astype(dtype)
    if call.kind == "conv":
        return conv_patches(call.geom, x)
    n_in = len(call.axes)
    x = jnp.moveaxis(x, call.axes, tuple(range(x.ndim - n_in, x.ndim)))
    return jnp.reshape(x, (-1, int(np.prod(x.shape[x.ndim - n_in:]))))


# ------------------------------------------------------------------ interception


_Handler = Callable[[str, Any, Callable[..., Any], tuple, dict], Any]

_LOCAL = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]
_NNX_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Embed, nnx.Conv, nnx.LoRA, nnx.RNN,
                *norms.NNX_NORM_CLASSES)


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
