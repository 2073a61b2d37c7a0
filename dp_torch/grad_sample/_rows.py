"""The batch size of a forward pass, and the check that per-example results cover it.

Every per-example quantity (``p.grad_sample``, a ghost-clipping norm) must have exactly one
row per example of the batch. A layer whose output has one row while the batch has ``B``
(position ids, token-type ids or any other buffer broadcast against the batch) is
*broadcast*: its output is expanded to ``B`` identical rows before the rest of the model
sees it, so that autograd hands its gradient hook one row of backprops per example.

Guarantee:
    A per-example gradient or norm whose leading dimension is not the batch size of its
    forward pass raises :class:`GradSampleBatchSizeError` (naming the parameter, its layer,
    both sizes and the fix) at the end of the backward pass, before any per-example value
    reaches an optimizer. Nothing is padded, broadcast or dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from ._clipped_sum import compute_dtype

__all__ = [
    "GradSampleBatchSizeError",
    "GradSampleSumError",
    "broadcast_call",
    "check_rows",
    "check_sums",
    "leading_batch_size",
    "parameter_names",
]


class GradSampleBatchSizeError(ValueError):
    """A per-example gradient or norm does not have one row per example of the batch."""


class GradSampleSumError(ValueError):
    """The per-sample gradients of a backward pass do not add up to the parameter's gradient."""


#: Largest ``||sum_i g_i - grad|| / sum_i ||g_i||`` put down to rounding, per dtype.
SUM_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def leading_batch_size(args: tuple, kwargs: Mapping[str, Any], batch_dim: int) -> Optional[int]:
    """The batch size of a model call: the size of ``batch_dim`` of its first batched input.

    A batched input is a tensor with at least two dimensions (``[batch, features...]``;
    one-dimensional inputs such as the flat indices of an ``EmbeddingBag`` with offsets do not
    say where examples start) or a ``PackedSequence`` (its largest batch). Positional inputs
    come first, then keyword inputs in order; lists, tuples and dicts are searched in order.

    Args:
        args: Positional inputs of the call.
        kwargs: Keyword inputs of the call.
        batch_dim: ``0`` for batch-first models, ``1`` for ``[T, batch, ...]`` inputs.

    Returns:
        The batch size, or ``None`` when no input carries a batch dimension.
    """
    for value in (*args, *kwargs.values()):
        found = _batch_of(value, batch_dim)
        if found is not None:
            return found
    return None


def _batch_of(value: Any, batch_dim: int) -> Optional[int]:
    if isinstance(value, PackedSequence):
        return int(value.batch_sizes[0]) if value.batch_sizes.numel() else 0
    if isinstance(value, torch.Tensor):
        return int(value.shape[batch_dim]) if value.dim() > max(batch_dim, 1) else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _batch_of(item, batch_dim)
            if found is not None:
                return found
    return None


