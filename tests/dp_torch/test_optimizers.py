"""Tests of dp_torch.optimizers against explicit loops and dpcore's reference math.

Per-sample gradients are set by hand (closed form for a linear model with a
squared loss), so these tests do not depend on the grad_sample machinery.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from dp_torch.optimizers import (
    AdaClipDPOptimizer,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
    get_optimizer_class,
)
from dpcore import clipping as core_clipping
from dpcore.noise import NoiseSource
from tests.tolerance import assert_close

NOT_CLEARED = "Gradients haven't been cleared since the last optimizer step"


# --------------------------------------------------------------------------- fixtures


def linear_model(in_features: int = 3, out_features: int = 2, *, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).to(dtype)


def set_hand_grad_samples(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    """Per-example gradients of 0.5 * ||W x + b - y||^2, in closed form."""
    with torch.no_grad():
        residual = x @ model.weight.T + model.bias - y  # [B, out]
        model.weight.grad_sample = torch.einsum("bo,bi->boi", residual, x)
        model.bias.grad_sample = residual.clone()


def batch(n: int, in_features: int = 3, out_features: int = 2, *, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=dtype) * 3.0
    y = torch.randn(n, out_features, generator=g, dtype=dtype)
    return x, y


def np_grads(model: nn.Module) -> list[np.ndarray]:
    return [p.grad_sample.detach().double().numpy() for p in model.parameters()]


def explicit_clipped_sum(per_example: list[np.ndarray], c: float) -> list[np.ndarray]:
    """The flat rule written as a loop over examples (independent of dpcore)."""
    n = per_example[0].shape[0]
    out = [np.zeros(g.shape[1:]) for g in per_example]
    for i in range(n):
        norm = math.sqrt(sum(float(np.sum(g[i] ** 2)) for g in per_example))
        factor = min(1.0, c / (norm + 1e-6))
        for acc, g in zip(out, per_example):
            acc += factor * g[i]
    return out


def make_dp(model, *, cls=DPOptimizer, lr=1.0, **kwargs):
    defaults = dict(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=5)
    defaults.update(kwargs)
    return cls(torch.optim.SGD(model.parameters(), lr=lr), **defaults)


# --------------------------------------------------------------------------- clipping


def test_hand_grad_samples_match_autograd():
    model = linear_model()
    x, y = batch(4)
    set_hand_grad_samples(model, x, y)
    for i in range(4):
        model.zero_grad()
        loss = 0.5 * ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum()
        loss.backward()
        for p in model.parameters():
            assert_close(p.grad_sample[i], p.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", [0.5, 3.0, 1e6])
def test_clip_and_accumulate_equals_explicit_clipped_sum(c):
    model = linear_model()
    x, y = batch(7)
    set_hand_grad_samples(model, x, y)
    per_example = np_grads(model)
    opt = make_dp(model, max_grad_norm=c)
    opt.clip_and_accumulate()
    got = [p.summed_grad.numpy() for p in model.parameters()]
    assert_close(got, explicit_clipped_sum(per_example, c), rtol=1e-10, atol=1e-12)
    assert_close(got, core_clipping.clip_and_sum(per_example, c), rtol=1e-10, atol=1e-12)
    # the clip really binds for small c: some example norms exceed it
    norms = core_clipping.per_example_norms(per_example)
    assert (norms > c).any() == (c < 1e6)


def test_clip_and_accumulate_float32_matches_float64_reference():
    model = linear_model(dtype=torch.float32)
    x, y = batch(9, dtype=torch.float32)
    set_hand_grad_samples(model, x, y)
    per_example = np_grads(model)
    opt = make_dp(model, max_grad_norm=0.8)
    opt.clip_and_accumulate()
    got = [p.summed_grad.numpy() for p in model.parameters()]
    assert all(p.summed_grad.dtype == torch.float32 for p in model.parameters())
    assert_close(got, core_clipping.clip_and_sum(per_example, 0.8), rtol=1e-5, atol=1e-6)


def _set_two_grad_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, split: int) -> None:
    """Set each parameter's ``grad_sample`` to a list: rows before ``split``, then the rest."""
    set_hand_grad_samples(model, x[:split], y[:split])
    first = [p.grad_sample for p in model.parameters()]
    set_hand_grad_samples(model, x[split:], y[split:])
    for p, g in zip(model.parameters(), first):
        p.grad_sample = [g, p.grad_sample]


