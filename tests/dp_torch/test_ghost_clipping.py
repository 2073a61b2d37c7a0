"""Ghost / fast gradient clipping: per-example norms and the clipped sum against the loop oracle.

The oracle is the loop of batch-size-1 backward passes (``test_grad_sample_oracle``); the
clip factors of the expected clipped sum come from ``dpcore.clipping.clip_factor`` (numpy,
float64), so the torch formula is checked against the reference math too.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_torch.grad_sample import GradSampleModuleFastGradientClipping
from dp_torch.grad_sample import _registry, _tied
from dp_torch.utils.fast_gradient_clipping_utils import (
    DPLossFastGradientClipping,
    DPTensorFastGradientClipping,
)
from dpcore.clipping import clip_factor
from tests.dp_torch.test_grad_sample import Composite, PaddedRNN, ScaledTanh, Tied, TinyRNN, TwiceLinear
from tests.dp_torch.test_grad_sample_oracle import TOL, Case, loop_per_example_grads, per_example_loss, trainable_named
from tests.tolerance import assert_close


class OracleLoss(nn.Module):
    """The oracle's loss as a criterion: ``sum(w * out + 0.5 out^2)`` per example."""

    def __init__(self, case: Case, reduction: str):
        super().__init__()
        self.case = case
        self.reduction = reduction

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        losses = per_example_loss(out, self.case.output_weights(out), self.case.batch_dim)
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


class _Opt:
    """Stands in for the DP optimizer: only ``loss_reduction`` is read."""

    def __init__(self, loss_reduction: str):
        self.loss_reduction = loss_reduction


def _expected(case: Case, max_grad_norm: float) -> tuple[np.ndarray, dict]:
    grads, _ = loop_per_example_grads(case)
    flat = torch.cat([g.reshape(case.batch_size, -1) for g in grads.values()], dim=1).double()
    norms = flat.norm(dim=1).cpu().numpy()
    coef = torch.from_numpy(clip_factor(norms, max_grad_norm))
    clipped = {n: torch.einsum("b,b...->...", coef.to(g), g) for n, g in grads.items()}
    return norms, clipped


def _ghost_run(case: Case, loss_reduction: str, max_grad_norm: float, **kwargs):
    gsm = GradSampleModuleFastGradientClipping(
        copy.deepcopy(case.model), batch_first=case.batch_dim == 0, loss_reduction=loss_reduction,
        max_grad_norm=max_grad_norm, **kwargs,
    )
    criterion = DPLossFastGradientClipping(gsm, _Opt(loss_reduction), OracleLoss(case, loss_reduction),
                                           loss_reduction)
    loss = criterion(gsm(*case.args))
    loss.backward()
    return gsm, loss


def _check_ghost(case: Case, dtype, loss_reduction: str = "mean", max_grad_norm: float = None, **kwargs):
    if max_grad_norm is None:  # clip about half of the examples
        norms, _ = _expected(case, 1.0)
        max_grad_norm = float(np.median(norms)) or 1.0
    norms, clipped = _expected(case, max_grad_norm)
    gsm, _ = _ghost_run(case, loss_reduction, max_grad_norm, **kwargs)
    rtol = TOL[dtype]
    assert_close(gsm.per_sample_gradient_norms.double().cpu().numpy(), norms, rtol=rtol, atol=rtol * norms.max())
    assert_close(gsm.get_clipping_coef().double().cpu().numpy(), clip_factor(norms, max_grad_norm), rtol=rtol * 10)
    for name, p in trainable_named(gsm).items():
        scale = max(float(clipped[name].abs().max()), 1e-3 * max(float(c.abs().max()) for c in clipped.values()))
        assert_close(p.grad.double().cpu().numpy(), clipped[name].double().cpu().numpy(), rtol=rtol, atol=rtol * scale)
        assert p.grad_sample is None  # ghost mode never leaves per-example gradients behind
    return gsm