def _expand_rows(value: Any, batch_dim: int, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > batch_dim and value.shape[batch_dim] == 1:
        shape = list(value.shape)
        shape[batch_dim] = batch
        return value.expand(shape)
    return value


def broadcast_call(
    name: str, output: torch.Tensor, args: tuple, kwargs: dict, batch_dim: int, batch: int
) -> tuple[torch.Tensor, tuple, dict]:
    """Expand a layer call whose output has one row to ``batch`` identical rows.

    The expanded output is a contiguous copy, so the rest of the model may modify it in
    place; the inputs with one row are expanded as views.

    Args:
        name: The layer's path in the model (for the error message).
        output: The layer output, one row along ``batch_dim``.
        args: The call's positional inputs.
        kwargs: The call's keyword inputs.
        batch_dim: Where the batch is.
        batch: The batch size of the forward pass.

    Returns:
        ``(output, args, kwargs)`` with ``batch`` rows.

    Raises:
        GradSampleBatchSizeError: If an input of the layer has ``batch`` rows: the layer
            then reduces over the batch, which mixes examples.
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > batch_dim and value.shape[batch_dim] == batch:
            raise GradSampleBatchSizeError(
                f"Layer {name} takes an input with {batch} rows (the batch) and returns 1 row: it "
                "reduces over the batch, which mixes examples, so per-example gradients do not "
                "exist. Keep the batch dimension through every layer with trainable parameters, "
                "or freeze the layer (requires_grad=False)."
            )
    shape = list(output.shape)
    shape[batch_dim] = batch
    expanded = output.expand(shape).contiguous()
    new_args = tuple(_expand_rows(a, batch_dim, batch) for a in args)
    new_kwargs = {k: _expand_rows(v, batch_dim, batch) for k, v in kwargs.items()}
    return expanded, new_args, new_kwargs


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``{id(p): qualified name}`` for every parameter of ``module`` (first name of a shared one)."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def check_rows(rows: Iterable[tuple[str, int]], batch: Optional[int], what: str) -> None:
    """Raise unless every per-example result has ``batch`` rows (or all agree when unknown).

    Args:
        rows: ``(parameter name, leading size)`` for every per-example result of a pass.
        batch: The batch size of the forward pass, ``None`` when it is not known.
        what: What the rows are (``"per-sample gradient"``, ``"per-example norm"``).

    Raises:
        GradSampleBatchSizeError: Naming the first parameter whose size differs, its layer,
            the two sizes and the fix.
    """
    rows = list(rows)
    if not rows:
        return
    expected = batch if batch is not None else max((r for _, r in rows), key=[r for _, r in rows].count)
    for name, size in rows:
        if size != expected:
            raise GradSampleBatchSizeError(_mismatch_message(name, size, expected, what, batch is not None))


def _mismatch_message(name: str, size: int, expected: int, what: str, known: bool) -> str:
    layer = name.rsplit(".", 1)[0] if "." in name else "<root>"
    against = "the batch" if known else "the other parameters"
    return (
        f"The {what} of parameter {name!r} (layer {layer!r}) has {size} rows, but {against} "
        f"has {expected}: it would not cover every example exactly, so this step is refused. "
        "Every layer with trainable parameters must see one row per example along the batch "
        "dimension: do not flatten the batch into other dimensions (e.g. [B, T, d] -> [B*T, d]) "
        "or reduce over it before such a layer, check batch_first, or freeze the layer "
        "(requires_grad=False)."
    )


def sum_discrepancy(grad_sample: torch.Tensor, grad: torch.Tensor, divisor: int) -> tuple[float, float]:
    """``(||sum_i g_i / divisor - grad||, sum_i ||g_i|| / divisor)`` in float32 or wider."""
    flat = grad_sample.reshape(grad_sample.shape[0], grad.numel())
    flat = flat.to(compute_dtype(flat))
    diff = (flat.sum(dim=0) / divisor - grad.reshape(-1).to(flat.dtype)).norm()
    return float(diff), float(flat.norm(dim=1).sum() / divisor)


def check_sums(entries: list[tuple[str, Optional[torch.Tensor], torch.Tensor, int]],
               pass_dtype: Optional[torch.dtype] = None) -> None:
    """Raise unless, for every parameter, the per-sample gradients of a pass add up to its
    gradient of the pass.

    ``grad`` is what autograd computed for the parameter in this backward pass. Each use of a
    parameter that the hooks do not see (a functional use outside its layer, a weight penalty
    added to the loss) or randomness that the per-example re-run cannot repeat (dropout inside
    a layer without a sampler) makes the two differ; per-example clipping of such gradients
    would not be DP-SGD of this loss. The allowed rounding is ``SUM_TOLERANCE`` (of the least
    precise dtype among the pass's gradients: under autocast, per-sample gradients are
    bfloat16 or float16 and their rounding reaches every layer below through the backprops)
    times the parameter's ``sum_i ||g_i||``, and at least times 1% of the largest such sum of the pass
    (gradients that are zero in exact arithmetic, such as an attention key bias, carry
    rounding noise of the computation around them).

    Args:
        entries: ``(name, per-sample gradients of the pass or None, gradient of the pass,
            divisor)`` per parameter; the divisor is ``1`` for a summed loss, the number of
            rows for a mean.
        pass_dtype: The least precise dtype the pass's backprops arrived in (per-sample
            gradients are computed in float32 from bfloat16/float16 backprops, but autograd's
            gradient carries that dtype's rounding).

    Raises:
        GradSampleSumError: Naming the parameter, the discrepancy and the likely causes.
    """
    stats = {}
    for name, grad_sample, grad, divisor in entries:
        if grad_sample is None:
            _check_unsampled(name, grad)
        else:
            stats[name] = (*sum_discrepancy(grad_sample, grad, divisor), _narrowest(grad, grad_sample))
    largest = max((scale for _, scale, _ in stats.values()), default=0.0)
    rounding = SUM_TOLERANCE.get(_narrowest(pass_dtype, *(dtype for _, _, dtype in stats.values())), 5e-2)
    for name, (diff, scale, _) in stats.items():
        tol = rounding * max(scale, 1e-2 * largest)
        if diff > tol and diff > 0:
            raise GradSampleSumError(_sum_message(name, diff, tol))


def _narrowest(*items: Any) -> Optional[torch.dtype]:
    """The least precise floating dtype of some tensors or dtypes (``None`` if there is none)."""
    dtypes = [x.dtype if isinstance(x, torch.Tensor) else x for x in items]
    floats = [d for d in dtypes if d is not None and d.is_floating_point]
    return min(floats, key=lambda d: torch.finfo(d).bits, default=None)


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else "<root>"


def _check_unsampled(name: str, grad: torch.Tensor) -> None:
    if bool(torch.any(grad != 0)):
        raise GradSampleSumError(
            f"Parameter {name!r} received a gradient in this backward pass but no per-sample "
            f"gradient: it is used outside the layer {_layer_of(name)!r} that owns it (e.g. "
            "F.linear(x, self.fc.weight) in a parent's forward), so its gradient cannot be "
            "clipped per example. Call the layer itself, or make the parameter one of the "
            "using module's own."
        )


def _sum_message(name: str, diff: float, tol: float) -> str:
    return (
        f"The per-sample gradients of parameter {name!r} (layer {_layer_of(name)!r}) add up to a "
        f"value that differs from its gradient in this backward pass by {diff:.3e} (allowed "
        f"{tol:.3e}), so they are not this loss's per-example gradients. Likely causes: the "
        "parameter is also used outside its layer (call the layer itself); the loss has a term "
        "that is not a sum over examples (move a weight penalty into the optimizer's "
        "weight_decay); or the layer has randomness, such as dropout inside a layer without a "
        "grad sampler, that its per-example re-run cannot repeat (move the dropout out of that "
        "layer or set its probability to 0)."
    )
