"""Tests of dp_torch.schedulers: closed-form schedules, checkpointing, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dp_torch.optimizers import DPOptimizer, DPPerLayerOptimizer
from dp_torch.schedulers import (
    ExponentialGradClip,
    ExponentialNoise,
    LambdaGradClip,
    LambdaNoise,
    StepGradClip,
    StepNoise,
)
from dpcore.noise import NoiseSource
from tests.tolerance import assert_close

SIGMA0, C0 = 2.0, 3.0


def dp_optimizer(generator=None) -> DPOptimizer:
    model = nn.Linear(3, 2).double()
    return DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=SIGMA0, max_grad_norm=C0, expected_batch_size=4,
        loss_reduction="sum", generator=generator,
    )


def run(scheduler_cls, attribute, epochs=7, **kwargs):
    opt = dp_optimizer()
    sched = scheduler_cls(opt, **kwargs)
    values = [getattr(opt, attribute)]
    for _ in range(epochs):
        sched.step()
        values.append(getattr(opt, attribute))
    return values


@pytest.mark.parametrize(
    "cls, attribute, base, kwargs, formula",
    [
        (ExponentialNoise, "noise_multiplier", SIGMA0, {"gamma": 0.8}, lambda t: 0.8**t),
        (StepNoise, "noise_multiplier", SIGMA0, {"step_size": 3, "gamma": 0.5},
         lambda t: 0.5 ** (t // 3)),
        (LambdaNoise, "noise_multiplier", SIGMA0, {"noise_lambda": lambda t: 1.0 / (1 + t)},
         lambda t: 1.0 / (1 + t)),
        (ExponentialGradClip, "max_grad_norm", C0, {"gamma": 1.1}, lambda t: 1.1**t),
        (StepGradClip, "max_grad_norm", C0, {"step_size": 2, "gamma": 0.9},
         lambda t: 0.9 ** (t // 2)),
        (LambdaGradClip, "max_grad_norm", C0, {"scheduler_function": lambda t: 2.0 - 0.1 * t},
         lambda t: 2.0 - 0.1 * t),
    ],
)
def test_schedule_follows_its_formula(cls, attribute, base, kwargs, formula):
    values = run(cls, attribute, **kwargs)
    want = [base * formula(t) for t in range(len(values))]
    assert_close(values, want, rtol=1e-12)


def test_grad_clip_schedule_changes_the_noise_std():
    opt = dp_optimizer(generator=NoiseSource(seed=5))
    sched = ExponentialGradClip(opt, gamma=0.5)
    sched.step()
    params = opt.params
    for p in params:
        p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype)
    opt.step()
    source = NoiseSource(seed=5)
    want = [source.normal(tuple(p.shape), SIGMA0 * C0 * 0.5) for p in params]
    assert_close([p.grad.numpy() for p in params], want, rtol=1e-12)


def test_noise_schedule_is_seen_by_the_step_hook():
    opt = dp_optimizer()
    seen = []
    opt.attach_step_hook(lambda o: seen.append(o.noise_multiplier))
    sched = StepNoise(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        for p in opt.params:
            p.grad_sample = torch.zeros(1, *p.shape, dtype=p.dtype)
        opt.step()
        opt.zero_grad()
        sched.step()
    assert seen == [SIGMA0, SIGMA0 / 2, SIGMA0 / 4]


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (ExponentialNoise, {"gamma": 0.9}),
        (StepNoise, {"step_size": 2, "gamma": 0.5}),
        (LambdaNoise, {"noise_lambda": lambda t: 0.9**t}),
        (StepGradClip, {"step_size": 2, "gamma": 0.5}),
        (LambdaGradClip, {"scheduler_function": lambda t: 0.9**t}),
    ],
)
def test_state_dict_round_trip_resumes_the_schedule(cls, kwargs):
    attribute = "noise_multiplier" if "Noise" in cls.__name__ else "max_grad_norm"
    opt = dp_optimizer()
    sched = cls(opt, **kwargs)
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    assert "optimizer" not in state and state["last_epoch"] == 3
    assert all(not callable(v) for v in state.values())
    value_at_checkpoint = getattr(opt, attribute)
    reference = [sched.step() or getattr(opt, attribute) for _ in range(3)]

    fresh_opt = dp_optimizer()
    fresh = cls(fresh_opt, **kwargs)
    fresh.load_state_dict(state)
    setattr(fresh_opt, attribute, value_at_checkpoint)  # the optimizer's own checkpoint
    resumed = [fresh.step() or getattr(fresh_opt, attribute) for _ in range(3)]
    assert_close(resumed, reference, rtol=1e-12)


def test_grad_clip_schedulers_refuse_per_layer_and_non_dp_optimizers():
    model = nn.Linear(3, 2)
    per_layer = DPPerLayerOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
        max_grad_norm=[1.0, 1.0], expected_batch_size=2,
    )
    for cls, kwargs in ((ExponentialGradClip, {"gamma": 0.5}),
                        (StepGradClip, {"step_size": 1, "gamma": 0.5}),
                        (LambdaGradClip, {"scheduler_function": lambda t: 1.0})):
        with pytest.raises(ValueError, match="per-layer"):
            cls(per_layer, **kwargs)
        with pytest.raises(ValueError, match="max_grad_norm"):
            cls(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ExponentialNoise(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5)
    # noise schedulers are fine with per-layer clipping
    ExponentialNoise(per_layer, gamma=0.5).step()
    assert per_layer.noise_multiplier == 0.5


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (ExponentialNoise, {"gamma": 0.0}, "gamma"),
        (StepNoise, {"step_size": 0, "gamma": 0.5}, "step_size"),
        (StepGradClip, {"step_size": 2, "gamma": -1.0}, "gamma"),
        (ExponentialNoise, {"gamma": 0.5, "last_epoch": -2}, "last_epoch"),
    ],
)
def test_invalid_arguments_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(dp_optimizer(), **kwargs)