def _case(model: nn.Module, x, batch_dim: int = 0) -> Case:
    return Case(model, (x,), lambda i: (x.narrow(batch_dim, i, 1),), x.shape[batch_dim], batch_dim)


DTYPES = st.sampled_from([torch.float64, torch.float32])
REDUCTIONS = st.sampled_from(["mean", "sum"])
SLOW_EXAMPLES = 100


def _property(fast: int, **strategies):
    """A quick hypothesis test (``fast`` examples) and a slow sweep of the same body."""

    def decorate(body):
        quick, sweep = (
            settings(deadline=None, max_examples=n, derandomize=True)(given(**strategies)(body))
            for n in (fast, SLOW_EXAMPLES)
        )
        return quick, pytest.mark.slow(sweep)

    return decorate


# --------------------------------------------------------------------------- Linear and Embedding


def _linear_norms_and_clipped_sum(dtype, loss_reduction, batch_first, batch, steps, d_in, d_out, bias) -> None:
    """2-d inputs, and sequences whose shapes pick the Gram form or materialisation."""
    torch.manual_seed(batch * 13 + d_in)
    if steps is None:
        batch_first = True
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias), nn.Tanh(), nn.Linear(d_out, 2)).to(dtype)
    shape = [batch, d_in] if steps is None else ([batch, steps, d_in] if batch_first else [steps, batch, d_in])
    x = torch.randn(shape, dtype=dtype)
    _check_ghost(_case(model, x, 0 if batch_first else 1), dtype, loss_reduction)


test_linear_norms_and_clipped_sum, test_linear_norms_and_clipped_sum_sweep = _property(
    15, dtype=DTYPES, loss_reduction=REDUCTIONS, batch_first=st.booleans(), batch=st.integers(1, 5),
    steps=st.sampled_from([None, 1, 2, 5, 9]), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
    bias=st.booleans(),
)(_linear_norms_and_clipped_sum)


@pytest.mark.parametrize("steps, d_in, d_out, branch", [
    (1, 4, 3, "rank one"),       # |a|^2 |g|^2
    (3, 8, 8, "gram"),           # T (d_in + d_out) <= d_in d_out
    (6, 3, 2, "materialise"),
])
def test_linear_norm_sampler_branches(monkeypatch, steps, d_in, d_out, branch) -> None:
    import dp_torch.grad_sample.linear as linear

    seen = []
    real_bmm = torch.bmm
    monkeypatch.setattr(linear.torch, "bmm", lambda a, b: seen.append(tuple(b.shape)) or real_bmm(a, b))
    torch.manual_seed(steps)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh()).double()
    x = torch.randn(4, steps, d_in, dtype=torch.float64)
    _check_ghost(_case(model, x), torch.float64, "sum")
    gram_shapes = {(4, d_in, steps), (4, d_out, steps)}
    if branch == "gram":
        assert gram_shapes <= set(seen)
    elif branch == "materialise":
        assert (4, steps, d_in) in seen and not gram_shapes & set(seen)
    else:
        assert not seen


