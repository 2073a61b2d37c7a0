"""PrivacyEngine.save_checkpoint / load_checkpoint: a resumed run is the uninterrupted run.

The oracle is the same run without interruption: after loading, the accountant
continues the same ledger (no step lost or counted twice) and, when seeded, the
remaining steps use the same batches and the same noise, so the parameters end
bit-identical. The main case resumes in a fresh Python process whose own seeds all
differ, so everything that matches must have come from the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_torch import PrivacyEngine
from dp_torch.privacy_engine import CHECKPOINT_KEYS
from dp_torch.schedulers import StepNoise
from dp_torch.utils.batch_memory_manager import BatchMemoryManager
from dpcore.noise import NoiseSource

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOTAL_STEPS, SAVE_AT, STEPS_PER_EPOCH = 10, 4, 6


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g))


def build(seed: int, *, clipping: str = "flat", generator: str = "torch", engine=None,
          device: str = "cpu", **kwargs):
    """Model, optimizer, loader, engine and noise scheduler; every seed derives from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dl = DataLoader(data(), batch_size=8, generator=torch.Generator().manual_seed(seed + 1))
    noise = {"torch": lambda: torch.Generator(device=device).manual_seed(seed + 2),
             "dpcore": lambda: NoiseSource(seed=seed + 2), "default": lambda: None}[generator]()
    engine = engine or PrivacyEngine()
    max_grad_norm = [0.5, 0.5, 0.7, 0.7] if clipping == "per_layer" else 1.0
    dp_model, dp_opt, dp_dl = engine.make_private(
        module=model, optimizer=optimizer, data_loader=dl, noise_multiplier=1.0,
        max_grad_norm=max_grad_norm, clipping=clipping, noise_generator=noise, **kwargs,
    )
    scheduler = StepNoise(dp_opt, step_size=1, gamma=0.9)
    return engine, dp_model, dp_opt, dp_dl, scheduler


