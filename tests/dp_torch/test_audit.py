"""Canary audits of dp_torch: planted bugs must be flagged, the real library must not be.

Each planted bug monkeypatches the *library* (a function or method of the DP
optimizer or the Poisson sampler), never the audit, so the audit sees the bug the
way a user's training run would. The step audit runs one real step with many
Dirac canaries, the run audit one real Poisson-sampled run (see dp_torch.audit).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from dp_torch import audit
from dp_torch.optimizers import optimizer as optimizer_module
from dp_torch.optimizers.optimizer import DPOptimizer
from dp_torch.utils.uniform_sampler import UniformWithReplacementSampler

SIGMA = 1.0
STEP = {"noise_multiplier": SIGMA, "trials": 2000}
RUN = {"noise_multiplier": SIGMA, "sample_rate": 0.1, "steps": 40, "num_canaries": 500}
PHYSICAL = 512
CHUNKS = 4

Patch = Callable[[pytest.MonkeyPatch], None]


# --------------------------------------------------------------------------- planted bugs


def noise_off(mp: pytest.MonkeyPatch) -> None:
    """The noise generator returns zeros."""
    mp.setattr(optimizer_module, "_generate_noise",
               lambda std, reference, *args, **kwargs: torch.zeros_like(reference))


def _realised_rows(optimizer: DPOptimizer) -> int:
    return max(1, int(optimizer.grad_samples[0].shape[0]))


def noise_over_batch_size(mp: pytest.MonkeyPatch) -> None:
    """The noise std is divided by the (realised) batch size."""
    original = DPOptimizer.add_noise

    def add_noise(self: DPOptimizer) -> None:
        saved = self.noise_multiplier
        self.noise_multiplier = saved / _realised_rows(self)
        try:
            original(self)
        finally:
            self.noise_multiplier = saved

    mp.setattr(DPOptimizer, "add_noise", add_noise)


def clipping_skipped(mp: pytest.MonkeyPatch) -> None:
    """Every clip factor is 1."""
    mp.setattr(optimizer_module, "_clip_factor",
               lambda norms, max_grad_norm: torch.ones_like(norms))


def noise_per_chunk(mp: pytest.MonkeyPatch) -> None:
    """Virtual steps add ``sigma C / k`` noise per physical chunk instead of ``sigma C`` once."""
    original = DPOptimizer._accumulate_batch
    generator = torch.Generator().manual_seed(0)

    def accumulate(self: DPOptimizer) -> None:
        original(self)
        std = self.noise_multiplier * self.max_grad_norm / CHUNKS
        for p in self.params:
            noise = torch.randn(p.summed_grad.shape, generator=generator)
            p.summed_grad = p.summed_grad + std * noise

    mp.setattr(DPOptimizer, "_accumulate_batch", accumulate)
    noise_off(mp)


def mixed_before_clipping(mp: pytest.MonkeyPatch) -> None:
    """Every example is given the batch-mean gradient before clipping."""
    original = optimizer_module._flat_grad_sample

    def mixed(p: torch.Tensor) -> Any:
        g = original(p)
        return None if g is None else g.mean(dim=0, keepdim=True).expand_as(g)

    mp.setattr(optimizer_module, "_flat_grad_sample", mixed)


def divided_by_realised_batch(mp: pytest.MonkeyPatch) -> None:
    """The noised sum is divided by the realised batch size."""

    def scale_grad(self: DPOptimizer) -> None:
        rows = _realised_rows(self)
        for p in self.params:
            p.grad /= rows

    mp.setattr(DPOptimizer, "scale_grad", scale_grad)


def shuffled_batches(mp: pytest.MonkeyPatch) -> None:
    """The "Poisson" sampler yields a shuffled epoch in fixed-size batches."""

    def shuffled(self: UniformWithReplacementSampler) -> Iterator[list[int]]:
        n = self.num_samples
        size = max(1, round(n * self.sample_rate))
        order = torch.randperm(n).tolist()
        for t in range(len(self)):
            yield order[(t * size) % n:][:size]

    mp.setattr(UniformWithReplacementSampler, "__iter__", shuffled)


BUGS: list[tuple[str, Patch, str, dict[str, Any]]] = [
    ("noise off", noise_off, "step", {}),
    ("noise off", noise_off, "run", {}),
    ("noise / batch size", noise_over_batch_size, "step", {}),
    ("clipping skipped", clipping_skipped, "step", {}),
    ("clipping skipped", clipping_skipped, "run", {}),
    ("noise sigma*C/k per chunk", noise_per_chunk, "step", {"physical_batch_size": PHYSICAL}),
    ("mixed before clipping", mixed_before_clipping, "step", {}),
    ("/ realised batch size", divided_by_realised_batch, "step", {}),
    ("/ realised batch size", divided_by_realised_batch, "run", {}),
    ("shuffled batches", shuffled_batches, "run", {}),
]


def run_kind(kind: str, seed: int, **kwargs: Any) -> Any:
    """The step or run audit at this file's sizes."""
    if kind == "step":
        return audit.step_audit(seed=seed, **STEP, **kwargs)
    return audit.run_audit(seed=seed, **RUN, **kwargs)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "name,patch,kind,kwargs", BUGS, ids=[f"{b[2]}-{b[0]}" for b in BUGS])