def test_clip_accumulates_over_list_grad_samples():
    model = linear_model()
    x, y = batch(6)
    _set_two_grad_samples(model, x, y, split=4)
    opt = make_dp(model, max_grad_norm=0.7)
    assert opt.accumulated_iterations == 2
    opt.clip_and_accumulate()
    set_hand_grad_samples(model, x, y)
    want = core_clipping.clip_and_sum(np_grads(model), 0.7)
    assert_close([p.summed_grad.numpy() for p in model.parameters()], want, rtol=1e-10)


def test_per_layer_clipping_matches_explicit_loop_and_dpcore():
    model = linear_model()
    x, y = batch(8)
    set_hand_grad_samples(model, x, y)
    per_example = np_grads(model)
    bounds = [0.6, 0.25]
    opt = make_dp(model, cls=DPPerLayerOptimizer, max_grad_norm=bounds)
    assert opt.max_grad_norms == bounds
    assert_close(opt.max_grad_norm, math.sqrt(0.6**2 + 0.25**2), rtol=1e-15)
    opt.clip_and_accumulate()
    got = [p.summed_grad.numpy() for p in model.parameters()]
    explicit = []
    for g, c in zip(per_example, bounds):
        acc = np.zeros(g.shape[1:])
        for i in range(g.shape[0]):
            acc += min(1.0, c / (np.linalg.norm(g[i]) + 1e-6)) * g[i]
        explicit.append(acc)
    assert_close(got, explicit, rtol=1e-10, atol=1e-12)
    assert_close(got, core_clipping.clip_and_sum_per_layer(per_example, bounds), rtol=1e-10)
    # per-layer really differs from flat clipping here
    flat = core_clipping.clip_and_sum(per_example, opt.max_grad_norm)
    assert not np.allclose(flat[0], got[0])


def test_per_layer_validation():
    model = linear_model()
    with pytest.raises(ValueError, match="one bound per parameter"):
        make_dp(model, cls=DPPerLayerOptimizer, max_grad_norm=[1.0])
    opt = make_dp(model, cls=DPPerLayerOptimizer, max_grad_norm=[1.0, 2.0])
    with pytest.raises(ValueError, match="max_grad_norms"):
        opt.max_grad_norm = 0.5
    opt.max_grad_norms = [3.0, 4.0]
    assert opt.max_grad_norm == pytest.approx(5.0)


@pytest.mark.parametrize("cls", [DPOptimizer, DPPerLayerOptimizer])
def test_nonfinite_example_is_dropped_not_propagated(cls):
    model = linear_model()
    x, y = batch(5)
    set_hand_grad_samples(model, x, y)
    model.weight.grad_sample[2, 0, 1] = float("nan")
    model.bias.grad_sample[4, 0] = float("inf")
    per_example = np_grads(model)
    kwargs = {"max_grad_norm": [0.5, 0.5]} if cls is DPPerLayerOptimizer else {"max_grad_norm": 0.5}
    opt = make_dp(model, cls=cls, **kwargs)
    opt.clip_and_accumulate()
    got = [p.summed_grad.numpy() for p in model.parameters()]
    assert all(np.isfinite(g).all() for g in got)
    assert opt.num_nonfinite_grad_samples == 2
    if cls is DPOptimizer:
        want = core_clipping.clip_and_sum(per_example, 0.5)
    else:
        want = core_clipping.clip_and_sum_per_layer(per_example, [0.5, 0.5])
    assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- step semantics


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_noise_step_is_sgd_on_clipped_sum_over_expected_batch_size(reduction, dtype):
    model = linear_model(dtype=dtype)
    x, y = batch(7, dtype=dtype)  # realised batch 7, expected 5: the denominator must be 5
    set_hand_grad_samples(model, x, y)
    per_example = np_grads(model)
    before = [p.detach().double().numpy().copy() for p in model.parameters()]
    opt = make_dp(model, lr=0.3, max_grad_norm=0.9, expected_batch_size=5, loss_reduction=reduction)
    opt.step()
    denominator = 5 if reduction == "mean" else 1
    clipped = explicit_clipped_sum(per_example, 0.9)
    want = [b - 0.3 * s / denominator for b, s in zip(before, clipped)]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    got = [p.detach().double().numpy() for p in model.parameters()]
    assert_close(got, want, rtol=tol, atol=tol)


