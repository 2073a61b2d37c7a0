"""Toy data, toy models and a made-private engine shared by the dp_torch tests.

Each fixture returns a factory, so that a test can ask for the sizes it needs; the
defaults are the small classification problem most engine tests train on (50 examples
of 4 features, 2 classes, an MLP 4-6-2, batches of 10, noise multiplier 1, clipping
bound 1). Every factory seeds its own draws, so a test gets the same tensors whatever
ran before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dp_torch import PrivacyEngine


def _toy_data(n: int = 50, dim: int = 4, classes: int = 2) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, dim, generator=g),
                         torch.randint(0, classes, (n,), generator=g))


def _toy_model(dim: int = 4, hidden: int = 6, classes: int = 2, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _toy_parts(batch_size: int = 10, data: Optional[Dataset] = None
               ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    model = _toy_model()
    loader = DataLoader(data if data is not None else _toy_data(), batch_size=batch_size)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), loader


def _private_toy(engine: Optional[PrivacyEngine] = None, batch_size: int = 10,
                 **kwargs: Any) -> tuple[PrivacyEngine, nn.Module, tuple]:
    engine = engine or PrivacyEngine()
    model, optimizer, loader = _toy_parts(batch_size)
    args = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0)
    args.update(kwargs)
    return engine, model, engine.make_private(**args)


@pytest.fixture
def toy_data() -> Callable[..., TensorDataset]:
    """``toy_data(n=50, dim=4, classes=2)``: standard-normal features, uniform labels (seed 0)."""
    return _toy_data


@pytest.fixture
def toy_model() -> Callable[..., nn.Module]:
    """``toy_model(dim=4, hidden=6, classes=2, seed=1)``: ``Linear, ReLU, Linear`` after
    ``torch.manual_seed(seed)``."""
    return _toy_model


@pytest.fixture
def toy_parts() -> Callable[..., tuple[nn.Module, torch.optim.Optimizer, DataLoader]]:
    """``toy_parts(batch_size=10, data=None)``: the toy model, ``SGD(lr=0.1)`` over it and a
    ``DataLoader`` over ``data`` (default: the toy data)."""
    return _toy_parts


@pytest.fixture
def private_toy() -> Callable[..., tuple[PrivacyEngine, nn.Module, tuple]]:
    """``private_toy(engine=None, batch_size=10, **make_private_kwargs)``.

    Returns ``(engine, original model, engine.make_private(...))`` for the toy parts with
    noise multiplier 1 and clipping bound 1 unless the keyword arguments say otherwise.
    """
    return _private_toy
