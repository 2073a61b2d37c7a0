"""PrivacyEngine API: what make_private builds, calibration, and every argument guard."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import dp_torch
from dp_torch import GradSampleModule, GradSampleModuleFastGradientClipping, PrivacyEngine
from dp_torch.accountants import RDPAccountant
from dp_torch.accountants.utils import get_noise_multiplier
from dp_torch.data_loader import DPDataLoader
from dp_torch.grad_sample import GradSampleHooks
from dp_torch.optimizers import (
    AdaClipDPOptimizer,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
)
from dp_torch.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from dp_torch.validators import UnsupportedModuleError
from dpcore import sampling as core_sampling
from dpcore.noise import NoiseSource
from tests.tolerance import assert_close

N = 50  # examples in the toy data of tests/dp_torch/conftest.py


def train(dp_model, optimizer, dl, criterion=None, steps=None):
    criterion = criterion or nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(dl):
        if steps is not None and i == steps:
            break
        criterion(dp_model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


ADAPTIVE = dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0,
                min_clipbound=0.01, unclipped_num_std=2.0)


# --------------------------------------------------------------------------- what is built


def test_package_exports_like_opacus():
    assert set(dp_torch.__all__) == {
        "PrivacyEngine", "GradSampleModule", "GradSampleModuleFastGradientClipping", "utils",
        "__version__",
    }
    assert dp_torch.PrivacyEngine is dp_torch.privacy_engine.PrivacyEngine
    assert isinstance(dp_torch.__version__, str)


def test_make_private_wraps_all_three_objects(private_toy):
    engine, model, (dp_model, optimizer, dl) = private_toy(batch_size=8)
    assert isinstance(dp_model, GradSampleModule) and dp_model._module is model
    assert type(optimizer) is DPOptimizer
    assert isinstance(dl, DPDataLoader)
    n_batches = math.ceil(N / 8)
    assert dl.sample_rate == 1 / n_batches and len(dl) == n_batches
    assert optimizer.expected_batch_size == core_sampling.expected_batch_size(N, 1 / n_batches) == 7
    assert (optimizer.noise_multiplier, optimizer.max_grad_norm) == (1.0, 1.0)
    assert optimizer.loss_reduction == "mean" and not optimizer.secure_mode
    assert not dp_model.grad_accumulation_allowed  # Poisson sampling forbids accumulation
    assert isinstance(engine.accountant, RDPAccountant) and len(engine.accountant) == 0
    assert engine.dataset is dl.dataset


def test_accountant_steps_once_per_step_with_logical_sample_rate(private_toy):
    engine, _, (dp_model, optimizer, dl) = private_toy()
    train(dp_model, optimizer, dl, steps=3)
    assert engine.accountant.history == [(1.0, 0.2, 3)]
    reference = RDPAccountant()
    reference.step(noise_multiplier=1.0, sample_rate=0.2, num_steps=3)
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5)


def test_get_epsilon_passes_accountant_options(private_toy):
    engine, _, (dp_model, optimizer, dl) = private_toy()
    train(dp_model, optimizer, dl)
    alphas = [1.5, 2, 3, 5, 8, 16, 32, 64, 128]
    eps, best_alpha = engine.accountant.get_privacy_spent(delta=1e-5, alphas=alphas)
    assert engine.get_epsilon(delta=1e-5, alphas=alphas) == eps
    assert best_alpha in alphas[1:-1]
    assert eps >= engine.get_epsilon(delta=1e-5) * 0.99  # coarser orders cannot be much tighter


def test_poisson_sampling_false_keeps_the_loader(toy_parts):
    model, opt, dl = toy_parts()
    engine = PrivacyEngine()
    dp_model, _, out = engine.make_private(module=model, optimizer=opt, data_loader=dl,
                                           noise_multiplier=1.0, max_grad_norm=1.0,
                                           poisson_sampling=False)
    assert out is dl and dp_model.grad_accumulation_allowed


def test_dp_data_loader_is_kept_with_its_own_sample_rate(toy_parts, toy_data):
    model, opt, _ = toy_parts()
    dl = DPDataLoader(toy_data(), sample_rate=0.3)
    engine = PrivacyEngine()
    _, optimizer, out = engine.make_private(module=model, optimizer=opt, data_loader=dl,
                                            noise_multiplier=1.0, max_grad_norm=1.0)
    assert out is dl and optimizer.expected_batch_size == 15


def test_ghost_mode_returns_criterion_in_opacus_order(private_toy):
    engine, _, out = private_toy(grad_sample_mode="ghost", loss_reduction="sum")
    assert len(out) == 4
    dp_model, optimizer, criterion, dl = out
    assert isinstance(dp_model, GradSampleModuleFastGradientClipping)
    assert isinstance(optimizer, DPOptimizerFastGradientClipping)
    assert isinstance(criterion, DPLossFastGradientClipping) and isinstance(dl, DPDataLoader)
    assert isinstance(criterion.criterion, nn.CrossEntropyLoss)
    assert criterion.criterion.reduction == "sum" and dp_model.max_grad_norm == 1.0
    train(dp_model, optimizer, dl, criterion=criterion, steps=2)
    assert len(engine.accountant) == 2


def test_functorch_mode_forces_the_fallback(private_toy):
    _, _, (dp_model, _, _) = private_toy(grad_sample_mode="functorch")
    assert isinstance(dp_model, GradSampleModule) and dp_model.force_functorch


def test_per_layer_and_adaptive_clipping(private_toy):
    _, model, (_, optimizer, _) = private_toy(clipping="per_layer", max_grad_norm=[0.5, 1.0, 1.5, 2.0])
    assert type(optimizer) is DPPerLayerOptimizer
    assert optimizer.max_grad_norms == [0.5, 1.0, 1.5, 2.0]
    assert_close(optimizer.max_grad_norm, math.sqrt(0.25 + 1 + 2.25 + 4), rtol=1e-15)
    engine, _, (dp_model, optimizer, dl) = private_toy(clipping="adaptive", **ADAPTIVE)
    assert type(optimizer) is AdaClipDPOptimizer
    assert optimizer.target_unclipped_quantile == 0.5 and optimizer.unclipped_num_std == 2.0
    train(dp_model, optimizer, dl, steps=3)
    assert optimizer.max_grad_norm != 1.0 and engine.accountant.history == [(1.0, 0.2, 3)]


def test_wrap_model_false_returns_hooks_and_trains_the_original_model(private_toy):
    engine, model, (hooks, optimizer, dl) = private_toy(wrap_model=False)
    assert isinstance(hooks, GradSampleHooks) and not isinstance(hooks, nn.Module)
    train(model, optimizer, dl, steps=2)
    assert len(engine.accountant) == 2
    hooks.cleanup()
    assert not hasattr(model[0].weight, "grad_sample")


def test_noise_source_generator_is_reproducible(private_toy, toy_data):
    results = []
    for _ in range(2):
        _, model, (dp_model, optimizer, dl) = private_toy(noise_generator=NoiseSource(seed=3))
        x, y = toy_data()[:10]
        nn.CrossEntropyLoss()(dp_model(x), y).backward()
        optimizer.step()
        results.append(model[0].weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_secure_mode_trains_from_os_entropy(private_toy):
    engine = PrivacyEngine(secure_mode=True)
    _, _, (dp_model, optimizer, dl) = private_toy(engine)
    assert optimizer.secure_mode and optimizer.generator is None
    assert dl.batch_sampler.secure_mode and dl.batch_sampler.seed is None
    train(dp_model, optimizer, dl, steps=2)
    assert len(engine.accountant) == 2


def test_compatibility_helpers():
    engine = PrivacyEngine()
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    assert not engine.is_compatible(module=bn, optimizer=None, data_loader=None)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        engine.validate(module=bn, optimizer=None, data_loader=None)
    fixed = PrivacyEngine.get_compatible_module(bn)
    assert engine.is_compatible(module=fixed, optimizer=None, data_loader=None)
    assert isinstance(bn[1], nn.BatchNorm1d)  # the original is untouched


def test_existing_grad_sample_module_is_reused_or_refused(toy_parts):
    model, opt, dl = toy_parts()
    gsm = GradSampleModule(model)
    engine = PrivacyEngine()
    out, _, _ = engine.make_private(module=gsm, optimizer=opt, data_loader=dl,
                                    noise_multiplier=1.0, max_grad_norm=1.0)
    assert out is gsm
    model, opt, dl = toy_parts()
    gsm = GradSampleModule(model, loss_reduction="sum")
    with pytest.raises(ValueError, match="Pre-existing GradSampleModule doesn't match"):
        PrivacyEngine().make_private(module=gsm, optimizer=opt, data_loader=dl,
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    assert gsm.grad_accumulation_allowed  # untouched by the refused call


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_make_private_with_epsilon_meets_the_budget(accountant, toy_parts):
    engine = PrivacyEngine(accountant=accountant)
    model, opt, dl = toy_parts()
    dp_model, optimizer, dp_dl = engine.make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=dl, target_epsilon=3.0, target_delta=1e-5,
        epochs=4, max_grad_norm=1.0,
    )
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.2,
                                    steps=4 * 5, accountant=accountant)
    assert optimizer.noise_multiplier == expected
    for _ in range(4):
        train(dp_model, optimizer, dp_dl)
    assert engine.accountant.history == [(expected, 0.2, 20)]
    eps = engine.get_epsilon(1e-5)
    assert 3.0 - 0.05 <= eps <= 3.0


def test_make_private_with_epsilon_splits_calibration_and_optimizer_kwargs(toy_parts):
    engine = PrivacyEngine()
    model, opt, dl = toy_parts()
    alphas = [1.5, 2, 4, 8, 16, 32, 64]
    _, optimizer, _ = engine.make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=dl, target_epsilon=5.0, target_delta=1e-5,
        epochs=2, max_grad_norm=1.0, clipping="adaptive", alphas=alphas,
        epsilon_tolerance=0.001, **ADAPTIVE,
    )
    expected = get_noise_multiplier(target_epsilon=5.0, target_delta=1e-5, sample_rate=0.2,
                                    steps=10, alphas=alphas, epsilon_tolerance=0.001)
    assert isinstance(optimizer, AdaClipDPOptimizer) and optimizer.noise_multiplier == expected


def test_make_private_with_epsilon_refuses_spent_budget(private_toy, toy_parts):
    engine, _, (dp_model, optimizer, dl) = private_toy()
    train(dp_model, optimizer, dl, steps=1)
    model, opt, _ = toy_parts()
    with pytest.raises(ValueError, match=r"calibrates a fresh budget.*already recorded 1 steps"):
        engine.make_private_with_epsilon(module=model, optimizer=opt, data_loader=dl,
                                         target_epsilon=3.0, target_delta=1e-5, epochs=1,
                                         max_grad_norm=1.0)
    with pytest.raises(ValueError, match="epochs must be a finite number > 0, got 0"):
        PrivacyEngine().make_private_with_epsilon(module=model, optimizer=opt, data_loader=dl,
                                                  target_epsilon=3.0, target_delta=1e-5,
                                                  epochs=0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyEngine().make_private_with_epsilon(module=model, optimizer=opt, data_loader=dl,
                                                  target_epsilon=-1.0, target_delta=1e-5,
                                                  epochs=1, max_grad_norm=1.0)


# --------------------------------------------------------------------------- guards


def no_hooks(model: nn.Module) -> bool:
    return not hasattr(model, "autograd_grad_sample_hooks") and not any(
        hasattr(p, "grad_sample") for p in model.parameters()
    )


GUARDS = [
    (dict(noise_multiplier=-0.5), ValueError, "noise_multiplier must be a finite number >= 0, got -0.5"),
    (dict(noise_multiplier=float("nan")), ValueError, "noise_multiplier must be a finite number >= 0"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be a finite number > 0, got 0.0"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm must be a finite number > 0"),
    (dict(max_grad_norm=[1.0, 1.0, 1.0, 1.0]), ValueError,
     r"clipping='flat' needs max_grad_norm as one float > 0, got \[1.0"),
    (dict(clipping="per_layer"), ValueError,
     r'clipping="per_layer" needs max_grad_norm as a list .* got 1.0'),
    (dict(clipping="per_layer", max_grad_norm=[1.0, 1.0]), ValueError,
     "max_grad_norm has 2 bounds but the optimizer has 4 trainable parameters"),
    (dict(clipping="per_layer", max_grad_norm=[1.0, 1.0, 0.0, 1.0]), ValueError,
     r"max_grad_norm\[2\] must be a finite number > 0"),
    (dict(clipping="ada"), ValueError, "clipping must be one of 'flat', 'per_layer', 'adaptive', got 'ada'"),
    (dict(grad_sample_mode="ghost_tp"), ValueError,
     "grad_sample_mode must be one of 'hooks', 'functorch', 'ghost', 'ghost_fsdp', 'ew', 'no_op', got 'ghost_tp'"),
    (dict(grad_sample_mode="ghost_fsdp"), ValueError,
     "grad_sample_mode='ghost_fsdp' needs a model sharded with FSDP2, got an unsharded model"),
    (dict(grad_sample_mode="ew", wrap_model=False), ValueError, 'grad_sample_mode="ew" exists only as a wrapper'),
    (dict(grad_sample_mode="ew", batch_first=False), NotImplementedError, "needs batch_first=True"),
    (dict(loss_reduction="avg"), ValueError, "loss_reduction must be one of 'mean', 'sum', got 'avg'"),
    (dict(grad_sample_mode="ghost", clipping="per_layer", max_grad_norm=[1.0] * 4), ValueError,
     'grad_sample_mode="ghost" supports only clipping="flat"'),
    (dict(clipping="adaptive", target_unclipped_quantile=0.5), TypeError,
     r"missing \['clipbound_learning_rate'"),
    (dict(clipping="adaptive", typo=1, **ADAPTIVE), TypeError, r"unexpected \['typo'\]"),
    (dict(clipping="adaptive", **{**ADAPTIVE, "unclipped_num_std": 0.4}), ValueError,
     "unclipped_num_std=0.4 is too small for noise_multiplier=1.0"),
    (dict(clipping="adaptive", **{**ADAPTIVE, "target_unclipped_quantile": 1.5}), ValueError,
     r"target_unclipped_quantile must be in \[0, 1\], got 1.5"),
    (dict(target_unclipped_quantile=0.5), TypeError,
     r"unexpected keyword arguments \['target_unclipped_quantile'\] for clipping='flat'"),
    (dict(noise_generator=1234), TypeError, "noise_generator must be a torch.Generator"),
    (dict(batch_first=1), TypeError, "batch_first must be a bool, got 1"),
    (dict(poisson_sampling="yes"), TypeError, "poisson_sampling must be a bool"),
    (dict(grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(reduction="sum")), ValueError,
     "criterion.reduction='sum' differs from loss_reduction='mean'"),
    (dict(criterion="ce", grad_sample_mode="ghost"), TypeError, "criterion must be callable"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), GUARDS,
                         ids=[re.sub(r"\W+", "-", str(sorted(g[0])))[:40] for g in GUARDS])
def test_make_private_guards_leave_everything_untouched(kwargs, error, message, toy_parts):
    engine = PrivacyEngine()
    model, opt, dl = toy_parts()
    args = dict(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        engine.make_private(**args)
    assert no_hooks(model) and len(engine.accountant) == 0 and engine.dataset is None


def test_optimizer_over_other_parameters_is_refused(toy_parts, toy_model):
    model, _, dl = toy_parts()
    other = torch.optim.SGD(toy_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Module parameters are different than optimizer Parameters"):
        PrivacyEngine().make_private(module=model, optimizer=other, data_loader=dl,
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    assert no_hooks(model)


def test_wrong_object_types_are_refused(toy_parts):
    model, opt, dl = toy_parts()
    base = dict(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0)
    for key, bad, message in (
        ("module", "net", "module must be a torch.nn.Module, got str"),
        ("optimizer", object(), "optimizer must be a torch.optim.Optimizer, got object"),
        ("data_loader", [(1, 2)], "data_loader must be a torch.utils.data.DataLoader, got list"),
    ):
        with pytest.raises(TypeError, match=message):
            PrivacyEngine().make_private(**{**base, key: bad})
    with pytest.raises(ValueError, match="accountant must be one of .* got 'moments'"):
        PrivacyEngine(accountant="moments")
    with pytest.raises(TypeError, match="secure_mode must be a bool, got 1"):
        PrivacyEngine(secure_mode=1)


def test_unsupported_module_is_refused_before_wrapping(toy_data):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    dl = DataLoader(toy_data(), batch_size=10)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0)
    assert no_hooks(model)


def test_secure_mode_refuses_seeds_and_generators(toy_parts, toy_data, private_toy):
    engine = PrivacyEngine(secure_mode=True)
    for generator in (torch.Generator().manual_seed(0), NoiseSource(seed=1)):
        model, opt, dl = toy_parts()
        with pytest.raises(ValueError, match="Passing a seed or generator is prohibited in secure mode"):
            engine.make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0,
                                max_grad_norm=1.0, noise_generator=generator)
        assert no_hooks(model)
    model, opt, dl = toy_parts()
    with pytest.raises(ValueError, match="secure_mode=True requires poisson_sampling=True"):
        engine.make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0,
                            max_grad_norm=1.0, poisson_sampling=False)
    seeded = DPDataLoader(toy_data(), sample_rate=0.2, seed=3)
    with pytest.raises(ValueError, match="DPDataLoader whose sampler is not secure"):
        engine.make_private(module=model, optimizer=opt, data_loader=seeded, noise_multiplier=1.0,
                            max_grad_norm=1.0)
    _, _, (_, optimizer, _) = private_toy(engine, noise_generator=NoiseSource(secure_mode=True))
    assert optimizer.secure_mode


def test_new_dataset_after_spending_budget_is_refused(private_toy, toy_parts, toy_data):
    engine, _, (dp_model, optimizer, dl) = private_toy()
    model, opt, _ = toy_parts()
    other = DataLoader(toy_data(), batch_size=10)  # same values, another Dataset object
    train(dp_model, optimizer, dl, steps=1)
    with pytest.raises(ValueError, match=r"already spent privacy budget \(1 steps\) on another data set"):
        engine.make_private(module=model, optimizer=opt, data_loader=other, noise_multiplier=1.0,
                            max_grad_norm=1.0)
    assert no_hooks(model)
    # The same Dataset object is fine (e.g. new model objects for the same run).
    same = DataLoader(dl.dataset, batch_size=10)
    engine.make_private(module=model, optimizer=opt, data_loader=same, noise_multiplier=1.0,
                        max_grad_norm=1.0)


def test_dataset_may_change_before_any_step(private_toy, toy_parts, toy_data):
    engine, _, _ = private_toy()
    model, opt, _ = toy_parts()
    other = DataLoader(toy_data(), batch_size=10)
    engine.make_private(module=model, optimizer=opt, data_loader=other, noise_multiplier=1.0,
                        max_grad_norm=1.0)
    assert engine.dataset is other.dataset


def test_failure_after_wrapping_removes_the_hooks(monkeypatch, toy_parts):
    engine = PrivacyEngine()
    model, opt, dl = toy_parts()

    def broken(self, **kwargs):
        raise RuntimeError("optimizer construction failed")

    monkeypatch.setattr(PrivacyEngine, "_prepare_optimizer", broken)
    with pytest.raises(RuntimeError, match="optimizer construction failed"):
        engine.make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0,
                            max_grad_norm=1.0)
    assert no_hooks(model) and engine.dataset is None
    monkeypatch.undo()
    dp_model, optimizer, dp_dl = engine.make_private(module=model, optimizer=opt, data_loader=dl,
                                                     noise_multiplier=1.0, max_grad_norm=1.0)
    train(dp_model, optimizer, dp_dl, steps=1)
    assert len(engine.accountant) == 1


def test_gradient_accumulation_without_zero_grad_is_detected(private_toy, toy_data):
    _, _, (dp_model, optimizer, dl) = private_toy()
    x, y = toy_data()[:10]
    nn.CrossEntropyLoss()(dp_model(x), y).backward()
    with pytest.raises(ValueError, match="Poisson sampling is not compatible with gradient accumulation"):
        nn.CrossEntropyLoss()(dp_model(x), y).backward()