class TokenModel(nn.Module):
    def __init__(self, vocab: int, dim: int, padding_idx, scale_grad_by_freq: bool):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
        self.out = nn.Linear(dim, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def _embedding_norms_and_clipped_sum(dtype, loss_reduction, batch_first, batch, length, vocab, dim,
                                         use_padding) -> None:
    torch.manual_seed(vocab + 17 * batch)
    model = TokenModel(vocab, dim, 1 if use_padding else None, False).to(dtype)
    ids = torch.randint(0, vocab, (batch, length) if batch_first else (length, batch))
    _check_ghost(_case(model, ids, 0 if batch_first else 1), dtype, loss_reduction)


test_embedding_norms_and_clipped_sum, test_embedding_norms_and_clipped_sum_sweep = _property(
    15, dtype=DTYPES, loss_reduction=REDUCTIONS, batch_first=st.booleans(), batch=st.integers(1, 5),
    length=st.integers(1, 6), vocab=st.integers(2, 6), dim=st.integers(1, 4), use_padding=st.booleans(),
)(_embedding_norms_and_clipped_sum)


@pytest.mark.parametrize("layer", [nn.Embedding(4, 2, scale_grad_by_freq=True),
                                   nn.EmbeddingBag(4, 2, scale_grad_by_freq=True)])
def test_scale_grad_by_freq_is_rejected(layer) -> None:
    """Its batch gradient uses batch-wide counts: not a sum of per-example gradients."""
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        GradSampleModuleFastGradientClipping(nn.Sequential(layer))


def _boom(*args, **kwargs):
    raise AssertionError("this sampler must not run")


def test_wide_linear_and_embedding_never_materialise(monkeypatch) -> None:
    """Where per-example gradients would take more memory than the call's own tensors (wide
    layers, short sequences), norms come from the norm samplers and the clipped sum from the
    batch-gradient samplers."""
    monkeypatch.setitem(_registry.GRAD_SAMPLERS, nn.Linear, _boom)
    monkeypatch.setitem(_registry.GRAD_SAMPLERS, nn.Embedding, _boom)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 2))
    _check_ghost(_case(TokenModel(50, 40, None, False).double(), ids), torch.float64)


def test_narrow_layer_over_a_long_sequence_is_materialised(monkeypatch) -> None:
    """Per-example gradients smaller than the call's tensors: kept instead of the call, so
    neither the norm sampler nor the batch-gradient product runs for that layer."""
    monkeypatch.setitem(_registry.NORM_SAMPLERS, nn.Linear, _boom)
    monkeypatch.setitem(_registry.BATCH_GRAD_SAMPLERS, nn.Linear, _boom)
    torch.manual_seed(0)
    x = torch.randn(3, 20, 4, dtype=torch.float64)
    _check_ghost(_case(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double(), x), torch.float64)


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_recurrence_merges_calls(loss_reduction) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 3, dtype=torch.float64)  # [T, B, d]
    _check_ghost(_case(TinyRNN().double(), x, 1), torch.float64, loss_reduction)


def test_packed_style_recurrence() -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([4, 2, 1])
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    model = TinyRNN().double()
    case = Case(model, (x, lengths), lambda i: (x[: int(lengths[i]), i : i + 1], lengths[i : i + 1]), 3, 1)
    case.model = PaddedRNN(model, 4)
    _check_ghost(case, torch.float64, "mean")


@pytest.mark.parametrize("model_factory, make_input", [
    (TwiceLinear, lambda: torch.randn(4, 3, dtype=torch.float64)),
    (Tied, lambda: torch.randint(0, 6, (3, 5))),
    (Composite, lambda: torch.randn(4, 2, 4, 4, dtype=torch.float64)),
    (lambda: ScaledTanh(3, 2), lambda: torch.randn(5, 3, dtype=torch.float64)),
])
@pytest.mark.parametrize("use_ghost_clipping", [True, False])
def test_shared_layers_tied_weights_and_materialised_layers(model_factory, make_input, use_ghost_clipping) -> None:
    torch.manual_seed(0)
    x = make_input()
    _check_ghost(_case(model_factory().double(), x), torch.float64, "mean", use_ghost_clipping=use_ghost_clipping)


