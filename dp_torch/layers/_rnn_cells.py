"""Fused gate math of the DP recurrent cells: one autograd node per time step.

The DP recurrent layers apply their recurrent projection ``hh`` as a module call at every time
step (a per-sample-gradient engine hooks it) and then combine the projected input and the
projected state into the new state. Written as plain tensor ops, that combination records about
a dozen autograd nodes per step, and the autograd engine's per-node cost then rivals the
arithmetic. Each function here computes the same formulas as ``torch.nn``'s cells, in a
``torch.autograd.Function`` with a hand-written backward pass:

* :func:`lstm_gates`: ``(i, f, g, o) = ih(x) + hh(h)``, ``c' = σ(f) c + σ(i) tanh(g)``,
  ``h' = σ(o) tanh(c')`` (``h'`` before any projection);
* :func:`gru_gates`: ``r = σ(x_r + h_r)``, ``z = σ(x_z + h_z)``, ``n = tanh(x_n + r h_n)``,
  ``h' = (1 - z) n + z h``;
* :func:`elman_gates`: ``h' = tanh(ih(x) + hh(h))`` or ``relu(...)``.

The first derivatives come from activations saved by the forward pass. Under ``create_graph``
(double backward), the backward pass recomputes those activations from the saved inputs with
differentiable ops, so second derivatives are exact too. The functions work under
``torch.func`` transforms (their batching rule is generated).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["lstm_gates", "gru_gates", "elman_gates"]

_sigmoid_backward = torch.ops.aten.sigmoid_backward
_tanh_backward = torch.ops.aten.tanh_backward


def _or_zeros(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _recompute(ctx: Any, forward: Any) -> tuple[Tensor, ...]:
    """The saved inputs and outputs; under ``create_graph`` the outputs are recomputed from the
    inputs with differentiable ops, so that the backward pass is differentiable too."""
    saved = ctx.saved_tensors
    inputs, outputs = saved[: ctx.num_inputs], saved[ctx.num_inputs :]
    if torch.is_grad_enabled():
        outputs = forward(*inputs)
    return (*inputs, *outputs)


class _GateFunction(torch.autograd.Function):
    """Shared plumbing: ``forward`` returns the new state and then the activations its backward
    pass needs (non-differentiable outputs); inputs and outputs are saved for the backward."""

    generate_vmap_rule = True
    #: How many leading outputs are the (differentiable) new state.
    num_state_outputs = 1

    @classmethod
    def setup_context(cls, ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.set_materialize_grads(False)
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(*output[cls.num_state_outputs :])
        ctx.save_for_backward(*inputs, *output)


def _lstm_forward(gates_x: Tensor, gates_h: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    hidden = c.shape[-1]
    pre = gates_x + gates_h
    act = pre.sigmoid()  # σ(i), σ(f), -, σ(o); the g quarter is tanh(g), taken separately
    tanh_g = pre[..., 2 * hidden : 3 * hidden].tanh()
    c_new = act[..., hidden : 2 * hidden] * c + act[..., :hidden] * tanh_g
    tanh_c = c_new.tanh()
    h_new = act[..., 3 * hidden :] * tanh_c
    return h_new, c_new, act, tanh_g, tanh_c


class _LSTMGates(_GateFunction):
    num_state_outputs = 2

    @staticmethod
    def forward(gates_x: Tensor, gates_h: Tensor, c: Tensor) -> tuple[Tensor, ...]:
        return _lstm_forward(gates_x, gates_h, c)

    @staticmethod
    def backward(ctx: Any, grad_h: Optional[Tensor], grad_c: Optional[Tensor], *_: Any):
        _, _, c, _, _, act, tanh_g, tanh_c = _recompute(ctx, _lstm_forward)
        hidden = c.shape[-1]
        sig_i, sig_f, sig_o = act[..., :hidden], act[..., hidden : 2 * hidden], act[..., 3 * hidden :]
        grad_h = _or_zeros(grad_h, tanh_c)
        grad_c_total = _tanh_backward(grad_h * sig_o, tanh_c)
        if grad_c is not None:
            grad_c_total = grad_c_total + grad_c
        grad_pre = torch.cat(
            [
                _sigmoid_backward(grad_c_total * tanh_g, sig_i),
                _sigmoid_backward(grad_c_total * c, sig_f),
                _tanh_backward(grad_c_total * sig_i, tanh_g),
                _sigmoid_backward(grad_h * tanh_c, sig_o),
            ],
            dim=-1,
        )
        return grad_pre, grad_pre, grad_c_total * sig_f


def _gru_forward(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    hidden = h.shape[-1]
    rz = (gates_x[..., : 2 * hidden] + gates_h[..., : 2 * hidden]).sigmoid()
    r, z = rz[..., :hidden], rz[..., hidden:]
    n = (gates_x[..., 2 * hidden :] + r * gates_h[..., 2 * hidden :]).tanh()
    h_new = (1 - z) * n + z * h
    return h_new, rz, n


class _GRUGates(_GateFunction):
    @staticmethod
    def forward(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> tuple[Tensor, ...]:
        return _gru_forward(gates_x, gates_h, h)

    @staticmethod
    def backward(ctx: Any, grad_h: Optional[Tensor], *_: Any):
        _, gates_h, h, _, rz, n = _recompute(ctx, _gru_forward)
        if grad_h is None:
            return None, None, None
        hidden = h.shape[-1]
        r, z = rz[..., :hidden], rz[..., hidden:]
        grad_n_pre = _tanh_backward(grad_h * (1 - z), n)
        grad_rz = _sigmoid_backward(
            torch.cat([grad_n_pre * gates_h[..., 2 * hidden :], grad_h * (h - n)], dim=-1), rz
        )
        grad_x = torch.cat([grad_rz, grad_n_pre], dim=-1)
        grad_gh = torch.cat([grad_rz, grad_n_pre * r], dim=-1)
        return grad_x, grad_gh, grad_h * z


def _tanh_forward(gates_x: Tensor, gates_h: Tensor) -> tuple[Tensor]:
    return ((gates_x + gates_h).tanh(),)


def _relu_forward(gates_x: Tensor, gates_h: Tensor) -> tuple[Tensor]:
    return ((gates_x + gates_h).relu(),)


class _TanhGates(_GateFunction):
    @staticmethod
    def forward(gates_x: Tensor, gates_h: Tensor) -> tuple[Tensor]:
        return _tanh_forward(gates_x, gates_h)

    @staticmethod
    def backward(ctx: Any, grad_h: Optional[Tensor], *_: Any):
        _, _, h_new = _recompute(ctx, _tanh_forward)
        grad = None if grad_h is None else _tanh_backward(grad_h, h_new)
        return grad, grad


class _ReluGates(_GateFunction):
    @staticmethod
    def forward(gates_x: Tensor, gates_h: Tensor) -> tuple[Tensor]:
        return _relu_forward(gates_x, gates_h)

    @staticmethod
    def backward(ctx: Any, grad_h: Optional[Tensor], *_: Any):
        _, _, h_new = _recompute(ctx, _relu_forward)
        grad = None if grad_h is None else grad_h * (h_new > 0)
        return grad, grad


def lstm_gates(gates_x: Tensor, gates_h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step's gate math, one autograd node.

    Args:
        gates_x: ``ih(x_t)``, ``[B, 4H]``, gates in torch.nn's order ``i, f, g, o``.
        gates_h: ``hh(h_{t-1})``, ``[B, 4H]``.
        c: The cell state ``c_{t-1}``, ``[B, H]``.

    Returns:
        ``(h', c')``: ``c' = σ(f) c + σ(i) tanh(g)`` and ``h' = σ(o) tanh(c')`` (before any
        projection), each ``[B, H]``.
    """
    h_new, c_new, *_ = _LSTMGates.apply(gates_x, gates_h, c)
    return h_new, c_new


def gru_gates(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> Tensor:
    """One GRU step's gate math, one autograd node.

    Args:
        gates_x: ``ih(x_t)``, ``[B, 3H]``, gates in torch.nn's order ``r, z, n``.
        gates_h: ``hh(h_{t-1})``, ``[B, 3H]``.
        h: The state ``h_{t-1}``, ``[B, H]``.

    Returns:
        ``h' = (1 - z) n + z h`` with ``r = σ(x_r + h_r)``, ``z = σ(x_z + h_z)`` and
        ``n = tanh(x_n + r h_n)``, ``[B, H]``.
    """
    return _GRUGates.apply(gates_x, gates_h, h)[0]


def elman_gates(gates_x: Tensor, gates_h: Tensor, nonlinearity: str) -> Tensor:
    """One Elman step's activation, one autograd node.

    Args:
        gates_x: ``ih(x_t)``, ``[B, H]``.
        gates_h: ``hh(h_{t-1})``, ``[B, H]``.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Returns:
        ``act(gates_x + gates_h)``, ``[B, H]``.
    """
    function = _TanhGates if nonlinearity == "tanh" else _ReluGates
    return function.apply(gates_x, gates_h)[0]