def test_private_with_zero_noise_and_huge_clip_equals_vanilla_sgd():
    model = linear_model()
    twin = linear_model()
    x, y = batch(5)
    set_hand_grad_samples(model, x, y)
    opt = make_dp(model, lr=0.1, max_grad_norm=1e9, expected_batch_size=5)
    opt.step()
    vanilla = torch.optim.SGD(twin.parameters(), lr=0.1)
    (0.5 * ((twin(x) - y) ** 2).sum(dim=1).mean()).backward()
    vanilla.step()
    assert_close(
        [p.detach().numpy() for p in model.parameters()],
        [p.detach().numpy() for p in twin.parameters()],
        rtol=1e-10,
        atol=1e-12,
    )


def test_step_with_closure_returns_loss_and_works_with_adam():
    model = linear_model()
    x, y = batch(4)
    opt = DPOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01),
        noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4,
    )

    def closure():
        set_hand_grad_samples(model, x, y)
        return torch.tensor(3.5)

    assert opt.step(closure) == 3.5
    assert len(opt.state) == 2  # Adam state passed through
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    opt.load_state_dict(sd)
    assert opt.param_groups is opt.original_optimizer.param_groups
    assert opt.defaults["lr"] == 0.01


def test_lr_scheduler_works_on_dp_optimizer_without_warnings():
    model = linear_model()
    opt = make_dp(model, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(3)
    set_hand_grad_samples(model, x, y)
    opt.step()
    opt.zero_grad()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


# --------------------------------------------------------------------------- noise


def _noise_draw(generator=None, secure_mode=False, sigma=1.3, c=0.7):
    """p.grad of a zero-gradient step with loss_reduction='sum': pure noise, 50,200 coords."""
    model = nn.Linear(250, 200)
    for p in model.parameters():
        p.grad_sample = torch.zeros(2, *p.shape)
    opt = make_dp(
        model, noise_multiplier=sigma, max_grad_norm=c, loss_reduction="sum",
        expected_batch_size=None, generator=generator, secure_mode=secure_mode,
    )
    opt.step()
    return np.concatenate([p.grad.detach().double().numpy().ravel() for p in model.parameters()])


@pytest.mark.parametrize(
    "mode", ["torch_generator", "noise_source", "secure_mode", "secure_noise_source"]
)
def test_noise_std_is_sigma_times_c_and_rejects_wrong_scales(mode):
    generator = {
        "torch_generator": torch.Generator().manual_seed(11),
        "noise_source": NoiseSource(seed=11),
        "secure_mode": None,
        "secure_noise_source": NoiseSource(secure_mode=True),
    }[mode]
    noise = _noise_draw(generator, secure_mode=mode.startswith("secure"))
    std = 1.3 * 0.7
    # the seeded modes are deterministic; the secure ones fail with probability 1e-6
    assert stats.kstest(noise, "norm", args=(0.0, std)).pvalue > 1e-6
    for wrong in (0.9 * std, 1.1 * std):
        assert stats.kstest(noise, "norm", args=(0.0, wrong)).pvalue < 1e-12


def test_noise_source_reproducibility_matches_oracle():
    model_a, model_b = linear_model(), linear_model()
    x, y = batch(6)
    grads = []
    for model in (model_a, model_b):
        set_hand_grad_samples(model, x, y)
        opt = make_dp(
            model, noise_multiplier=1.1, max_grad_norm=0.5, expected_batch_size=4,
            generator=NoiseSource(seed=123),
        )
        opt.pre_step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    # oracle: float64 draws in parameter order, cast, added to the clipped sum, divided by 4
    set_hand_grad_samples(model_a, x, y)
    clipped = core_clipping.clip_and_sum(np_grads(model_a), 0.5)
    source = NoiseSource(seed=123)
    want = [(s + source.normal(s.shape, 1.1 * 0.5)) / 4 for s in clipped]
    assert_close([g.numpy() for g in grads[0]], want, rtol=1e-10, atol=1e-12)
    # another seed gives other noise
    set_hand_grad_samples(model_b, x, y)
    model_b.weight.summed_grad = None
    model_b.bias.summed_grad = None
    other = make_dp(model_b, noise_multiplier=1.1, max_grad_norm=0.5, expected_batch_size=4,
                    generator=NoiseSource(seed=124))
    other.pre_step()
    assert not torch.equal(model_b.weight.grad, grads[0][0])


def test_torch_generator_reproducibility():
    draws = [_noise_draw(torch.Generator().manual_seed(5))[:100] for _ in range(2)]
    assert np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], _noise_draw(torch.Generator().manual_seed(6))[:100])