class TiedLM(nn.Module):
    """An embedding with a padding row tied to an output layer with a bias, over 40 positions."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5, padding_idx=1)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 7)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids))))


@pytest.mark.parametrize("model_factory", [TiedLM, Tied])
def test_tied_embedding_and_output_layer_get_norms_without_per_example_tables(
        model_factory, monkeypatch) -> None:
    """The shared weight's norm from the two layers' norms and their cross term (no
    [B, vocab, dim] tensor), equal to the definition; padding tokens contribute nothing."""
    import dp_torch.grad_sample.grad_sample_module_fast_gradient_clipping as ghost

    taken = []
    monkeypatch.setattr(ghost, "tied_norms", lambda emb, out: taken.append(1) or _tied.tied_norms(emb, out))
    torch.manual_seed(0)
    ids = torch.randint(0, 6, (4, 40))
    ids[0, :5] = 1
    _check_ghost(_case(model_factory().double(), ids), torch.float64, "mean")
    assert taken == [1]


def test_large_clip_bound_gives_the_plain_gradient_sum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    case = _case(model, x)
    grads, _ = loop_per_example_grads(case)
    gsm, _ = _ghost_run(case, "sum", 1e6)
    for name, p in trainable_named(gsm).items():
        assert_close(p.grad.numpy(), grads[name].sum(0).numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the loss wrapper


def test_existing_gradients_are_kept_and_the_first_pass_adds_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    case = _case(model, x)
    _, clipped = _expected(case, 0.5)
    prior = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=0.5)
    for n, p in trainable_named(gsm).items():
        p.grad = prior[n].clone()
    DPLossFastGradientClipping(gsm, _Opt("mean"), OracleLoss(case, "mean"))(gsm(x)).backward()
    for n, p in trainable_named(gsm).items():
        assert_close(p.grad.numpy(), (prior[n] + clipped[n]).numpy(), rtol=1e-10, atol=1e-12)


def test_sequence_cross_entropy_with_shape_and_ignore_index() -> None:
    """Logits [B, T, V] flattened for CrossEntropyLoss; the privacy unit is the sequence."""
    torch.manual_seed(0)
    vocab, batch, steps = 5, 3, 4
    model = TokenModel(vocab, 3, None, False).double()
    model.out = nn.Linear(3, vocab).double()
    ids = torch.randint(0, vocab, (batch, steps))
    target = torch.randint(0, vocab, (batch, steps))
    target[0, :2] = -100
    target[2, 1] = -100
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    grads = {n: [] for n, _ in model.named_parameters()}
    for i in range(batch):
        model.zero_grad()
        logits = model(ids[i : i + 1])
        ce(logits.reshape(-1, vocab), target[i : i + 1].reshape(-1)).backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.clone())
    flat = torch.cat([torch.stack(g).reshape(batch, -1) for g in grads.values()], 1)
    norms = flat.norm(dim=1).numpy()
    coef = torch.from_numpy(clip_factor(norms, 0.3))
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=0.3)
    criterion = DPLossFastGradientClipping(gsm, _Opt("mean"), ce)
    logits = gsm(ids)
    loss = criterion(logits.reshape(-1, vocab), target.reshape(-1), shape=logits.shape)
    loss.backward()
    assert ce.reduction == "mean"  # restored
    assert_close(gsm.per_sample_gradient_norms.numpy(), norms, rtol=1e-10)
    for n, p in gsm._module.named_parameters():
        assert_close(p.grad.numpy(), torch.einsum("b,b...->...", coef, torch.stack(grads[n])).numpy(),
                     rtol=1e-10, atol=1e-12)


def test_elementwise_losses_are_reduced_per_example() -> None:
    """MSELoss gives [B, d] with reduction='none'; the per-example loss is the row's mean."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    mse = nn.MSELoss()
    expected = torch.stack([mse(model(x[i : i + 1]), y[i : i + 1]) for i in range(4)])
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model))
    loss = DPLossFastGradientClipping(gsm, _Opt("mean"), mse)(gsm(x), y)
    assert_close(loss.loss_per_sample.detach().numpy(), expected.detach().numpy(), rtol=1e-12)
    assert_close(loss.item(), mse(model(x), y).item(), rtol=1e-12)


def test_functional_criterion() -> None:
    model = nn.Linear(3, 4).double()
    gsm = GradSampleModuleFastGradientClipping(model)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    loss = DPLossFastGradientClipping(gsm, _Opt("mean"), torch.nn.functional.cross_entropy)(gsm(x), y)
    assert loss.loss_per_sample.shape == (5,)
    loss.backward()
    assert gsm.per_sample_gradient_norms.shape == (5,)


