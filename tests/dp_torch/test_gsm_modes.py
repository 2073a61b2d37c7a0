"""``grad_sample_mode="ew"`` and ``"no_op"``: the wrappers, the factories and ``make_private``.

Oracles: the batch-size-1 loop (per-sample gradients of "ew") and ``"hooks"`` mode, whose
updates are checked against the loop elsewhere: with the same noise generator, "ew" and
"no_op" with correct user-supplied per-sample gradients must give the same parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dp_torch import PrivacyEngine
from dp_torch.grad_sample import (
    AbstractGradSampleHooks,
    AbstractGradSampleModule,
    GradSampleHooksNoOp,
    GradSampleModuleExpandedWeights,
    GradSampleModuleNoOp,
    get_gsm_class,
    get_hooks_class,
    wrap_model,
)
from dp_torch.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

N, D, C = 48, 5, 3


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))
    data = TensorDataset(torch.randn(N, D), torch.randint(0, C, (N,)))
    return model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(data, batch_size=12)


def test_factories() -> None:
    expected = {(get_gsm_class, "ew"): GradSampleModuleExpandedWeights,
                (get_gsm_class, "no_op"): GradSampleModuleNoOp, (get_hooks_class, "no_op"): GradSampleHooksNoOp}
    assert all(factory(mode) is cls for (factory, mode), cls in expected.items())
    with pytest.raises(ValueError, match="has no hooks variant"):
        get_hooks_class("ew")
    with pytest.raises(ValueError, match="exists only as a wrapper"):
        wrap_model(nn.Linear(2, 2), "ew", wrap_model=False)
    assert isinstance(wrap_model(nn.Linear(2, 2), "ew"), AbstractGradSampleModule)
    hooks = wrap_model(nn.Linear(2, 2), "no_op", wrap_model=False)
    assert isinstance(hooks, AbstractGradSampleHooks) and not isinstance(hooks, nn.Module)


def test_ew_per_sample_gradients_match_the_loop() -> None:
    model, _, _ = _parts()
    x = torch.randn(6, D)
    assert check_per_sample_gradients_are_correct(x, model, grad_sample_mode="ew")


def test_ew_refuses_batch_second() -> None:
    with pytest.raises(NotImplementedError, match="batch_first=True"):
        GradSampleModuleExpandedWeights(nn.Linear(2, 2), batch_first=False)


def test_no_op_computes_nothing_and_cleans_up() -> None:
    model = nn.Linear(3, 2)
    wrapped = GradSampleModuleNoOp(model, batch_first=False)
    wrapped(torch.randn(4, 3)).sum().backward()
    assert model.weight.grad is not None and model.weight.grad_sample is None
    model.weight.grad_sample = torch.zeros(4, 2, 3)
    wrapped.zero_grad()
    assert model.weight.grad_sample is None
    assert wrapped.to_standard_module() is model and not hasattr(model.weight, "grad_sample")


def _train(mode: str, steps: int = 3) -> list[torch.Tensor]:
    model, optimizer, loader = _parts()
    engine = PrivacyEngine()
    generator = torch.Generator().manual_seed(7)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.8,
        max_grad_norm=0.5, grad_sample_mode=mode, noise_generator=generator,
    )
    loader.batch_sampler.generator = torch.Generator().manual_seed(3)
    batches = iter(loader)
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad()
        if mode == "no_op":
            _supply_grad_samples(model._module, x, y)
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert len(engine.accountant) == steps
    return [p.detach().clone() for p in model.parameters()]


def _supply_grad_samples(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """What a no_op user does: per-sample gradients from torch.func, loss scaled as the mean."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(module, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for name, p in module.named_parameters():
        p.grad_sample = grads[name]


@pytest.mark.parametrize("mode", ["ew", "no_op"])
def test_make_private_trains_like_hooks(mode: str) -> None:
    reference = _train("hooks")
    for ours, ref in zip(_train(mode), reference):
        assert torch.allclose(ours, ref, atol=1e-6)


def test_make_private_checks_mode_arguments_before_changing_anything() -> None:
    model, optimizer, loader = _parts()
    engine = PrivacyEngine()
    for kwargs, error in ((dict(wrap_model=False), ValueError), (dict(batch_first=False), NotImplementedError)):
        with pytest.raises(error, match='grad_sample_mode="ew"'):
            engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                max_grad_norm=1.0, grad_sample_mode="ew", **kwargs)
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        assert not model._forward_hooks


def test_no_op_without_supplied_grad_samples_is_refused() -> None:
    model, optimizer, loader = _parts()
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode="no_op",
    )
    x, y = next(iter(loader))
    while len(x) == 0:
        x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="grad_sample"):
        optimizer.step()