def test_secure_mode_refuses_seeded_generators():
    model = linear_model()
    with pytest.raises(ValueError, match="secure_mode"):
        make_dp(model, secure_mode=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="seeded"):
        make_dp(model, secure_mode=True, generator=NoiseSource(seed=0))
    with pytest.raises(TypeError, match="generator"):
        make_dp(model, generator=np.random.default_rng(0))


def test_secure_mode_adds_in_float64_and_rounds_once():
    model = linear_model(dtype=torch.float32)
    x, y = batch(3, dtype=torch.float32)
    set_hand_grad_samples(model, x, y)
    opt = make_dp(model, noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=True,
                  loss_reduction="sum", expected_batch_size=None)
    opt.step()
    for p in model.parameters():
        assert p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
        assert not torch.equal(p.grad, p.summed_grad)


# --------------------------------------------------------------------------- zero_grad checks


def test_gradients_not_cleared_error_and_state_untouched():
    model = linear_model()
    x, y = batch(4)
    set_hand_grad_samples(model, x, y)
    opt = make_dp(model, noise_multiplier=0.5)
    opt.step()
    after_first = [p.detach().clone() for p in model.parameters()]
    summed = [p.summed_grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=NOT_CLEARED):
        opt.step()  # same grad_sample again
    # a new backward without zero_grad appends to the list: still refused
    old = [p.grad_sample for p in model.parameters()]
    set_hand_grad_samples(model, x, y)
    for p, g in zip(model.parameters(), old):
        p.grad_sample = [g, p.grad_sample]
    with pytest.raises(ValueError, match=NOT_CLEARED):
        opt.step()
    for p, a, s in zip(model.parameters(), after_first, summed):
        assert torch.equal(p.detach(), a)
        assert torch.equal(p.summed_grad, s)
    opt.zero_grad()
    set_hand_grad_samples(model, x, y)
    opt.step()  # fine after zero_grad


def _dp_with_grad_samples(n: int):
    """A linear model with hand-set per-sample gradients of ``n`` examples, and its DPOptimizer."""
    model = linear_model()
    set_hand_grad_samples(model, *batch(n))
    return model, make_dp(model)


def test_add_noise_twice_is_refused():
    model, opt = _dp_with_grad_samples(4)
    opt.clip_and_accumulate()
    opt.add_noise()
    with pytest.raises(ValueError, match=NOT_CLEARED):
        opt.add_noise()


@pytest.mark.parametrize("zero_grad_first", [False, True], ids=["fresh", "after-zero-grad"])
def test_missing_grad_sample_module_is_reported(zero_grad_first):
    model = linear_model()
    opt = make_dp(model)
    if zero_grad_first:
        opt.zero_grad()  # sets p.grad_sample = None and zeroes p.grad
    x, y = batch(3)
    (0.5 * ((model(x) - y) ** 2).sum()).backward()
    with pytest.raises(ValueError, match="Per sample gradient not found"):
        opt.step()


