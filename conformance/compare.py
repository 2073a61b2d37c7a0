"""``compare``: per-example-gradient parity for a user's own torch / flax pair.

Example:
    >>> report = conformance.compare(torch_model, FlaxNet(), convert, (x, y), "cross_entropy",
    ...                              to_flax_input=lambda x: x.transpose(0, 2, 3, 1))
    >>> print(report)            # names the first parameter that disagrees
    >>> assert report.passed
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import numpy as np
import torch

import dp_jax
from dp_torch.grad_sample import GradSampleModule

from conformance import tolerances
from conformance._checks import jax_precision
from conformance._report import leaf_errors

__all__ = ["CompareReport", "LeafReport", "compare"]

_TORCH_LOSSES: dict[str, Callable] = {
    "cross_entropy": lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"),
    "mse": lambda out, y: ((out - y) ** 2).reshape(out.shape[0], -1).sum(dim=1),
}
_JAX_LOSSES: dict[str, Callable] = {
    "cross_entropy": lambda out, y: -jax.nn.log_softmax(out)[y],
    "mse": lambda out, y: ((out - y) ** 2).sum(),
}

LossSpec = Union[str, tuple[Callable, Callable]]


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """Errors of one flax parameter leaf (over all examples).

    Attributes:
        path: The leaf's path in the flax variables (``"params/fc/kernel"``).
        max_abs: Largest absolute difference.
        max_rel: ``max_abs / max|torch value|`` (with the cancellation floor).
        passed: ``max_rel <= rtol``.
    """

    path: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class CompareReport:
    """What :func:`compare` found.

    Attributes:
        leaves: One :class:`LeafReport` per flax parameter, in flax leaf order.
        rtol: The tolerance used.
        dtype: The model dtype.
    """

    leaves: tuple[LeafReport, ...]
    rtol: float
    dtype: str

    @property
    def passed(self) -> bool:
        """Whether every parameter's per-example gradients agree."""
        return all(leaf.passed for leaf in self.leaves)

    @property
    def first_mismatch(self) -> str | None:
        """Path of the first parameter that disagrees (``None`` if all agree)."""
        return next((leaf.path for leaf in self.leaves if not leaf.passed), None)

    def __str__(self) -> str:
        lines = [f"per-example gradient parity ({self.dtype}, rtol {self.rtol:.0e}):"]
        for leaf in self.leaves:
            mark = "ok" if leaf.passed else "MISMATCH"
            lines.append(f"  {leaf.path}: max abs {leaf.max_abs:.2e}, "
                         f"max rel {leaf.max_rel:.2e}  {mark}")
        lines.append("all parameters agree" if self.passed
                     else f"first parameter that disagrees: {self.first_mismatch}")
        return "\n".join(lines)


def _losses(loss_fn: LossSpec) -> tuple[Callable, Callable]:
    if isinstance(loss_fn, str):
        if loss_fn not in _TORCH_LOSSES:
            raise ValueError(f"loss_fn must be one of {sorted(_TORCH_LOSSES)} or a pair "
                             f"(torch_loss, jax_loss), got {loss_fn!r}.")
        return _TORCH_LOSSES[loss_fn], _JAX_LOSSES[loss_fn]
    if (isinstance(loss_fn, tuple) and len(loss_fn) == 2
            and all(callable(f) for f in loss_fn)):
        return loss_fn
    raise TypeError(
        "loss_fn must be a name ('cross_entropy', 'mse') or a pair (torch_loss, jax_loss): "
        "torch_loss(outputs[B, ...], targets[B]) -> per-example losses [B] and "
        f"jax_loss(output, target) -> scalar for one example; got {loss_fn!r}."
    )


def _torch_per_example(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       torch_loss: Callable) -> list[np.ndarray]:
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        for p in model.parameters():
            p.grad = None
            p.grad_sample = None
        torch_loss(gsm(x), y).sum().backward()
        return [p.grad_sample.detach().cpu().numpy().copy() for p in model.parameters()]
    finally:
        gsm.remove_hooks()
        for p in model.parameters():
            p.grad = None
            p.grad_sample = None


