"""Ghost clipping, recurrent side: flax's ``RNN`` over a built-in cell, unrolled.

``flax.linen.RNN`` and ``flax.nnx.RNN`` run their cell in a scan, where the cell's
dense layers are called once per step with the same parameters and sit below the loss's
own trace (so the ghost path cannot see them). One example's gradient of such a kernel
is ``sum_t x_t^T g_t``: a dense layer over ``[T, d]`` rows. For a short sequence the
ghost pass therefore runs the cell step by step itself, the same cell calls in the same
order as the scan (so the same function of the parameters), and the dense layers
inside become ordinary ghost sites whose rows are the steps; the Gram or per-example
choice is then made over ``T`` rows (:func:`~dp_jax._ghost_plan.leaf_method`).

Unrolled: an ``RNN`` without ``seq_lengths`` and with its default lifting settings,
over a cell of one of :data:`LINEN_CELLS` / :data:`NNX_CELLS` (exact types: these
cells are deterministic and read their parameters only through ``Dense`` /
``nnx.Linear``, except linen's ``OptimizedLSTMCell``, which concatenates its eight
kernels and biases into two products: :func:`optimized_lstm` computes its step gate by
gate, the same sums of products, so that each kernel is a dense layer of its own), for at most :data:`MAX_STEPS` steps (the program grows with ``T``;
beyond that, the per-example cost of the Gram form grows as ``T^2`` and the scan's
vmapped gradient is as cheap). Anything else keeps the scan and falls back to vmap;
:func:`~dp_jax._ghost_plan.ghost_plan` says why in ``notes``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.recurrent import flip_sequences

MAX_STEPS = 64
LINEN_CELLS = (nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell, nn.SimpleCell, nn.MGUCell)
_GATES = "ifgo"
NNX_CELLS = (nnx.LSTMCell, nnx.GRUCell, nnx.SimpleCell, nnx.OptimizedLSTMCell)
_LINEN_KWARGS = {"initial_carry", "init_key", "seq_lengths", "return_carry", "time_major",
                 "reverse", "keep_order"}
_NNX_KWARGS = {"initial_carry", "seq_lengths", "return_carry", "time_major", "reverse",
               "keep_order", "rngs"}


def _settings(module: Any, kwargs: dict) -> dict:
    out = {k: kwargs.get(k) for k in ("return_carry", "time_major", "reverse", "keep_order")}
    return {k: getattr(module, k) if v is None else v for k, v in out.items()}


def _linen_default(module: Any) -> bool:
    return (type(module).__call__ is nn.RNN.__call__ and module.scope is not None
            and module.variable_broadcast == "params" and not module.variable_carry
            and not module.variable_axes and dict(module.split_rngs) == {"params": False})


def _nnx_default(module: Any) -> bool:
    return (isinstance(module, nnx.RNN) and module.broadcast_rngs is None
            and type(module.cell) in NNX_CELLS)


def is_rnn(framework: str, module: Any) -> bool:
    """Whether the call is an ``RNN`` call (unrolled or not)."""
    return isinstance(module, nn.RNN if framework == "linen" else nnx.RNN)


def unroll_problem(framework: str, module: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """Why this ``RNN`` call is not unrolled, or None if it is."""
    allowed = _LINEN_KWARGS if framework == "linen" else _NNX_KWARGS
    if len(args) != 1 or set(kwargs) - allowed or kwargs.get("seq_lengths") is not None:
        return "called with seq_lengths or arguments the ghost path does not mirror"
    default = _linen_default(module) if framework == "linen" else _nnx_default(module)
    cells = LINEN_CELLS if framework == "linen" else NNX_CELLS
    if not default or type(module.cell) not in cells:
        return (f"cell {type(module.cell).__name__} or lifting settings not unrolled "
                f"(cells: {', '.join(c.__name__ for c in cells)})")
    steps = jnp.shape(args[0])[_time_axis(module, args[0], _settings(module, kwargs))]
    if steps > MAX_STEPS:
        return f"{steps} steps > {MAX_STEPS}"
    return None


def _time_axis(module: Any, inputs: Any, settings: dict) -> int:
    if settings["time_major"]:
        return 0
    return jnp.ndim(inputs) - (module.cell.num_feature_axes + 1)


def _initial_carry(framework: str, module: Any, inputs: Any, axis: int, kwargs: dict) -> Any:
    if kwargs.get("initial_carry") is not None:
        return kwargs["initial_carry"]
    shape = inputs.shape[:axis] + inputs.shape[axis + 1:]
    if framework == "linen":
        key = kwargs.get("init_key")
        return module.cell.initialize_carry(jax.random.key(0) if key is None else key, shape)
    rngs = module.rngs if kwargs.get("rngs") is None else kwargs["rngs"]
    if isinstance(rngs, nnx.Rngs):
        rngs = rngs.carry.fork()
    return module.cell.initialize_carry(shape, rngs)


def unrolled(framework: str, module: Any, args: tuple, kwargs: dict) -> Any:
    """The ``RNN`` call computed step by step at the caller's trace level."""
    settings = _settings(module, kwargs)
    inputs = args[0]
    axis = _time_axis(module, inputs, settings)
    batch_dims = axis if not settings["time_major"] else inputs.ndim - 1 - (
        module.cell.num_feature_axes)

    def flip(x: Any) -> Any:
        return flip_sequences(x, None, num_batch_dims=batch_dims,
                              time_major=settings["time_major"])

    if settings["reverse"]:
        inputs = flip(inputs)
    carry = _initial_carry(framework, module, inputs, axis, kwargs)
    outputs = []
    for t in range(inputs.shape[axis]):
        carry, y = module.cell(carry, jax.lax.index_in_dim(inputs, t, axis, keepdims=False))
        outputs.append(y)
    out = jax.tree_util.tree_map(lambda *ys: jnp.stack(ys, axis=axis), *outputs)
    if settings["reverse"] and settings["keep_order"]:
        out = jax.tree_util.tree_map(flip, out)
    return (carry, out) if settings["return_carry"] else out



def optimized_lstm_params(module: Any, args: tuple, kwargs: dict) -> Optional[Any]:
    """The parameters of a linen ``OptimizedLSTMCell`` call :func:`optimized_lstm` can run."""
    if type(module) is not nn.OptimizedLSTMCell or module.scope is None or len(args) != 2 or (
            kwargs):
        return None
    params = module.variables.get("params", {})
    names = [f"{source}{gate}" for source in "ih" for gate in _GATES]
    if any(n not in params for n in names) or any("bias" not in params[f"h{g}"] for g in _GATES):
        return None
    return params


def optimized_lstm(module: Any, params: Any, carry: Any, inputs: Any, dense: Any) -> Any:
    """One step of linen's ``OptimizedLSTMCell``, one dense call per kernel.

    ``dense(x, kernel, bias)`` is the dense layer (flax's dtype promotion, then
    ``x @ kernel + bias``); the gates combine as the cell combines them.
    """
    c, h = carry
    pre = {g: dense(h, params[f"h{g}"]["kernel"], params[f"h{g}"]["bias"])
           + dense(inputs, params[f"i{g}"]["kernel"], None) for g in _GATES}
    i, f, o = (module.gate_fn(pre[g]) for g in "ifo")
    new_c = f * c + i * module.activation_fn(pre["g"])
    new_h = o * module.activation_fn(new_c)
    return (new_c, new_h), new_h
