"""dp_torch.accountants: Opacus' names and module paths, and the engine's ledger.

Oracles: the dpcore accountants fed the same history, and published figures
(the figures of Opacus 1.6's accountant tests).
"""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import dpcore.accounting as core
from dpcore.accounting import _registry
from dp_torch import PrivacyEngine
from dp_torch.accountants import (
    GaussianAccountant,
    IAccountant,
    PLDAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
    register_accountant,
)
from dp_torch.schedulers import StepNoise
from dp_torch.utils.batch_memory_manager import BatchMemoryManager
from dpcore.accounting.gdp import GDPApproximationWarning
from tests.tolerance import assert_close

#: Public names of ``opacus.accountants`` in Opacus 1.6 and where they live.
OPACUS_PATHS = {
    "IAccountant": ("accountant", "dpcore.accounting._base", "Accountant"),
    "RDPAccountant": ("rdp", "dpcore.accounting.rdp", "RDPAccountant"),
    "GaussianAccountant": ("gdp", "dpcore.accounting.gdp", "GDPAccountant"),
    "PRVAccountant": ("prv", "dpcore.accounting.prv", "PRVAccountant"),
    "create_accountant": ("registry", None, None),
    "register_accountant": ("registry", None, None),
}


@pytest.mark.parametrize("name", sorted(OPACUS_PATHS))
def test_opacus_names_resolve_at_opacus_paths(name):
    module_name, core_module, core_name = OPACUS_PATHS[name]
    package = importlib.import_module("dp_torch.accountants")
    module = importlib.import_module(f"dp_torch.accountants.{module_name}")
    assert getattr(package, name) is getattr(module, name)
    assert name in package.__all__
    if core_module is not None:
        assert getattr(package, name) is getattr(importlib.import_module(core_module), core_name)


def test_utils_and_analysis_paths_resolve_to_dpcore():
    from dp_torch.accountants.analysis import rdp as analysis
    from dp_torch.accountants.utils import get_noise_multiplier
    from dpcore.accounting import rdp as core_rdp

    assert get_noise_multiplier is core.get_noise_multiplier
    assert analysis.compute_rdp is core_rdp.compute_rdp
    assert analysis.get_privacy_spent is core_rdp.get_privacy_spent
    assert importlib.import_module("dp_torch.accountants.pld").PLDAccountant is PLDAccountant


def test_analysis_rdp_reproduces_the_opacus_reference_figure():
    """sigma 1.5, q 0.04, 2250 steps, delta 1e-5: RDP epsilon 7.32911117143 (Opacus 1.6 tests)."""
    from dp_torch.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from dp_torch.accountants.rdp import DEFAULT_ALPHAS

    rdp = compute_rdp(q=0.04, noise_multiplier=1.5, steps=2250, orders=DEFAULT_ALPHAS)
    eps, alpha = get_privacy_spent(orders=DEFAULT_ALPHAS, rdp=rdp, delta=1e-5)
    assert_close(eps, 7.32911117143, rtol=1e-9)
    assert alpha in DEFAULT_ALPHAS


def test_calibration_reproduces_the_opacus_reference_figure():
    """Target epsilon 8, delta 1e-5, q 0.04, 90 epochs, RDP: sigma 1.416 (Opacus 1.6 tests)."""
    from dp_torch.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90)
    assert_close(sigma, 1.416, rtol=1e-3)


def test_registry_creates_every_kind_and_registers_custom_ones(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))  # undone after the test
    kinds = {"rdp": RDPAccountant, "gdp": GaussianAccountant, "prv": PRVAccountant,
             "pld": PLDAccountant}
    for name, cls in kinds.items():
        acc = create_accountant(name)
        assert type(acc) is cls and isinstance(acc, IAccountant) and acc.mechanism() == name
    assert create_accountant("pld", value_discretization_interval=1e-3).value_discretization_interval == 1e-3
    with pytest.raises(ValueError, match="accountant must be one of .*got 'moments'"):
        create_accountant("moments")

    class HalfRDP(RDPAccountant):
        """A custom kind: registered under its own name and usable by the engine."""

        name = "half-rdp"

        def get_epsilon(self, delta, alphas=None):
            return super().get_epsilon(delta, alphas) / 2

    register_accountant("half-rdp", HalfRDP)
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("rdp", HalfRDP)
    with pytest.raises(TypeError, match="subclass"):
        register_accountant("bad", dict)
    engine = PrivacyEngine(accountant="half-rdp")
    engine.accountant.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)
    reference = RDPAccountant()
    reference.history = engine.accountant.history
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5) / 2
    register_accountant("half-rdp", RDPAccountant, force=True)
    assert type(create_accountant("half-rdp")) is RDPAccountant