def test_planted_bug_is_flagged(
    monkeypatch: pytest.MonkeyPatch, name: str, patch: Patch, kind: str, kwargs: dict[str, Any]
) -> None:
    patch(monkeypatch)
    result = run_kind(kind, 0, **kwargs)
    assert result.flagged, (name, result.reasons)


def test_shuffled_batches_fail_the_sampler_test(monkeypatch: pytest.MonkeyPatch) -> None:
    shuffled_batches(monkeypatch)
    result = run_kind("run", 1)
    assert not result.sampler.passed
    assert "batch-size spread" in result.sampler.reason


def test_skipped_clipping_shows_as_ten_times_the_in_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    clipping_skipped(monkeypatch)
    result = run_kind("step", 0)
    assert result.in_mean.observed == pytest.approx(audit.CANARY_NORM_FACTOR, abs=0.3)


@pytest.mark.parametrize("mode,physical", [
    ("hooks", None), ("ghost", None), ("functorch", None), ("hooks", PHYSICAL),
])
def test_correct_step_is_not_flagged_and_calibrated(mode: str, physical: Any) -> None:
    result = run_kind("step", 3, grad_sample_mode=mode, physical_batch_size=physical)
    assert not result.flagged, result.reasons
    assert result.out_std.observed == pytest.approx(SIGMA, rel=0.1)
    assert result.in_mean.observed == pytest.approx(1.0, abs=0.15)
    assert result.num_in + result.num_out == STEP["trials"]
    assert all(a <= c for a, c in zip(result.audited_epsilons, result.claimed_epsilons))
    assert result.gdp.mu is not None and 0.5 < result.gdp.mu <= result.claimed_mu


@pytest.mark.parametrize("seed", [0, 1])
def test_correct_run_is_not_flagged(seed: int) -> None:
    result = run_kind("run", seed)
    assert not result.flagged, result.reasons
    assert result.sampler.passed
    assert len(result.claimed_epsilons) == len(audit.DEFAULT_DELTAS)
    assert result.claimed_epsilons[0] > result.claimed_epsilons[-1] > 0


def test_ghost_run_is_not_flagged() -> None:
    result = run_kind("run", 2, grad_sample_mode="ghost", accountant="rdp")
    assert not result.flagged, result.reasons
    assert result.grad_sample_mode == "ghost" and result.accountant == "rdp"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["step", "run"])
def test_no_false_alarm_over_seeds(kind: str) -> None:
    flagged = [seed for seed in range(20) if run_kind(kind, 100 + seed).flagged]
    assert flagged == []


@pytest.mark.slow
@pytest.mark.parametrize("mode,physical", [("ghost", None), ("functorch", None), ("hooks", 256)])
def test_no_false_alarm_over_seeds_other_paths(mode: str, physical: Any) -> None:
    flagged = [seed for seed in range(20)
               if run_kind("step", 200 + seed, grad_sample_mode=mode,
                           physical_batch_size=physical).flagged]
    assert flagged == []


@pytest.mark.parametrize("kwargs,match", [
    ({"noise_multiplier": 0.0}, "noise_multiplier"),
    ({"noise_multiplier": 1.0, "grad_sample_mode": "ew"}, "grad_sample_mode"),
    ({"noise_multiplier": 1.0, "trials": 2}, "trials"),
    ({"noise_multiplier": 1.0, "deltas": ()}, "deltas"),
    ({"noise_multiplier": 1.0, "significance": 1.5}, "significance"),
    ({"noise_multiplier": 1.0, "physical_batch_size": 0}, "physical_batch_size"),
])
def test_step_audit_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        audit.step_audit(**kwargs)


def test_run_audit_rejects_too_many_guesses() -> None:
    with pytest.raises(ValueError, match="num_guesses"):
        audit.run_audit(noise_multiplier=1.0, sample_rate=0.1, steps=2, num_canaries=10,
                        num_guesses=11)


SMALL_CLI = ["--noise-multiplier", "1.0", "--sample-rate", "0.1", "--steps", "10",
             "--num-canaries", "100", "--trials", "200", "--seed", "0"]


def test_main_prints_a_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert audit.main([*SMALL_CLI, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flagged"] is False
    assert report["step"]["claimed_mu"] == 1.0
    assert len(report["run"]["one_run"]) == len(audit.DEFAULT_DELTAS)


def test_main_exits_one_when_flagged(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    noise_off(monkeypatch)
    assert audit.main([*SMALL_CLI, "--audit", "step"]) == 1
    assert "FLAGGED" in capsys.readouterr().out


def test_module_runs_as_a_subprocess() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "dp_torch.audit", *SMALL_CLI, "--audit", "step",
         "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"]["flagged"] is False


def test_canaries_all_on_one_side_are_refused() -> None:
    outcomes = []
    for seed in range(64):
        try:
            outcomes.append(int(audit._draw_included(4, seed, "trials").sum()))
        except ValueError as error:
            assert "fell on one side" in str(error) and "trials" in str(error)
            outcomes.append(-1)
    assert -1 in outcomes and set(outcomes) - {-1} <= {1, 2, 3}
