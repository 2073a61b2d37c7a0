"""Per-example results cover exactly the batch: broadcast inputs are exact, mismatches raise.

The regression of ghost clipping on GPT-2 and BERT: a position embedding whose ids are a
``[1, T]`` buffer broadcast against the batch got one row of norms, which the old code added
to example 0 only, under-estimating every other example's norm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dp_torch.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from dp_torch.grad_sample._rows import GradSampleBatchSizeError, leading_batch_size
from dp_torch.optimizers import DPOptimizer
from tests.tolerance import assert_close

B, T, D, V = 5, 4, 6, 11


class PositionModel(nn.Module):
    """Token plus position embeddings; the position ids are a ``[1, T]`` buffer (as GPT-2's)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, 3)
        self.register_buffer("position_ids", torch.arange(T)[None, :], persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(self.position_ids[:, : ids.shape[1]])
        return self.head(torch.tanh(h)).sum(dim=1)


class FlatteningModel(nn.Module):
    """Applies its linear layer to the batch flattened with the sequence: ``[B*T, D]``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, D)).reshape(x.shape[0], -1)


class BatchMeanScale(nn.Module):
    """A layer that reduces over the batch (its output has one row)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=0, keepdim=True)


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


def _loop_norms(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    norms = []
    for i in range(ids.shape[0]):
        grads = torch.autograd.grad(model(ids[i : i + 1]).pow(2).sum(), list(model.parameters()))
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(norms)


def _loop_grads(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    rows = [torch.autograd.grad(model(ids[i : i + 1]).pow(2).sum(), list(model.parameters()))
            for i in range(ids.shape[0])]
    return [torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))]


def test_ghost_norms_of_broadcast_position_embedding_are_exact() -> None:
    """Fails on the old combination code (examples 1..B-1 missed the position term)."""
    torch.manual_seed(0)
    model = PositionModel().double()
    ids = _ids()
    expected = _loop_norms(copy.deepcopy(model), ids)
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, loss_reduction="sum")
    torch.autograd.grad(gsm(ids).pow(2).sum(), gsm.take_output_edges())
    assert_close(gsm.per_sample_gradient_norms.numpy(), expected.numpy(), rtol=1e-12)
    assert gsm._module.pos.weight._norm_sample.shape == (B,)


@pytest.mark.parametrize("force_functorch", [False, True], ids=["hooks", "functorch"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_grad_samples_of_broadcast_position_embedding_are_exact(force_functorch: bool, reduction: str) -> None:
    torch.manual_seed(0)
    model = PositionModel().double()
    ids = _ids()
    expected = _loop_grads(copy.deepcopy(model), ids)
    gsm = GradSampleModule(model, loss_reduction=reduction, force_functorch=force_functorch)
    loss = gsm(ids).pow(2).sum(dim=1)
    (loss.sum() if reduction == "sum" else loss.mean()).backward()
    got = [p.grad_sample for p in model.parameters()]
    assert_close([g.numpy() for g in got], [e.numpy() for e in expected], rtol=1e-12, atol=1e-14)


def test_forward_output_is_unchanged_by_broadcast() -> None:
    torch.manual_seed(0)
    model = PositionModel().double()
    ids = _ids()
    expected = model(ids)
    assert torch.equal(GradSampleModule(copy.deepcopy(model))(ids), expected)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_flattened_batch_raises_naming_parameter_layer_and_sizes(mode: str) -> None:
    model = FlatteningModel()
    x = torch.randn(B, T, D)
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        with pytest.raises(GradSampleBatchSizeError, match=r"'fc\.weight' \(layer 'fc'\) has 20 rows, but the batch has 5"):
            torch.autograd.grad(gsm(x).sum(), gsm.take_output_edges())
        assert not hasattr(model.fc.weight, "_norm_sample")
        return
    gsm = GradSampleModule(model, force_functorch=mode == "functorch")
    with pytest.raises(GradSampleBatchSizeError, match=r"has 20 rows, but the batch has 5.*flatten the batch"):
        gsm(x).sum().backward()
    assert getattr(model.fc.weight, "grad_sample", None) is None


def test_layer_reducing_over_the_batch_raises() -> None:
    model = nn.Sequential(nn.Linear(D, D), BatchMeanScale())
    gsm = GradSampleModule(model)
    with pytest.raises(GradSampleBatchSizeError, match=r"Layer 1 takes an input with 5 rows .* returns 1 row"):
        gsm(torch.randn(B, D))


def test_backward_through_two_batch_sizes_raises() -> None:
    gsm = GradSampleModule(nn.Linear(D, 2))
    loss = gsm(torch.randn(3, D)).sum() + gsm(torch.randn(4, D)).sum()
    with pytest.raises(GradSampleBatchSizeError, match=r"different batch sizes \[3, 4\]"):
        loss.backward()


def test_optimizer_names_parameters_whose_rows_differ_across_passes() -> None:
    """Two backward passes in which one layer took part only once: the rows differ."""
    model = nn.ModuleDict({"a": nn.Linear(D, 2), "b": nn.Linear(D, 2)})
    gsm = GradSampleModule(model)
    x = torch.randn(B, D)
    (gsm._module["a"](x).sum() + gsm._module["b"](x).sum()).backward()
    gsm._module["a"](x).sum().backward()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=1.0, expected_batch_size=B)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GradSampleBatchSizeError, match=r"'b\.weight' \(layer 'b'\) has 5 rows, but the other parameters has 10"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_leading_batch_size_skips_one_dimensional_inputs() -> None:
    flat_ids, offsets = torch.arange(7), torch.tensor([0, 3])
    assert leading_batch_size((flat_ids, offsets), {}, 0) is None
    assert leading_batch_size((), {"input_ids": torch.zeros(3, 4)}, 0) == 3
    assert leading_batch_size((torch.zeros(5, 3, 2),), {}, 1) == 3