# --------------------------------------------------------------------------- the engine's ledger


@pytest.fixture
def engine_parts(toy_data, toy_model):
    """``engine_parts(accountant)``: ``(engine, make_private(...))`` with noise multiplier 1.1.

    The toy MLP 3-4-2 (seed 0) over 40 toy examples of 3 features in batches of 10.
    """
    def make(accountant, batch_size=10, **kwargs):
        model = toy_model(dim=3, hidden=4, seed=0)
        engine = PrivacyEngine(accountant=accountant)
        dl = DataLoader(toy_data(40, dim=3), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(1))
        out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  data_loader=dl, noise_multiplier=1.1, max_grad_norm=1.0, **kwargs)
        return engine, out

    return make


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
@pytest.mark.parametrize("physical", [None, 3])
def test_ledger_has_one_step_per_logical_batch(accountant, physical, engine_parts):
    """k logical steps (with or without virtual steps) -> exactly k steps at the logical q."""
    engine, (model, optimizer, dl) = engine_parts(accountant)
    logical, physical_batches = 0, 0
    for _ in range(2):
        with contextlib.ExitStack() as stack:
            batches = dl if physical is None else stack.enter_context(BatchMemoryManager(
                data_loader=dl, max_physical_batch_size=physical, optimizer=optimizer))
            for x, y in batches:
                nn.CrossEntropyLoss()(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                physical_batches += 1
                assert physical is None or len(x) <= physical
        logical += len(dl)
    assert engine.accountant.history == [(1.1, 0.25, logical)] and len(engine.accountant) == 8
    if physical is not None:
        assert physical_batches > logical  # the logical batches really were split
    reference = core.create_accountant(accountant)
    reference.step(noise_multiplier=1.1, sample_rate=0.25, num_steps=logical)
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5)
    assert math.isfinite(engine.get_epsilon(1e-5)) and engine.get_epsilon(1e-5) > 0


def test_noise_schedule_is_recorded_entry_by_entry(engine_parts):
    engine, (model, optimizer, dl) = engine_parts("rdp")
    scheduler = StepNoise(optimizer, step_size=1, gamma=0.5)
    for _ in range(2):
        for x, y in dl:
            nn.CrossEntropyLoss()(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    assert engine.accountant.history == [(1.1, 0.25, 4), (0.55, 0.25, 4)]
    reference = RDPAccountant()
    reference.step(noise_multiplier=1.1, sample_rate=0.25, num_steps=4)
    reference.step(noise_multiplier=0.55, sample_rate=0.25, num_steps=4)
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5)


def test_gdp_engine_warns_that_it_may_under_report(engine_parts):
    engine, (model, optimizer, dl) = engine_parts("gdp")
    x, y = next(iter(dl))
    nn.CrossEntropyLoss()(model(x), y).backward()
    optimizer.step()
    with pytest.warns(GDPApproximationWarning):
        eps = engine.get_epsilon(1e-5)
    assert eps > 0


def test_accountant_state_dict_round_trip_is_the_ledger(engine_parts):
    engine, (model, optimizer, dl) = engine_parts("prv")
    for x, y in dl:
        nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = engine.accountant.state_dict()
    assert state == {"history": [(1.1, 0.25, 4)], "mechanism": "prv"}
    other = PrivacyEngine(accountant="rdp")
    other.accountant.load_state_dict(state)  # the same ledger, re-accounted with RDP
    assert other.accountant.history == engine.accountant.history
    assert other.get_epsilon(1e-5) > engine.get_epsilon(1e-5)  # RDP is the looser bound