def test_loss_object_behaves_like_a_loss_tensor() -> None:
    gsm = GradSampleModuleFastGradientClipping(nn.Linear(2, 1))
    losses = torch.tensor([1.0, 2.0, 3.0])
    loss = DPTensorFastGradientClipping(gsm, None, losses, "mean")
    assert loss.item() == pytest.approx(2.0) and float(loss) == pytest.approx(2.0)
    assert loss.detach().shape == torch.Size([]) and not loss.detach().requires_grad
    assert (2 * loss).item() == pytest.approx(4.0)
    assert (loss / 2).item() == pytest.approx(1.0)
    assert (loss + loss).item() == pytest.approx(4.0)
    assert (1 - loss).item() == pytest.approx(-1.0)
    assert (-loss).item() == pytest.approx(-2.0)
    assert (loss - 1).item() == pytest.approx(1.0)
    assert DPTensorFastGradientClipping(gsm, None, losses, "sum").item() == pytest.approx(6.0)
    assert "2.0000" in str(loss)
    with pytest.raises(ValueError, match="reductions"):
        loss + DPTensorFastGradientClipping(gsm, None, losses, "sum")
    with pytest.raises(TypeError):
        loss + "x"
    with pytest.raises(ValueError, match="1-d"):
        DPTensorFastGradientClipping(gsm, None, torch.ones(2, 2), "mean")


def test_reductions_must_agree() -> None:
    gsm = GradSampleModuleFastGradientClipping(nn.Linear(2, 1), loss_reduction="sum")
    with pytest.raises(ValueError, match="module has 'sum'"):
        DPLossFastGradientClipping(gsm, _Opt("mean"), nn.MSELoss(reduction="mean"), "mean")
    with pytest.raises(ValueError, match="optimizer has 'mean'"):
        DPLossFastGradientClipping(gsm, _Opt("mean"), nn.MSELoss(reduction="sum"), "sum")
    with pytest.raises(ValueError, match="criterion has 'mean'"):
        DPLossFastGradientClipping(gsm, _Opt("sum"), nn.MSELoss(), "sum")
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        DPLossFastGradientClipping(gsm, _Opt("sum"), nn.MSELoss(), "avg")
    with pytest.raises(TypeError, match="ghost"):
        DPLossFastGradientClipping(nn.Linear(2, 1), _Opt("sum"), nn.MSELoss(reduction="sum"), "sum")


# --------------------------------------------------------------------------- the module


def test_clipping_coefficients_match_dpcore_including_non_finite() -> None:
    gsm = GradSampleModuleFastGradientClipping(nn.Linear(2, 1), max_grad_norm=1.5)
    with pytest.raises(AttributeError, match="forward and backward"):
        gsm.per_sample_gradient_norms
    norms = np.array([0.0, 0.5, 1.5, 3.0, 1e300, np.inf, np.nan])
    gsm.per_sample_gradient_norms = torch.from_numpy(norms)
    assert_close(gsm.get_clipping_coef().numpy(), clip_factor(norms, 1.5), rtol=1e-15)