def run(parts, start: int, stop: int, save_at=None, path=None, physical=None) -> None:
    """Train from step ``start`` to ``stop``; the noise scheduler steps at each epoch's end."""
    engine, model, optimizer, dl, scheduler = parts
    device = next(model.parameters()).device
    step = start
    while step < stop:
        with contextlib.ExitStack() as stack:
            batches = dl if physical is None else stack.enter_context(BatchMemoryManager(
                data_loader=dl, max_physical_batch_size=physical, optimizer=optimizer))
            for x, y in batches:
                nn.CrossEntropyLoss()(model(x.to(device)), y.to(device)).backward()
                optimizer.step()
                optimizer.zero_grad()
                if optimizer._is_last_step_skipped:
                    continue
                step += 1
                if step == save_at:
                    engine.save_checkpoint(path=path, module=model, optimizer=optimizer,
                                           noise_scheduler=scheduler,
                                           checkpoint_dict={"epoch": step // STEPS_PER_EPOCH})
                if step == stop:
                    return
        scheduler.step()


def final_state(parts) -> dict:
    engine, model, optimizer, _, _ = parts
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "history": engine.accountant.history,
        "noise_multiplier": optimizer.noise_multiplier,
        "max_grad_norm": optimizer.max_grad_norm,
    }


def assert_same_run(a: dict, b: dict) -> None:
    assert a["history"] == b["history"]
    assert a["noise_multiplier"] == b["noise_multiplier"] and a["max_grad_norm"] == b["max_grad_norm"]
    for key in ("params", "momentum"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key


def resume_in_this_process(checkpoint: str, out: str) -> None:
    """Entry point of the fresh process: different seeds, load, finish the run, save the result."""
    parts = build(seed=1000)
    engine, model, optimizer, _, scheduler = parts
    user = engine.load_checkpoint(path=checkpoint, module=model, optimizer=optimizer,
                                  noise_scheduler=scheduler)
    assert user == {"epoch": SAVE_AT // STEPS_PER_EPOCH}
    run(parts, SAVE_AT, TOTAL_STEPS)
    torch.save(final_state(parts), out)


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    parts = build(seed=0)
    run(parts, 0, TOTAL_STEPS, save_at=SAVE_AT, path=path)
    uninterrupted = final_state(parts)
    assert uninterrupted["history"] == [(1.0, 1 / 6, 6), (0.9, 1 / 6, 4)]
    out = str(tmp_path / "resumed.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("from tests.dp_torch.test_checkpoint import resume_in_this_process; "
            f"resume_in_this_process({path!r}, {out!r})")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_same_run(torch.load(out, weights_only=True), uninterrupted)


@pytest.mark.parametrize(("clipping", "generator", "physical", "extra"), [
    ("adaptive", "dpcore", 3, dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.3,
                                   max_clipbound=10.0, min_clipbound=0.01, unclipped_num_std=2.0)),
    ("per_layer", "default", None, {}),
])
def test_resume_into_fresh_objects(tmp_path, clipping, generator, physical, extra):
    """Adaptive clipping (bound restored) with a NoiseSource and virtual steps; per-layer
    clipping with torch's default generator (its global state is restored)."""
    path = str(tmp_path / "ckpt.pt")
    parts = build(0, clipping=clipping, generator=generator, **extra)
    run(parts, 0, TOTAL_STEPS, save_at=SAVE_AT, path=path, physical=physical)
    uninterrupted = final_state(parts)
    torch.manual_seed(12345)  # disturb torch's default generator
    fresh = build(1000, clipping=clipping, generator=generator, **extra)
    fresh[0].load_checkpoint(path=path, module=fresh[1], optimizer=fresh[2], noise_scheduler=fresh[4])
    if clipping == "adaptive":  # the bound had moved and is restored
        saved = torch.load(path, weights_only=True)["dp_optimizer_state_dict"]["max_grad_norm"]
        assert saved != 1.0 and fresh[2].max_grad_norm == saved
    run(fresh, SAVE_AT, TOTAL_STEPS, physical=physical)
    assert_same_run(final_state(fresh), uninterrupted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("generator", ["default", "torch"])
def test_resume_on_cuda_is_bit_identical(tmp_path, generator):
    """CUDA noise from torch's default CUDA generator or a CUDA torch.Generator is restored."""
    path = str(tmp_path / "ckpt.pt")
    torch.cuda.manual_seed(0)
    parts = build(0, generator=generator, device="cuda")
    run(parts, 0, TOTAL_STEPS, save_at=SAVE_AT, path=path)
    uninterrupted = final_state(parts)
    torch.cuda.manual_seed(12345)  # disturb the default CUDA generator
    fresh = build(1000, generator=generator, device="cuda")
    fresh[0].load_checkpoint(path=path, module=fresh[1], optimizer=fresh[2], noise_scheduler=fresh[4])
    run(fresh, SAVE_AT, TOTAL_STEPS)
    assert_same_run(final_state(fresh), uninterrupted)


def test_checkpoint_contents_and_user_keys(tmp_path):
    path = tmp_path / "ckpt.pt"
    parts = build(0)
    run(parts, 0, 3)
    engine, model, optimizer, _, scheduler = parts
    user = {"epoch": 7, "note": "hello", "metrics": [0.5, 0.25]}
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer, noise_scheduler=scheduler,
                           checkpoint_dict=user)
    assert user == {"epoch": 7, "note": "hello", "metrics": [0.5, 0.25]}  # not modified
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(user) | set(CHECKPOINT_KEYS) - {"grad_clip_scheduler_state_dict"}
    assert raw["privacy_accountant_state_dict"] == {"history": [(1.0, 1 / 6, 3)], "mechanism": "rdp"}
    assert raw["dp_optimizer_state_dict"]["noise_generator"]["kind"] == "torch.Generator"
    assert raw["data_loader_sampler_state_dict"]["batches_drawn"] == 3
    fresh = build(1000)
    assert fresh[0].load_checkpoint(path=path, module=fresh[1], optimizer=fresh[2]) == user


def test_loading_replaces_the_ledger_and_never_double_counts(tmp_path):
    path = tmp_path / "ckpt.pt"
    parts = build(0)
    run(parts, 0, 3)
    engine, model, optimizer, _, _ = parts
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    run(parts, 3, 5)
    assert len(engine.accountant) == 5
    for _ in range(2):
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
        assert engine.accountant.history == [(1.0, 1 / 6, 3)]


def test_save_refuses_reserved_keys_and_mid_batch(tmp_path):
    parts = build(0)
    engine, model, optimizer, dl, _ = parts
    with pytest.raises(ValueError, match=r"checkpoint_dict uses reserved keys \['module_state_dict'\]"):
        engine.save_checkpoint(path=tmp_path / "a.pt", module=model,
                               checkpoint_dict={"module_state_dict": 1})
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=2, optimizer=optimizer) as bdl:
        x, y = next(iter(bdl))
        nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()
        assert optimizer._is_last_step_skipped
        with pytest.raises(ValueError, match="middle of a logical batch"):
            engine.save_checkpoint(path=tmp_path / "b.pt", module=model, optimizer=optimizer)
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_failed_load_changes_nothing(tmp_path):
    path = tmp_path / "ckpt.pt"
    parts = build(0, generator="dpcore")
    run(parts, 0, 3)
    parts[0].save_checkpoint(path=path, module=parts[1], optimizer=parts[2])
    engine, model, optimizer, dl, _ = fresh = build(1000, generator="torch")
    run(fresh, 0, 1)
    before = final_state(fresh)
    sampler_before = dl.batch_sampler.state_dict()
    with pytest.raises(ValueError, match="noise came from a 'NoiseSource' source but this optimizer's"):
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
    assert_same_run(final_state(fresh), before)
    assert dl.batch_sampler.state_dict() == sampler_before
    # A failure late in the sequence (sampler of another configuration) rolls back the rest.
    other = build(1000, generator="dpcore")
    other_dl = DataLoader(data(), batch_size=16)
    other_engine = other[0]
    other_engine._data_loader = other_engine._prepare_data_loader(
        other_dl, poisson_sampling=True, distributed=False)
    run(other, 0, 1)
    before = final_state(other)
    noise_before = other[2].generator.state_dict()
    with pytest.raises(ValueError, match="made by a sampler with config"):
        other_engine.load_checkpoint(path=path, module=other[1], optimizer=other[2])
    assert_same_run(final_state(other), before)
    assert other[2].generator.state_dict() == noise_before


def test_load_rejects_foreign_files_and_warns_on_missing_parts(tmp_path):
    engine, model, optimizer, _, _ = build(0)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="is not a PrivacyEngine checkpoint"):
        engine.load_checkpoint(path=tmp_path / "foreign.pt", module=model)
    engine.save_checkpoint(path=tmp_path / "no_opt.pt", module=model)
    with pytest.warns(UserWarning, match="the checkpoint has no optimizer state but optimizer=given"):
        engine.load_checkpoint(path=tmp_path / "no_opt.pt", module=model, optimizer=optimizer)
    lone = PrivacyEngine()
    with pytest.warns(UserWarning, match="no data loader to restore it into"):
        lone.load_checkpoint(path=tmp_path / "no_opt.pt", module=model)