def test_zero_grad_clears_grad_sample_and_summed_grad():
    model, opt = _dp_with_grad_samples(3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        assert p.grad_sample is None and p.summed_grad is None and p.grad is None


# --------------------------------------------------------------------------- skip / hooks / empty


def test_signal_skip_step_accumulates_then_steps_once():
    model = linear_model()
    x, y = batch(9)
    set_hand_grad_samples(model, x, y)
    full = core_clipping.clip_and_sum(np_grads(model), 0.6)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    opt = make_dp(model, lr=1.0, max_grad_norm=0.6, expected_batch_size=6)
    opt.attach_step_hook(lambda o: calls.append(o.accumulated_iterations))
    for chunk, skip in ((slice(0, 4), True), (slice(4, 9), False)):
        set_hand_grad_samples(model, x[chunk], y[chunk])
        opt.signal_skip_step(do_skip=skip)
        opt.step()
        if skip:
            assert opt._is_last_step_skipped
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p.detach(), b)  # no update on a skipped step
            assert calls == []
        opt.zero_grad()
        if skip:
            assert all(p.summed_grad is not None for p in model.parameters())
    assert calls == [1]
    want = [b.numpy() - s / 6 for b, s in zip(before, full)]
    assert_close([p.detach().numpy() for p in model.parameters()], want, rtol=1e-10)
    assert all(p.summed_grad is None for p in model.parameters())


def test_accumulated_iterations_scale_the_denominator():
    model = linear_model()
    x, y = batch(8)
    set_hand_grad_samples(model, x, y)
    full = core_clipping.clip_and_sum(np_grads(model), 1.0)
    _set_two_grad_samples(model, x, y, split=4)
    opt = make_dp(model, expected_batch_size=4)
    opt.pre_step()
    assert_close([p.grad.numpy() for p in model.parameters()], [s / 8 for s in full], rtol=1e-10)
    model.bias.grad_sample = [model.bias.grad_sample[0]]
    with pytest.raises(ValueError, match="inconsistent"):
        _ = opt.accumulated_iterations


def test_step_hook_fires_once_per_logical_step():
    model = linear_model()
    seen = []
    opt = make_dp(model, noise_multiplier=0.8)
    opt.attach_step_hook(lambda o: seen.append((o, o.noise_multiplier)))
    for step in range(3):
        x, y = batch(4, seed=step)
        set_hand_grad_samples(model, x, y)
        opt.step()
        opt.zero_grad()
    assert [s[1] for s in seen] == [0.8, 0.8, 0.8]
    assert all(s[0] is opt for s in seen)


@pytest.mark.parametrize("empty_kind", ["zero_rows", "no_grad_sample"])
def test_empty_batch_is_a_real_step(empty_kind):
    model = linear_model()
    if empty_kind == "zero_rows":
        for p in model.parameters():
            p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype)
    hooks = []
    opt = make_dp(model, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4,
                  generator=NoiseSource(seed=9))
    opt.attach_step_hook(hooks.append)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert hooks == [opt]
    source = NoiseSource(seed=9)
    noise = [source.normal(tuple(p.shape), 2.0 * 0.5) / 4 for p in model.parameters()]
    assert_close([p.grad.numpy() for p in model.parameters()], noise, rtol=1e-12)
    assert_close(
        [p.detach().numpy() for p in model.parameters()],
        [b.numpy() - n for b, n in zip(before, noise)],
        rtol=1e-12,
    )
    opt.zero_grad()
    opt.step()  # a second empty step after zero_grad works too
    assert len(hooks) == 2