def test_non_finite_norms_are_counted() -> None:
    model = nn.Linear(2, 1).double()
    gsm = GradSampleModuleFastGradientClipping(model)
    x = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [0.5, 0.5]], dtype=torch.float64)
    gsm(x).sum().backward()
    assert gsm.num_nonfinite_grad_samples == 1
    assert gsm.get_clipping_coef()[1] == 0


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), "1"])
def test_invalid_max_grad_norm(value) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradSampleModuleFastGradientClipping(model, max_grad_norm=value)
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_unreached_parameters_count_as_zero_not_stale() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(2, 2).double(), nn.Linear(2, 2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    expected = []
    for i in range(3):  # oracle first, on the unwrapped layer
        a.zero_grad()
        a(x[i : i + 1]).pow(2).sum().backward()
        expected.append(torch.cat([p.grad.flatten() for p in a.parameters()]))
    expected_norms = torch.stack(expected).norm(dim=1)
    gsm = GradSampleModuleFastGradientClipping(nn.ModuleDict({"a": a, "b": b}), loss_reduction="sum")
    gsm._module["b"](gsm._module["a"](x)).sum().backward()
    gsm.zero_grad()
    gsm._module["a"](x).pow(2).sum().backward()  # b is not reached this time
    assert not hasattr(b.weight, "_norm_sample")
    assert_close(gsm.per_sample_gradient_norms.numpy(), expected_norms.numpy(), rtol=1e-10)


def test_parameter_used_outside_its_layer_is_detected() -> None:
    """A weight used only by the parent's forward escapes the hooks: the clipped pass refuses."""

    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = nn.Linear(3, 1)  # only its weight is used, by the parent

        def forward(self, x):
            return self.fc(x).sum(1, keepdim=True) * torch.nn.functional.linear(x, self.scale.weight)

    gsm = GradSampleModuleFastGradientClipping(Outside().double())
    x = torch.randn(4, 3, dtype=torch.float64)
    criterion = DPLossFastGradientClipping(gsm, _Opt("mean"), nn.MSELoss())
    loss = criterion(gsm(x), torch.zeros(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale.weight"):
        loss.backward()


def test_poisson_guard_in_ghost_mode_reads_p_grad() -> None:
    torch.manual_seed(0)
    gsm = GradSampleModuleFastGradientClipping(nn.Linear(3, 2).double())
    gsm.forbid_grad_accumulation()
    criterion = DPLossFastGradientClipping(gsm, _Opt("mean"), nn.MSELoss())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    criterion(gsm(x), y).backward()
    before = [p.grad.clone() for p in gsm.parameters()]
    with pytest.raises(ValueError, match="Poisson sampling.*BatchMemoryManager"):
        criterion(gsm(x), y).backward()
    assert all(torch.equal(p.grad, b) for p, b in zip(gsm.parameters(), before))
    gsm.zero_grad(set_to_none=False)  # zeros are fine
    criterion(gsm(x), y).backward()
    gsm.allow_grad_accumulation()
    criterion(gsm(x), y).backward()  # accumulates
    for p, b in zip(gsm.parameters(), before):
        assert_close(p.grad.numpy(), 2 * b.numpy(), rtol=1e-12)


def test_clip_bound_follows_the_optimizer_so_noise_matches_sensitivity() -> None:
    # A grad-clip scheduler changes optimizer.max_grad_norm; the ghost module must clip to
    # that bound (the one the noise is scaled by), not to the bound it was built with.
    from dp_torch import PrivacyEngine
    from dp_torch.schedulers import StepGradClip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = torch.utils.data.TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    engine = PrivacyEngine()
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        criterion=nn.CrossEntropyLoss(), poisson_sampling=False,
    )
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.01)
    scheduler.step()
    assert optimizer.max_grad_norm == pytest.approx(0.01)
    x, y = next(iter(loader))
    criterion(model(x), y).backward()
    assert model.max_grad_norm == optimizer.max_grad_norm
    norms = model.per_sample_gradient_norms
    expected = torch.from_numpy(clip_factor(norms.detach().numpy(), 0.01))
    assert_close(model.get_clipping_coef().numpy(), expected.numpy(), rtol=1e-12)
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert total <= 0.01 * len(y) * (1 + 1e-9)


# ---------------------------------------------------------------------- book-keeping


def _small_ghost_step(model: nn.Module, **kwargs):
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=0.5, **kwargs)
    criterion = DPLossFastGradientClipping(gsm, _Opt("mean"), nn.MSELoss())
    x = torch.randn(5, 4, dtype=torch.float64)
    return gsm, criterion(gsm(x), torch.zeros(5, 2, dtype=torch.float64))