def test_secure_mode_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    parts = build(0, generator="default", engine=PrivacyEngine(secure_mode=True))
    run(parts, 0, 2)
    engine, model, optimizer, _, _ = parts
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    raw = torch.load(path, weights_only=True)
    assert raw["dp_optimizer_state_dict"]["noise_generator"] == {"kind": "secure"}
    assert raw["data_loader_sampler_state_dict"]["bit_generator_state"] is None
    fresh = build(1000, generator="default", engine=PrivacyEngine(secure_mode=True))
    fresh[0].load_checkpoint(path=path, module=fresh[1], optimizer=fresh[2])
    assert fresh[0].accountant.history == [(1.0, 1 / 6, 2)]
    assert all(torch.equal(a, b) for a, b in zip(fresh[1].parameters(), model.parameters()))
    seeded = build(2000, generator="default")  # a seeded (non-secure) sampler refuses a secure state
    with pytest.raises(ValueError, match="secure_mode"):
        seeded[0].load_checkpoint(path=path, module=seeded[1], optimizer=seeded[2])


def test_ghost_mode_restores_the_bound_of_module_and_optimizer(tmp_path):
    """Ghost clipping clips in the backward pass with the module's bound: both are restored."""
    results = []
    for max_grad_norm in (1.0, 2.5):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 3))
        engine = PrivacyEngine()
        dp_model, optimizer, criterion, dl = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data(), batch_size=8, generator=torch.Generator().manual_seed(1)),
            noise_multiplier=1.0, max_grad_norm=max_grad_norm, grad_sample_mode="ghost",
            noise_generator=torch.Generator().manual_seed(2),
        )
        results.append((engine, dp_model, optimizer, criterion, dl))
    engine, dp_model, optimizer, criterion, dl = results[0]
    for x, y in dl:
        criterion(dp_model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    engine.save_checkpoint(path=tmp_path / "ghost.pt", module=dp_model, optimizer=optimizer)
    engine2, dp_model2, optimizer2, _, _ = results[1]
    engine2.load_checkpoint(path=tmp_path / "ghost.pt", module=dp_model2, optimizer=optimizer2)
    assert dp_model2.max_grad_norm == optimizer2.max_grad_norm == 1.0
    assert engine2.accountant.history == engine.accountant.history == [(1.0, 1 / 6, 6)]
    assert all(torch.equal(a, b) for a, b in zip(dp_model2.parameters(), dp_model.parameters()))
