"""GradSampleModule API: Opacus-compatible names, hooks, accumulation and its guard, registry."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import dp_torch.grad_sample as gs
import dp_torch.grad_sample.grad_sample_module as gsm_impl
from dp_torch.grad_sample import (
    GradSampleHooks,
    GradSampleModule,
    GradSampleModuleFastGradientClipping,
    GradSampleModuleFastGradientClippingFSDP,
    get_gsm_class,
    register_grad_sampler,
    wrap_model,
)
from tests.dp_torch.test_grad_sample_oracle import (
    Case,
    assert_grads_close,
    batch_loss,
    loop_per_example_grads,
    trainable_named,
)
from tests.tolerance import assert_close


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _case(model: nn.Module, x: torch.Tensor) -> Case:
    return Case(model, (x,), lambda i: (x[i : i + 1],), x.shape[0])


def _grad_samples(model: nn.Module) -> dict:
    return {n: p.grad_sample for n, p in trainable_named(model).items()}


# --------------------------------------------------------------------------- wrapper basics


def test_state_dict_parameters_and_submodules_follow_opacus() -> None:
    model = _mlp()
    gsm = GradSampleModule(model)
    assert list(gsm.state_dict()) == [f"_module.{k}" for k in model.state_dict()]
    assert [p for p in gsm.parameters()] == [p for p in model.parameters()]
    assert gsm._module is model
    assert getattr(gsm, "0") is model[0]  # submodules by name, as Opacus' __getattr__
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(gsm(x), model(x))
    assert repr(gsm).startswith("GradSampleModule(Sequential(")
    with pytest.raises(AttributeError):
        gsm.no_such_attribute


def test_trainable_parameters_start_with_grad_sample_none() -> None:
    model = _mlp()
    model[2].bias.requires_grad_(False)
    GradSampleModule(model)
    assert model[0].weight.grad_sample is None
    assert not hasattr(model[2].bias, "grad_sample")


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_grad_sample(set_to_none: bool) -> None:
    gsm = GradSampleModule(_mlp())
    gsm(torch.randn(3, 3, dtype=torch.float64)).sum().backward()
    gsm.zero_grad(set_to_none=set_to_none)
    for p in gsm.parameters():
        assert p.grad_sample is None
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


def test_disable_enable_and_remove_hooks() -> None:
    gsm = GradSampleModule(_mlp())
    x = torch.randn(3, 3, dtype=torch.float64)
    gsm.disable_hooks()
    gsm(x).sum().backward()
    assert all(p.grad_sample is None for p in gsm.parameters())
    gsm.enable_hooks()
    gsm.zero_grad()
    gsm(x).sum().backward()
    assert all(p.grad_sample is not None for p in gsm.parameters())
    gsm.zero_grad()
    out = gsm(x)  # graph recorded while hooks were on
    gsm.remove_hooks()
    out.sum().backward()
    assert all(p.grad_sample is None for p in gsm.parameters())
    assert not hasattr(gsm._module, "autograd_grad_sample_hooks")
    gsm.add_hooks()
    gsm(x).sum().backward()
    assert all(p.grad_sample is not None for p in gsm.parameters())


def test_adding_hooks_twice_raises() -> None:
    model = _mlp()
    gsm = GradSampleModule(model)
    with pytest.raises(ValueError, match="twice"):
        GradSampleModule(model)
    with pytest.raises(ValueError, match="twice"):
        gsm.add_hooks()


def test_to_standard_module_removes_every_trace() -> None:
    model = _mlp()
    gsm = GradSampleModule(model)
    gsm(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    assert gsm.to_standard_module() is model
    for p in model.parameters():
        assert not hasattr(p, "grad_sample")
    GradSampleModule(model)  # can be wrapped again


@pytest.mark.parametrize("kwargs, error", [
    ({"loss_reduction": "avg"}, ValueError),
    ({"batch_first": 1}, TypeError),
    ({"strict": "yes"}, TypeError),
])
def test_invalid_arguments_raise_before_any_change(kwargs, error) -> None:
    model = _mlp()
    with pytest.raises(error):
        GradSampleModule(model, **kwargs)
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_non_module_is_rejected() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        GradSampleModule(lambda x: x)


# --------------------------------------------------------------------------- validation


def test_validate_rejects_trainable_layers_with_buffers() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    errors = GradSampleModule.validate(model, strict=False)
    assert len(errors) == 1 and "BatchNorm1d" in str(errors[0])
    with pytest.raises(NotImplementedError):
        GradSampleModule(model)
    assert not hasattr(model, "autograd_grad_sample_hooks")
    gsm = GradSampleModule(model, strict=False)  # best effort: the BatchNorm gets no hooks
    gsm(torch.randn(4, 3)).sum().backward()
    assert model[0].weight.grad_sample is not None
    assert model[1].weight.grad_sample is None
    model[1].requires_grad_(False)
    assert GradSampleModule.validate(model, strict=True) == []


def test_is_supported() -> None:
    assert GradSampleModule.is_supported(nn.Conv2d(1, 1, 1))
    assert GradSampleModule.is_supported(nn.PReLU())  # torch.func fallback
    assert not GradSampleModule.is_supported(nn.BatchNorm2d(3))
    assert not GradSampleModule.is_supported(nn.EmbeddingBag(3, 2, mode="max"))
    assert not GradSampleModule.is_supported(nn.EmbeddingBag(3, 2, scale_grad_by_freq=True))
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        GradSampleModule(nn.EmbeddingBag(3, 2, scale_grad_by_freq=True))


# --------------------------------------------------------------------------- modes and factories


def test_get_gsm_class_and_wrap_model() -> None:
    assert get_gsm_class("hooks") is GradSampleModule
    assert get_gsm_class("functorch") is GradSampleModule
    assert get_gsm_class("ghost") is GradSampleModuleFastGradientClipping
    assert get_gsm_class("ghost_fsdp") is GradSampleModuleFastGradientClippingFSDP
    with pytest.raises(ValueError, match="grad_sample_mode"):
        get_gsm_class("ghost_tp")
    wrapped = wrap_model(_mlp(), grad_sample_mode="functorch", batch_first=True, loss_reduction="sum")
    assert isinstance(wrapped, GradSampleModule) and wrapped.force_functorch
    assert wrapped.loss_reduction == "sum"
    ghost = wrap_model(_mlp(), "ghost", max_grad_norm=2.0)
    assert isinstance(ghost, GradSampleModuleFastGradientClipping) and ghost.max_grad_norm == 2.0
    hooks = wrap_model(_mlp(), "hooks", wrap_model=False)
    assert isinstance(hooks, GradSampleHooks) and not isinstance(hooks, nn.Module)


def test_hooks_without_wrapping_compute_grad_samples() -> None:
    model = _mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    case = _case(model, x)
    expected, _ = loop_per_example_grads(case)
    GradSampleHooks(model, loss_reduction="sum")
    batch_loss(case, model(x), "sum").backward()
    assert_grads_close(_grad_samples(model), expected, torch.float64)


# --------------------------------------------------------------------------- accumulation


def test_accumulation_appends_one_entry_per_backward() -> None:
    model = _mlp()
    x1, x2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    exp1, _ = loop_per_example_grads(_case(model, x1))
    exp2, _ = loop_per_example_grads(c2 := _case(model, x2))
    gsm = GradSampleModule(copy.deepcopy(model))
    c1 = _case(model, x1)
    batch_loss(c1, gsm(x1), "mean").backward()
    batch_loss(c2, gsm(x2), "mean").backward()
    for name, p in trainable_named(gsm).items():
        assert isinstance(p.grad_sample, list) and len(p.grad_sample) == 2
        assert_grads_close({name: torch.cat(p.grad_sample)}, {name: torch.cat([exp1[name], exp2[name]])},
                           torch.float64)


def test_two_forwards_one_backward_sum_per_example() -> None:
    """Two calls of the model in one pass: contributions are summed (one entry, not a list)."""
    model = _mlp()
    x = torch.randn(3, 3, dtype=torch.float64)
    gsm = GradSampleModule(model, loss_reduction="sum")
    (gsm(x).sum() + gsm(2 * x).pow(2).sum()).backward()
    for p in gsm.parameters():
        assert isinstance(p.grad_sample, torch.Tensor)
        assert_close(p.grad_sample.sum(0).numpy(), p.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_poisson_guard_raises_with_explanation_and_changes_nothing() -> None:
    gsm = GradSampleModule(_mlp())
    gsm.forbid_grad_accumulation()
    x = torch.randn(3, 3, dtype=torch.float64)
    gsm(x).sum().backward()
    before = {n: (p.grad.clone(), p.grad_sample.clone()) for n, p in gsm.named_parameters()}
    with pytest.raises(ValueError) as info:
        gsm(x).sum().backward()
    message = str(info.value)
    for phrase in ("Poisson sampling", "gradient accumulation", "optimizer.step()", "zero_grad()",
                   "BatchMemoryManager"):
        assert phrase in message
    for n, p in gsm.named_parameters():  # the failed backward changed no state
        assert torch.equal(p.grad, before[n][0])
        assert torch.equal(p.grad_sample, before[n][1])
    gsm.zero_grad()
    gsm(x).sum().backward()  # after clearing, a new step is fine
    assert all(isinstance(p.grad_sample, torch.Tensor) for p in gsm.parameters())
    gsm.allow_grad_accumulation()
    gsm(x).sum().backward()
    assert all(isinstance(p.grad_sample, list) for p in gsm.parameters())


# --------------------------------------------------------------------------- robustness


def test_forward_without_backward_does_not_shift_later_pairing() -> None:
    model = _mlp()
    x_eval, x = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    case = _case(model, x)
    expected, _ = loop_per_example_grads(case)
    gsm = GradSampleModule(copy.deepcopy(model))
    _ = gsm(x_eval)  # gradients enabled, never backpropagated
    batch_loss(case, gsm(x), "mean").backward()
    assert_grads_close(_grad_samples(gsm), expected, torch.float64)


def test_eval_mode_still_records() -> None:
    model = _mlp()
    x = torch.randn(3, 3, dtype=torch.float64)
    case = _case(model, x)
    expected, _ = loop_per_example_grads(case)
    gsm = GradSampleModule(copy.deepcopy(model)).eval()
    batch_loss(case, gsm(x), "mean").backward()
    assert_grads_close(_grad_samples(gsm), expected, torch.float64)


def test_no_grad_forward_records_nothing() -> None:
    gsm = GradSampleModule(_mlp())
    with torch.no_grad():
        gsm(torch.randn(2, 3, dtype=torch.float64))
    assert all(p.grad_sample is None for p in gsm.parameters())


@pytest.mark.parametrize("layer, x", [
    (nn.Linear(3, 2), torch.randn(0, 3)),
    (nn.Conv2d(2, 3, 3, padding=1), torch.randn(0, 2, 4, 4)),
    (nn.Embedding(5, 2), torch.randint(0, 5, (0, 3))),
    (nn.LayerNorm(3), torch.randn(0, 3)),
])
def test_empty_batch_gives_empty_grad_samples(layer, x) -> None:
    gsm = GradSampleModule(layer)
    gsm(x).sum().backward()
    for p in gsm.parameters():
        assert tuple(p.grad_sample.shape) == (0, *p.shape)


def test_multi_output_layer_is_reported() -> None:
    gsm = GradSampleModule(nn.Sequential(nn.MultiheadAttention(4, 2)))
    x = torch.randn(3, 2, 4)
    with pytest.raises(NotImplementedError, match="single tensor"):
        gsm._module[0](x, x, x)


# --------------------------------------------------------------------------- registry


def test_registered_samplers_are_used_not_the_fallback(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("torch.func fallback used for a layer with a sampler")

    monkeypatch.setattr(gsm_impl, "ft_compute_per_sample_gradient", boom)
    model = nn.Sequential(nn.Conv1d(2, 2, 2), nn.GroupNorm(1, 2), nn.InstanceNorm1d(2, affine=True),
                          nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3), nn.RMSNorm(3))
    gsm = GradSampleModule(model)
    gsm(torch.randn(2, 2, 3)).sum().backward()
    gsm2 = GradSampleModule(nn.Sequential(nn.Embedding(4, 2), nn.Flatten()))
    gsm2(torch.randint(0, 4, (2, 3))).sum().backward()
    gsm3 = GradSampleModule(nn.EmbeddingBag(4, 2))
    gsm3(torch.randint(0, 4, (2, 3))).sum().backward()


class _Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def test_register_grad_sampler_and_subclass_resolution(monkeypatch) -> None:
    calls = []

    class Custom(_Doubler):
        pass

    @register_grad_sampler(Custom)
    def sampler(layer, activations, backprops):
        calls.append(type(layer))
        return {layer.w: activations[0] * backprops}

    class SubCustom(Custom):  # inherits forward: resolved to Custom's sampler
        pass

    class Overriding(Custom):  # overrides forward: must not use Custom's sampler
        def forward(self, x):
            return x * self.w.pow(3)

    try:
        x = torch.randn(3, 2, dtype=torch.float64)
        for cls in (Custom, SubCustom, Overriding):
            model = cls()
            case = _case(model, x)
            expected, _ = loop_per_example_grads(case)
            gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
            batch_loss(case, gsm(x), "sum").backward()
            assert_grads_close(_grad_samples(gsm), expected, torch.float64)
        assert calls == [Custom, SubCustom]
        assert gs.utils.register_grad_sampler is register_grad_sampler
    finally:
        gs.GradSampleModule.GRAD_SAMPLERS.pop(Custom, None)


def test_register_grad_sampler_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        register_grad_sampler(int)