def test_autograd_never_computes_a_parameter_gradient() -> None:
    """Book-keeping: the clipped sum comes from the kept tensors, not a second backward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2)).double()
    reached = []
    for p in model.parameters():
        p.register_hook(lambda g, reached=reached: reached.append(g))
    gsm, loss = _small_ghost_step(model)
    loss.backward()
    assert reached == []
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gsm.parameters())


def test_clipped_sum_is_added_once_and_checks_its_factors() -> None:
    torch.manual_seed(0)
    gsm, loss = _small_ghost_step(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double())
    loss.backward()
    with pytest.raises(ValueError, match="no backward pass was kept"):
        gsm.add_clipped_sum(gsm.get_clipping_coef())
    gsm2, loss2 = _small_ghost_step(nn.Linear(4, 2).double())
    torch.autograd.grad(loss2.loss_per_sample.mean(), gsm2.take_output_edges())
    with pytest.raises(ValueError, match=r"coef must have shape \(5,\)"):
        gsm2.add_clipped_sum(torch.ones(4, dtype=torch.float64))
    assert all(p.grad is None for p in gsm2.parameters())


def test_a_batch_gradient_sum_becomes_p_grad_only_when_it_is_a_tensor_of_its_own() -> None:
    """p.grad is changed in place later, so a sum that is a view, one of the call's inputs or
    returned for two parameters is copied; a fresh tensor is taken as it is."""
    from dp_torch.grad_sample._clipped_sum import _owned_sums
    from dp_torch.grad_sample.grad_sample_module import _Activations

    x, fresh = torch.randn(4, 3), torch.randn(3)
    w, b, c, d = (nn.Parameter(torch.zeros(3)) for _ in range(4))
    owned = _owned_sums({w: fresh, b: fresh, c: x, d: x[1]}, _Activations([x], {}, (0,)))
    assert owned[w] is fresh
    shared = {t.untyped_storage().data_ptr() for t in (fresh, x)}
    for p, want in ((b, fresh), (c, x), (d, x[1])):
        assert owned[p].untyped_storage().data_ptr() not in shared
        assert torch.equal(owned[p], want)


def test_unhooked_layer_under_strict_false_is_refused_in_forward_bookkeeping() -> None:
    """A layer left without hooks (strict=False) would get no gradient from the kept tensors:
    its use is reported instead of silently dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    gsm, loss = _small_ghost_step(model, strict=False)
    with pytest.raises(ValueError, match=r"\['1.bias', '1.weight'\].*strict=False"):
        loss.backward()
    assert all(p.grad is None for p in gsm.parameters())


@pytest.mark.parametrize("use_ghost_clipping", [True, False])
def test_an_example_with_a_non_finite_gradient_adds_exactly_nothing(use_ghost_clipping) -> None:
    """Factor 0 for a non-finite norm, and no ``0 * inf = nan`` of it reaches ``p.grad``: the
    clipped sum equals the one of the batch without that example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    x_bad = x.clone()
    x_bad[2, 0] = float("inf")
    grads, dropped = [], []
    for inputs, keep in [(x_bad, slice(None)), (x[[0, 1, 3, 4]], slice(None))]:
        gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=0.3, loss_reduction="sum",
                                                   use_ghost_clipping=use_ghost_clipping)
        criterion = DPLossFastGradientClipping(gsm, _Opt("sum"), nn.MSELoss(reduction="sum"), "sum")
        criterion(gsm(inputs[keep]), torch.zeros(len(inputs), 2, dtype=torch.float64)).backward()
        grads.append([p.grad.clone() for p in gsm.parameters()])
        dropped.append(gsm.num_nonfinite_grad_samples)
    assert dropped == [1, 0]
    for bad, clean in zip(*grads):
        assert torch.isfinite(bad).all()
        assert_close(bad.numpy(), clean.numpy(), rtol=1e-12)