def test_parameter_without_grad_sample_contributes_zero():
    model = linear_model()
    x, y = batch(5)
    set_hand_grad_samples(model, x, y)
    weight_only = np_grads(model)[:1]
    model.bias.grad_sample = None
    opt = make_dp(model, max_grad_norm=0.4)
    opt.clip_and_accumulate()
    want = core_clipping.clip_and_sum(weight_only, 0.4)[0]
    assert_close(model.weight.summed_grad.numpy(), want, rtol=1e-10)
    assert torch.equal(model.bias.summed_grad, torch.zeros_like(model.bias))


# --------------------------------------------------------------------------- adaptive clipping


ADA = dict(
    target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=100.0,
    min_clipbound=0.01, unclipped_num_std=2.0,
)


def test_adaclip_noise_split_and_update_match_dpcore():
    model = linear_model()
    x, y = batch(10)
    set_hand_grad_samples(model, x, y)
    per_example = np_grads(model)
    hooks = []
    opt = make_dp(model, cls=AdaClipDPOptimizer, noise_multiplier=1.5, max_grad_norm=2.0,
                  expected_batch_size=8, generator=NoiseSource(seed=3), **ADA)
    opt.attach_step_hook(lambda o: hooks.append(o.noise_multiplier))
    z_grad = core_clipping.adaptive_noise_multipliers(1.5, 2.0, 8)
    assert opt.gradient_noise_multiplier == pytest.approx(z_grad, rel=1e-15)
    assert z_grad > 1.5
    opt.step()
    assert hooks == [1.5]  # the accountant sees the user's sigma
    source = NoiseSource(seed=3)
    clipped = core_clipping.clip_and_sum(per_example, 2.0)
    noise = [source.normal(s.shape, z_grad * 2.0) for s in clipped]
    count_noise = float(source.normal((), 2.0))
    assert_close([p.grad.numpy() for p in model.parameters()],
                 [(s + n) / 8 for s, n in zip(clipped, noise)], rtol=1e-10, atol=1e-12)
    norms = core_clipping.per_example_norms(per_example)
    count = core_clipping.count_unclipped(norms, 2.0)
    assert 0 < count < 10
    want_c = core_clipping.adaptive_clip_update(2.0, count, count_noise, 8, 0.5, 0.2, 0.01, 100.0,
                                                batch_size=10)
    assert opt.max_grad_norm == pytest.approx(want_c, rel=1e-12)


@pytest.mark.parametrize("start", [0.5, 40.0])
def test_adaclip_bound_moves_towards_target_quantile(start):
    # per-example gradients with norms spread uniformly over [1, 9]: median 5
    model = nn.Linear(1, 1, bias=False).double()
    norms = torch.linspace(1.0, 9.0, 41, dtype=torch.float64)
    opt = make_dp(model, cls=AdaClipDPOptimizer, noise_multiplier=0.5, max_grad_norm=start,
                  expected_batch_size=41, generator=NoiseSource(seed=1), **ADA)
    for _ in range(150):
        model.weight.grad_sample = norms.reshape(41, 1, 1).clone()
        opt.step()
        opt.zero_grad()
    assert 4.0 < opt.max_grad_norm < 6.0
    assert abs(opt.max_grad_norm - 5.0) < abs(start - 5.0)


def test_adaclip_counts_every_chunk_of_a_logical_batch():
    model = linear_model()
    x, y = batch(10)
    set_hand_grad_samples(model, x, y)
    count = core_clipping.count_unclipped(core_clipping.per_example_norms(np_grads(model)), 2.0)
    opt = make_dp(model, cls=AdaClipDPOptimizer, noise_multiplier=0.0, max_grad_norm=2.0,
                  expected_batch_size=10, **ADA)
    for chunk, skip in ((slice(0, 6), True), (slice(6, 10), False)):
        set_hand_grad_samples(model, x[chunk], y[chunk])
        opt.signal_skip_step(skip)
        opt.step()
        if skip:
            opt.zero_grad()  # keeps the counts: the logical step is not over
    assert (opt.sample_size, opt.unclipped_num) == (10, count)
    opt.zero_grad()
    assert (opt.sample_size, opt.unclipped_num) == (0, 0)


