"""``make_private_with_accelerator``: an ``accelerate`` loop trains exactly as the plain dp_torch loop."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("accelerate")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dp_torch import PrivacyEngine  # noqa: E402
from dp_torch.integrations.accelerate import make_private_with_accelerator  # noqa: E402
from dp_torch.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

STEPS = 3


def _setup() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = TensorDataset(torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,)))
    return model, DataLoader(data, batch_size=8, generator=torch.Generator().manual_seed(1))


def _private_kwargs(mode: str) -> dict:
    return dict(noise_multiplier=0.7, max_grad_norm=0.5, grad_sample_mode=mode,
                noise_generator=torch.Generator().manual_seed(2),
                criterion=nn.CrossEntropyLoss() if mode == "ghost" else None)


def _train(model, optimizer, criterion, loader, backward) -> None:
    for step, (x, y) in enumerate(loader):
        if step == STEPS:
            break
        optimizer.zero_grad()
        if len(x):
            backward(criterion(model(x), y))
        optimizer.step()


def _plain(mode: str) -> tuple[list[torch.Tensor], PrivacyEngine]:
    model, loader = _setup()
    engine = PrivacyEngine()
    out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                              data_loader=loader, wrap_model=False, **_private_kwargs(mode))
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    _train(model, out[1], criterion, out[-1], lambda loss: loss.backward())
    return [p.detach() for p in model.parameters()], engine


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_accelerate_loop_equals_the_plain_loop(mode: str) -> None:
    expected, plain_engine = _plain(mode)
    model, loader = _setup()
    accelerator = Accelerator(cpu=True)
    engine = PrivacyEngine()
    result = make_private_with_accelerator(
        accelerator, engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader, **_private_kwargs(mode),
    )
    assert result.model is model and result.optimizer.optimizer is result.dp_optimizer
    criterion = result.criterion if mode == "ghost" else nn.CrossEntropyLoss()
    _train(result.model, result.optimizer, criterion, result.data_loader, accelerator.backward)
    assert_close([p.detach() for p in model.parameters()], expected, rtol=1e-12)
    assert engine.accountant.history == plain_engine.accountant.history
    assert len(engine.accountant) == STEPS


def test_batch_memory_manager_gives_virtual_steps_under_accelerate() -> None:
    model, loader = _setup()
    accelerator = Accelerator(cpu=True)
    engine = PrivacyEngine()
    result = make_private_with_accelerator(
        accelerator, engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader, **_private_kwargs("hooks"),
    )
    reference = copy.deepcopy(model)
    with BatchMemoryManager(data_loader=result.data_loader, max_physical_batch_size=3,
                            optimizer=result.dp_optimizer) as batches:
        for x, y in batches:
            result.optimizer.zero_grad()
            if len(x):
                accelerator.backward(nn.functional.cross_entropy(result.model(x), y))
            result.optimizer.step()
    assert len(engine.accountant) == len(loader)  # one step per logical batch
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"gradient_accumulation_steps": 2}, ValueError, "BatchMemoryManager"),
     ({}, TypeError, "wrap_model")],
)
def test_unsupported_settings_are_refused(kwargs: dict, error: type, match: str) -> None:
    model, loader = _setup()
    extra = {"wrap_model": True} if error is TypeError else {}
    with pytest.raises(error, match=match):
        make_private_with_accelerator(
            Accelerator(cpu=True, **kwargs), PrivacyEngine(), module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, **extra,
        )