def _converted_example(model: torch.nn.Module, grads: list[np.ndarray], i: int,
                       convert_fn: Callable) -> Any:
    """Run ``convert_fn`` on the state dict whose parameters hold example ``i``'s gradient."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.copy_(torch.from_numpy(g[i]))
        return jax.tree_util.tree_map(lambda a: np.array(a, copy=True),
                                      convert_fn(model.state_dict()))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def compare(
    torch_model: torch.nn.Module,
    flax_model: Any,
    convert_fn: Callable[[Mapping[str, torch.Tensor]], Any],
    batch: tuple[Any, Any],
    loss_fn: LossSpec,
    *,
    to_flax_input: Callable[[np.ndarray], np.ndarray] | None = None,
    rtol: float | None = None,
) -> CompareReport:
    """Compare the per-example gradients of a torch model and its flax twin.

    The torch side is ``dp_torch.GradSampleModule``, the JAX side
    ``dp_jax.per_example_grads``. The torch gradients of example ``i`` are put in
    the model's parameters and passed through ``convert_fn`` (so any layout change
    the converter makes, transposes included, applies to them too), then compared
    with the JAX gradients leaf by leaf.

    Args:
        torch_model: The torch module (float32 or float64; the JAX side runs in the
            same precision).
        flax_model: A ``flax.linen`` module with ``apply(variables, x)``.
        convert_fn: ``convert_fn(torch_model.state_dict()) -> flax variables``; must be
            linear in the parameters (transposes, reshapes, slicing, concatenation).
        batch: ``(x, y)`` numpy arrays in torch layout (``x`` may be token ids).
        loss_fn: ``"cross_entropy"``, ``"mse"``, or ``(torch_loss, jax_loss)`` where
            ``torch_loss(outputs, targets) -> [B]`` and ``jax_loss(output, target) ->
            scalar`` for one example.
        to_flax_input: Maps ``x`` to the flax layout (e.g. NCHW -> NHWC).
        rtol: Normwise tolerance (default: :func:`conformance.tolerances.rtol_for`).

    Returns:
        A :class:`CompareReport`; ``report.first_mismatch`` names the first flax
        parameter that disagrees.
    """
    if not isinstance(torch_model, torch.nn.Module):
        raise TypeError(f"torch_model must be a torch.nn.Module, got {type(torch_model).__name__}.")
    if not callable(convert_fn):
        raise TypeError(f"convert_fn must be callable, got {convert_fn!r}.")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"batch must be a pair (x, y) of arrays, got {type(batch).__name__}.")
    torch_loss, jax_loss = _losses(loss_fn)
    dtype = str(next(torch_model.parameters()).dtype).replace("torch.", "")
    tol = tolerances.rtol_for("per_example_grads", dtype) if rtol is None else float(rtol)
    x, y = (np.asarray(b) for b in batch)
    xf = to_flax_input(x) if to_flax_input is not None else x
    grads = _torch_per_example(torch_model, torch.from_numpy(x), torch.from_numpy(y), torch_loss)
    per_example = [_converted_example(torch_model, grads, i, convert_fn) for i in range(len(x))]
    expected = jax.tree_util.tree_map(lambda *g: np.stack(g), *per_example)
    with jax_precision(dtype):
        variables = jax.tree_util.tree_map(np.asarray, convert_fn(torch_model.state_dict()))

        def loss(v: Any, ex: Any) -> jax.Array:
            return jax_loss(flax_model.apply(v, ex["x"][None])[0], ex["y"])

        got = dp_jax.per_example_grads(loss, variables, {"x": xf, "y": y})
        got = jax.tree_util.tree_map(np.asarray, got)
    return _report(got, expected, tol, dtype)


def _report(got: Any, expected: Any, rtol: float, dtype: str) -> CompareReport:
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want = dict(jax.tree_util.tree_leaves_with_path(expected))
    scales = [float(np.max(np.abs(v), initial=0.0)) for v in want.values()]
    floor = tolerances.LEAF_FLOOR * max(scales, default=0.0)
    leaves = []
    for path, value in got_leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if path not in want:
            leaves.append(LeafReport(name, float("inf"), float("inf"), False))
            continue
        abs_err, rel_err = leaf_errors(value, want[path], floor=floor)
        leaves.append(LeafReport(name, abs_err, rel_err, rel_err <= rtol))
    return CompareReport(tuple(leaves), rtol, dtype)
