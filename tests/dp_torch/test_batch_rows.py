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
from dp_torch.grad_sample._rows import GradSampleBatchSizeError, GradSampleSumError, leading_batch_size
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


class SharedOutside(nn.Module):
    """Uses ``fc.weight`` both through ``fc`` and functionally in its own forward."""

    def __init__(self, outside_only: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.outside_only = outside_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.fc.weight)
        return y if self.outside_only else self.fc(y)


class NoisyLayer(nn.Module):
    """A layer without a grad sampler whose forward has dropout inside."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x * self.w, p=0.5, training=True)


@pytest.mark.parametrize("outside_only", [False, True], ids=["both", "outside-only"])
@pytest.mark.parametrize("force_functorch", [False, True], ids=["hooks", "functorch"])
def test_parameter_used_outside_its_layer_raises(outside_only: bool, force_functorch: bool) -> None:
    gsm = GradSampleModule(SharedOutside(outside_only), force_functorch=force_functorch)
    match = "no per-sample gradient" if outside_only else r"'fc\.weight' \(layer 'fc'\) add up to a value"
    with pytest.raises(GradSampleSumError, match=match):
        gsm(torch.randn(B, D)).pow(2).sum().backward()
    assert getattr(gsm._module.fc.weight, "grad_sample", None) is None


def test_weight_penalty_in_the_loss_raises() -> None:
    gsm = GradSampleModule(nn.Linear(D, 2))
    loss = gsm(torch.randn(B, D)).pow(2).sum() + 0.1 * gsm._module.weight.pow(2).sum()
    with pytest.raises(GradSampleSumError, match="weight_decay"):
        loss.backward()


class KeyBiasAttention(nn.Module):
    """Single-head attention; the key bias has a zero gradient in exact arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        return torch.softmax(scores, dim=-1) @ self.v(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_zero_gradient_parameters_pass_the_sum_check(reduction: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    gsm = GradSampleModule(KeyBiasAttention().to(dtype), loss_reduction=reduction)
    loss = gsm(torch.randn(B, T, D, dtype=dtype)).pow(2).sum(dim=(1, 2))
    (loss.sum() if reduction == "sum" else loss.mean()).backward()
    k_bias = gsm._module.k.bias.grad_sample
    assert k_bias.shape == (B, D) and float(k_bias.abs().max()) < 1e-4


def test_ghost_refuses_parameter_used_inside_and_outside_its_layer() -> None:
    """The norm would miss the outside use while the clipped pass includes it."""
    gsm = GradSampleModuleFastGradientClipping(SharedOutside(), max_grad_norm=1.0)
    out = gsm(torch.randn(B, D))
    with pytest.raises(ValueError, match=r"\['fc\.weight'\] were used outside the layers"):
        torch.autograd.grad(out.pow(2).sum(), gsm.take_output_edges())
    with pytest.raises(AttributeError):
        gsm.get_clipping_coef()


def test_ghost_tracker_ignores_shape_reads_and_no_grad_uses() -> None:
    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                scale = self.fc.weight.abs().max()
            return self.fc(x.to(self.fc.weight.dtype)) * self.fc.weight.shape[0] / scale

    gsm = GradSampleModuleFastGradientClipping(Reader(), max_grad_norm=1.0, loss_reduction="sum")
    torch.autograd.grad(gsm(torch.randn(B, D)).pow(2).sum(), gsm.take_output_edges())
    assert gsm.get_clipping_coef().shape == (B,)


def test_ghost_loss_refuses_a_penalty_that_requires_grad() -> None:
    from dp_torch.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = nn.Linear(D, 2)
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
    criterion = DPLossFastGradientClipping(gsm, None, nn.MSELoss())
    loss = criterion(gsm(torch.randn(B, D)), torch.zeros(B, 2))
    with pytest.raises(ValueError, match="weight_decay"):
        loss + model.weight.pow(2).sum()
    assert (loss + torch.tensor(1.0)).item() == pytest.approx(loss.item() + 1.0)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_empty_batch_with_broadcast_position_ids(mode: str) -> None:
    """An empty Poisson batch is a real step; the broadcast layer gets zero rows too."""
    model = PositionModel().double()
    ids = torch.zeros(0, T, dtype=torch.long)
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, loss_reduction="sum")
        torch.autograd.grad(gsm(ids).pow(2).sum(), gsm.take_output_edges(), allow_unused=True)
        assert gsm.get_clipping_coef().shape == (0,)
        return
    gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
    gsm(ids).pow(2).sum().backward()
    assert model.pos.weight.grad_sample.shape == (0, T, D)


class BatchNormalised(nn.Module):
    """A layer without buffers whose output depends on the other examples of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * (x - x.mean(dim=0, keepdim=True))


@pytest.mark.parametrize("model_cls", [NoisyLayer, BatchNormalised])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_layer_that_the_rerun_cannot_reproduce_raises(model_cls: type, mode: str) -> None:
    """Dropout inside a fallback layer, or a layer mixing examples: refused in every mode."""
    from dp_torch.grad_sample.functorch import GradSampleRerunError

    torch.manual_seed(0)
    x = torch.randn(B, D)
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(model_cls(), max_grad_norm=1.0)
        with pytest.raises(GradSampleRerunError, match="re-run one example at a time"):
            torch.autograd.grad(gsm(x).pow(2).sum(), gsm.take_output_edges())
        return
    gsm = GradSampleModule(model_cls())
    with pytest.raises(GradSampleRerunError, match="re-run one example at a time"):
        gsm(x).pow(2).sum().backward()