def test_adaclip_validation():
    model = linear_model()
    with pytest.raises(ValueError, match="unclipped_num_std"):
        make_dp(model, cls=AdaClipDPOptimizer, noise_multiplier=5.0,
                **{**ADA, "unclipped_num_std": 2.0})
    with pytest.raises(ValueError, match="min_clipbound"):
        make_dp(model, cls=AdaClipDPOptimizer, **{**ADA, "min_clipbound": 200.0})
    with pytest.raises(ValueError, match="expected_batch_size"):
        make_dp(model, cls=AdaClipDPOptimizer, loss_reduction="sum", expected_batch_size=None,
                **ADA)


# --------------------------------------------------------------------------- ghost clipping


def test_fast_gradient_clipping_optimizer_noises_once_and_scales():
    model = linear_model()
    x, y = batch(6)
    set_hand_grad_samples(model, x, y)
    clipped = core_clipping.clip_and_sum(np_grads(model), 0.5)
    hooks = []
    opt = make_dp(model, cls=DPOptimizerFastGradientClipping, noise_multiplier=0.7,
                  max_grad_norm=0.5, expected_batch_size=5, generator=NoiseSource(seed=4))
    opt.attach_step_hook(hooks.append)
    # two physical chunks; the backward pass leaves each chunk's clipped sum in p.grad
    split = [core_clipping.clip_and_sum([g[:2] for g in np_grads(model)], 0.5),
             core_clipping.clip_and_sum([g[2:] for g in np_grads(model)], 0.5)]
    for part, skip in zip(split, (True, False)):
        for p, g in zip(model.parameters(), part):
            p.grad = torch.from_numpy(g.copy())
        opt.signal_skip_step(skip)
        opt.pre_step()
        if skip:
            opt.zero_grad()
    source = NoiseSource(seed=4)
    want = [(s + source.normal(s.shape, 0.35)) / 5 for s in clipped]
    assert_close([p.grad.numpy() for p in model.parameters()], want, rtol=1e-10, atol=1e-12)
    assert len(hooks) == 1 and opt.accumulated_iterations == 1
    with pytest.raises(ValueError, match=NOT_CLEARED):
        opt.pre_step()  # no zero_grad
    opt.zero_grad(set_to_none=True)
    opt.step()  # empty step: p.grad is None, still noised
    assert len(hooks) == 2 and all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- construction


def test_get_optimizer_class():
    assert get_optimizer_class("flat", False) is DPOptimizer
    assert get_optimizer_class("flat", False, "hooks") is DPOptimizer
    assert get_optimizer_class("per_layer", False, "hooks") is DPPerLayerOptimizer
    assert get_optimizer_class("adaptive", False) is AdaClipDPOptimizer
    assert get_optimizer_class("flat", False, "ghost") is DPOptimizerFastGradientClipping
    with pytest.raises(ValueError, match="ghost"):
        get_optimizer_class("per_layer", False, "ghost")
    with pytest.raises(ValueError, match="distributed"):
        get_optimizer_class("adaptive", True)
    with pytest.raises(ValueError, match="clipping"):
        get_optimizer_class("bogus", False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"loss_reduction": "avg"}, ValueError, "loss_reduction"),
        ({"expected_batch_size": None}, ValueError, "expected_batch_size"),
        ({"expected_batch_size": 0}, ValueError, "expected_batch_size"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"secure_mode": "yes"}, TypeError, "secure_mode"),
    ],
)
def test_constructor_validation(kwargs, error, match):
    model = linear_model()
    with pytest.raises(error, match=match):
        make_dp(model, **kwargs)
    with pytest.raises(TypeError, match="optimizer"):
        DPOptimizer(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1)


def test_sum_reduction_needs_no_expected_batch_size_and_params_skip_frozen():
    model = linear_model()
    model.bias.requires_grad_(False)
    opt = make_dp(model, loss_reduction="sum", expected_batch_size=None)
    assert opt.params == [model.weight]
    x, y = batch(3)
    set_hand_grad_samples(model, x, y)
    opt.step()
    assert model.bias.grad is None
