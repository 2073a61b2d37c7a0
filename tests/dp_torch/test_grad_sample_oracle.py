"""The oracle of the per-sample-gradient tests: a loop of batch-size-1 backward passes.

A *case* is a model plus a batch; :func:`loop_per_example_grads` runs the model on each
example alone and records the gradient of that example's loss. The per-example loss is
``sum(w * out + 0.5 * out**2)`` over the example's output (``w`` fixed and random), so
backprops depend on the output, and the batch loss is its mean or sum over examples.
The tests at the bottom check the oracle itself (its sum is the batch gradient).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn

from tests.tolerance import assert_close

__all__ = [
    "Case",
    "TOL",
    "assert_grads_close",
    "batch_loss",
    "gsm_grad_samples",
    "loop_per_example_grads",
    "trainable_named",
]

#: Relative tolerance per dtype (atol is the same times the largest expected magnitude).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclasses.dataclass
class Case:
    """A model and a batch.

    Attributes:
        model: The model (never wrapped: tests wrap a deep copy).
        args: The batch inputs.
        example_args: ``i -> inputs of example i alone`` (a batch of one).
        batch_size: Number of examples.
        batch_dim: Where the output carries the batch (0 or 1).
        weights: Fixed random tensor shaped like the batch output (set on first use).
    """

    model: nn.Module
    args: tuple
    example_args: Callable[[int], tuple]
    batch_size: int
    batch_dim: int = 0
    weights: Any = None

    def output_weights(self, out: torch.Tensor) -> torch.Tensor:
        """The fixed weights of the loss, created to match the batch output."""
        if self.weights is None:
            gen = torch.Generator().manual_seed(1234)
            weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            self.weights = weights.to(device=out.device, dtype=out.dtype)
        return self.weights


def per_example_loss(out: torch.Tensor, w: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """Losses ``[B]`` of a batch output ``out`` (batch on ``batch_dim``)."""
    values = (w * out + 0.5 * out * out).movedim(batch_dim, 0)
    return values.reshape(values.shape[0], -1).sum(dim=1)


def batch_loss(case: Case, out: torch.Tensor, loss_reduction: str) -> torch.Tensor:
    """The batch loss: mean or sum of the per-example losses."""
    losses = per_example_loss(out, case.output_weights(out), case.batch_dim)
    return losses.mean() if loss_reduction == "mean" else losses.sum()


def trainable_named(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (``_module.`` prefix removed, duplicates once)."""
    return {
        name.removeprefix("_module."): p for name, p in model.named_parameters() if p.requires_grad
    }


def loop_per_example_grads(case: Case) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients by name ``[B, *shape]`` and the per-example losses ``[B]``.

    Runs the (unwrapped) model on each example alone, with the example's slice of the
    loss weights; a parameter the example does not reach gets zeros.
    """
    model = case.model
    with torch.no_grad():
        full = model(*case.args)
    w = case.output_weights(full)
    params = trainable_named(model)
    grads: dict[str, list] = {name: [] for name in params}
    losses = []
    for i in range(case.batch_size):
        model.zero_grad(set_to_none=True)
        out = model(*case.example_args(i))
        wi = w.narrow(case.batch_dim, i, 1)
        loss = per_example_loss(out, wi, case.batch_dim).sum()
        loss.backward()
        losses.append(loss.detach())
        for name, p in params.items():
            grads[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    stacked = {
        name: torch.stack(g) if g else torch.zeros((0, *params[name].shape), dtype=params[name].dtype)
        for name, g in grads.items()
    }
    loss_tensor = torch.stack(losses) if losses else torch.zeros(0, dtype=full.dtype)
    return stacked, loss_tensor


def gsm_grad_samples(case: Case, loss_reduction: str = "mean", **gsm_kwargs: Any) -> tuple[dict, nn.Module]:
    """Wrap a deep copy of the model in a GradSampleModule, run one batch, return grad_sample by name."""
    from dp_torch.grad_sample import GradSampleModule

    batch_first = case.batch_dim == 0
    gsm = GradSampleModule(copy.deepcopy(case.model), batch_first=batch_first, loss_reduction=loss_reduction,
                           **gsm_kwargs)
    out = gsm(*case.args)
    batch_loss(case, out, loss_reduction).backward()
    return {name: p.grad_sample for name, p in trainable_named(gsm).items()}, gsm


def assert_grads_close(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    """Compare per-parameter tensors with rtol from :data:`TOL`.

    ``atol`` is rtol times the tensor's largest magnitude, floored at 1e-3 times the
    largest magnitude over all parameters (and at 1e-6): a tensor that is zero in exact
    arithmetic (e.g. a bias right before a normalisation) is only rounding noise in the
    oracle.
    """
    assert sorted(actual) == sorted(expected), f"parameters differ: {sorted(actual)} vs {sorted(expected)}"
    rtol = TOL[dtype]
    overall = max((float(e.abs().max()) for e in expected.values() if e.numel()), default=0.0)
    for name in expected:
        a, e = actual[name], expected[name]
        assert a is not None, f"{name}: no grad_sample"
        assert tuple(a.shape) == tuple(e.shape), f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        scale = max(float(e.abs().max()) if e.numel() else 0.0, 1e-3 * overall, 1e-6)
        assert_close(a.detach().double().cpu().numpy(), e.detach().double().cpu().numpy(), rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------- tests of the oracle


def _mlp_case(batch: int, reduction_dtype: torch.dtype) -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(reduction_dtype)
    x = torch.randn(batch, 3, dtype=reduction_dtype)
    return Case(model, (x,), lambda i: (x[i : i + 1],), batch)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_oracle_sums_to_the_batch_gradient(loss_reduction: str) -> None:
    case = _mlp_case(5, torch.float64)
    per_example, losses = loop_per_example_grads(case)
    case.model.zero_grad(set_to_none=True)
    loss = batch_loss(case, case.model(*case.args), loss_reduction)
    loss.backward()
    scale = 1.0 / case.batch_size if loss_reduction == "mean" else 1.0
    for name, p in trainable_named(case.model).items():
        assert_close(p.grad.numpy(), (per_example[name].sum(0) * scale).numpy(), rtol=1e-12, atol=1e-14)
    expected_loss = losses.mean() if loss_reduction == "mean" else losses.sum()
    assert_close(loss.item(), expected_loss.item(), rtol=1e-12)


def test_oracle_examples_differ() -> None:
    """The oracle is not trivially constant across examples (a test that can fail)."""
    per_example, _ = loop_per_example_grads(_mlp_case(3, torch.float64))
    w = per_example["0.weight"]
    assert float((w[0] - w[1]).abs().max()) > 1e-3
