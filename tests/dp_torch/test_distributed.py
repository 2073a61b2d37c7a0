"""Distributed DP-SGD on real gloo process groups (spawned processes on loopback).

One 2-process group (shared by most tests through a module fixture) trains every
scenario of :mod:`tests.dp_torch._dist_workers`; the oracles are the single-process
engine on the union of the ranks' batches (computed here, in the test process),
a loop of batch-size-1 backward passes with dpcore's clipping, dpcore's Poisson
plan, and KS tests on the aggregated noise.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import math
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from scipy import stats  # noqa: E402
from torch import nn  # noqa: E402

from dp_torch import PrivacyEngine  # noqa: E402
from dp_torch.data_loader import DPDataLoader  # noqa: E402
from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP  # noqa: E402
from dp_torch.optimizers import (  # noqa: E402
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DistributedPerLayerOptimizer,
    SimpleDistributedPerLayerOptimizer,
    get_optimizer_class,
)
from dp_torch.utils.uniform_sampler import (  # noqa: E402
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from dpcore import clipping as core_clipping  # noqa: E402
from dpcore import sampling as core_sampling  # noqa: E402
from tests.dp_torch import _dist_workers as W  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

RTOL, ATOL = 1e-5, 1e-6
TRAINED = ("flat_zero", "flat_noise", "perlayer_zero", "perlayer_noise", "ghost_noise",
           "ddp_hooks_noise", "ddp_perlayer_noise", "ddp_ghost_noise", "bmm_noise",
           "bmm_ddp_ghost")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario (and the noise runs) trained once on a 2-process gloo group."""
    workdir = tmp_path_factory.mktemp("two_ranks")
    run = W.run_group("train_scenarios", 2, workdir, timeout=150,
                      names=list(W.SCENARIOS), noise=True)
    return run.results, workdir


@pytest.fixture
def single_group(tmp_path):
    """A world-size-1 gloo group in this process (destroyed afterwards)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _union(results, name, world_size):
    per_rank = [results[r][name]["batches"] for r in range(world_size)]
    return [sorted(sum((per_rank[r][k] for r in range(world_size)), []))
            for k in range(len(per_rank[0]))]


def _reference(name, batches):
    """Single-process DP steps on the given (union) batches: the spec of a distributed step."""
    scn = dataclasses.replace(W.SCENARIOS[name], grad_sample_mode="hooks",
                              max_physical_batch_size=None, wrapper="dpddp")
    objs = W.build(scn, distributed=False, sampling_seed=None)
    params = []
    for idx in batches:
        x, y, _ = objs["dataset"][torch.tensor(idx, dtype=torch.long)]
        objs["optimizer"].zero_grad()
        W._loss(objs["model"], objs["criterion"], x, y).backward()
        objs["optimizer"].step()
        params.append(W.params_of(objs["net"]))
    return params, objs["engine"]


def _check_same_update(results, name, world_size):
    union = _union(results, name, world_size)
    expected, _ = _reference(name, union)
    for r in range(world_size):
        got = results[r][name]["params"]
        assert len(got) == W.STEPS
        assert_close([t.numpy() for step in got for t in step],
                     [t.numpy() for step in expected for t in step], rtol=RTOL, atol=ATOL)
        assert all(torch.equal(a, b) for a, b in zip(sum(got, []), sum(results[0][name]["params"], [])))


# --------------------------------------------------------------------------- 2 processes


@pytest.mark.parametrize("name", [n for n in TRAINED if not n.startswith("bmm")])
def test_update_equals_single_process_update_on_the_union(two_ranks, name):
    results, _ = two_ranks
    _check_same_update(results, name, 2)


def test_ranks_sample_disjoint_shards_whose_union_is_the_global_poisson_batch(two_ranks):
    results, _ = two_ranks
    plan = core_sampling.PoissonSampler(W.N, W.SAMPLE_RATE, seed=W.SAMPLING_SEED)
    perm = torch.randperm(W.N, generator=torch.Generator().manual_seed(0))  # shuffle epoch 0
    expected = [sorted(perm[torch.from_numpy(b)].tolist()) for b, _ in zip(plan, range(W.STEPS))]
    for name in TRAINED:
        a, b = (results[r][name]["batches"] for r in range(2))
        assert all(not set(x) & set(y) for x, y in zip(a, b))
        assert _union(results, name, 2) == expected


def test_flat_update_matches_a_loop_of_single_example_backward_passes(two_ranks):
    results, _ = two_ranks
    dataset = W.make_dataset()
    net = W.make_net()
    for step, idx in enumerate(_union(results, "flat_zero", 2)):
        grads = []
        for i in idx:
            net.zero_grad()
            x, y, _ = dataset[i : i + 1]
            nn.CrossEntropyLoss()(net(x), y).backward()
            grads.append([p.grad.detach().numpy().astype(np.float64).copy() for p in net.parameters()])
        per_param = [np.stack([g[k] for g in grads]) for k in range(len(grads[0]))] if grads else None
        summed = (core_clipping.clip_and_sum(per_param, W.FLAT_C) if grads
                  else [np.zeros(tuple(p.shape)) for p in net.parameters()])
        with torch.no_grad():
            for p, s in zip(net.parameters(), summed):
                p -= W.LR * torch.from_numpy(s / W.BATCH_SIZE).float()
        for r in range(2):
            assert_close([t.numpy() for t in results[r]["flat_zero"]["params"][step]],
                         [p.detach().numpy() for p in net.parameters()], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["seeded_flat", "seeded_per_layer", "secure_flat"])
def test_noise_is_added_exactly_once(two_ranks, name):
    results, _ = two_ranks
    run = results[0]["noise"][name]
    noise = run["noise"].numpy()
    assert noise.size == 100 * 50 + 50
    scale = 1.0 * run["max_grad_norm"]  # sigma * C, in the sum (before dividing by B)
    assert stats.kstest(noise / scale, "norm").pvalue > 1e-4
    assert stats.kstest(noise / (math.sqrt(2) * scale), "norm").pvalue < 1e-8
    assert stats.kstest(noise / (2 * scale), "norm").pvalue < 1e-8
    # every rank applied the same noised update
    assert torch.equal(results[1]["noise"][name]["noise"], run["noise"])


@pytest.mark.parametrize("name", ["flat_noise", "perlayer_noise", "ghost_noise", "bmm_noise"])
def test_epsilon_equals_single_process_training(two_ranks, name):
    results, _ = two_ranks
    _, engine = _reference(name, _union(results, name, 2))
    expected_history = [(W.SIGMA, W.SAMPLE_RATE, W.STEPS)]
    assert engine.accountant.history == expected_history
    for r in range(2):
        assert results[r][name]["history"] == expected_history
        assert results[r][name]["epsilon"] == engine.get_epsilon(W.DELTA)


@pytest.mark.parametrize("name", ["bmm_noise", "bmm_ddp_ghost"])
def test_batch_memory_manager_with_unequal_chunk_counts(two_ranks, name):
    results, _ = two_ranks
    chunks = [results[r][name]["chunks"] for r in range(2)]
    sizes = [[len(b) for b in results[r][name]["batches"]] for r in range(2)]
    assert any(a != b for a, b in zip(*chunks)), (chunks, sizes)
    for r in range(2):
        assert chunks[r] == [max(1, math.ceil(n / W.BMM_CHUNK)) for n in sizes[r]]
        assert results[r][name]["steps_recorded"] == W.STEPS  # once per logical step
    _check_same_update(results, name, 2)


def test_ddp_never_all_reduces_unclipped_gradients(two_ranks):
    results, _ = two_ranks
    for r in range(2):
        grads = results[r]["ddp_grads"]
        assert_close([g.numpy() for g in grads["seen"]], [g.numpy() for g in grads["local"]],
                     rtol=1e-6, atol=1e-7)
    assert not torch.allclose(results[0]["ddp_grads"]["seen"][0], results[1]["ddp_grads"]["seen"][0])


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_written_by_rank_zero_only(two_ranks):
    _, workdir = two_ranks
    assert (workdir / "ckpt_rank0.pt").exists()
    assert not (workdir / "ckpt_rank1.pt").exists()


def _check_resumed(results, resumed, world_size):
    saved = results[0]["resume"]
    assert_close([t.numpy() for t in resumed["loaded"]["params"]],
                 [t.numpy() for t in saved["params"][1]], rtol=0)
    assert resumed["loaded"]["history"] == [(W.SIGMA, W.SAMPLE_RATE, 2)]
    union = _union(results, "resume", 2)[2]
    assert sorted(sum((resumed["rank_batches"][r] for r in range(world_size)), [])) == union
    assert_close([t.numpy() for t in resumed["step"]["params"][0]],
                 [t.numpy() for t in saved["params"][2]], rtol=RTOL, atol=ATOL)
    assert resumed["step"]["history"] == [(W.SIGMA, W.SAMPLE_RATE, 3)]


def test_checkpoint_of_two_processes_resumes_in_one_process_group(two_ranks, single_group):
    results, workdir = two_ranks
    resumed = W.resume_and_step(0, 1, str(workdir), checkpoint=str(workdir / "ckpt_rank0.pt"))
    resumed["rank_batches"] = [resumed["step"]["batches"][0]]
    _check_resumed(results, resumed, 1)


def test_checkpoint_of_two_processes_loads_into_a_plain_single_process_model(two_ranks):
    results, workdir = two_ranks
    scn = W.SCENARIOS["resume"]
    objs = W.build(scn, distributed=False)  # GradSampleModule(net): no "module." prefix
    objs["engine"].load_checkpoint(path=workdir / "ckpt_rank0.pt", module=objs["model"],
                                   optimizer=objs["optimizer"])
    assert_close([p.detach().numpy() for p in objs["net"].parameters()],
                 [t.numpy() for t in results[0]["resume"]["params"][1]], rtol=0)
    assert objs["engine"].accountant.history == [(W.SIGMA, W.SAMPLE_RATE, 2)]
    # The seeded stream continues: the next plain Poisson batch, relabelled like the
    # distributed sampler's epoch-0 shuffle, is the 2-process run's third global batch.
    next_batch = next(iter(objs["loader"].batch_sampler))
    perm = torch.randperm(W.N, generator=torch.Generator().manual_seed(0))
    assert sorted(perm[torch.tensor(next_batch, dtype=torch.long)].tolist()) == \
        _union(results, "resume", 2)[2]


# --------------------------------------------------------------------------- failures


def test_a_rank_that_dies_mid_step_makes_the_others_fail_fast_with_nothing_applied(tmp_path):
    run = W.run_group("die_mid_step", 2, tmp_path, timeout=90, expect_results=[0], abort=True,
                      how="exit")
    out = run.results[0]
    assert out["error"] is not None and out["step"] == 1
    assert "all-reduce" in out["error"] and "Nothing was applied" in out["error"]
    assert out["seconds"] < 60
    assert out["params_unchanged"] and out["state_unchanged"] and out["grads_cleared"]
    assert out["steps_after"] == out["steps_before"] == 1
    assert run.exitcodes[1] == 17


@pytest.mark.slow
def test_a_rank_that_hangs_makes_the_others_fail_at_the_process_group_timeout(tmp_path):
    run = W.run_group("die_mid_step", 2, tmp_path, timeout=90, expect_results=[0], abort=True,
                      pg_timeout=5.0, how="hang")
    out = run.results[0]
    assert out["error"] is not None and "timed out" in out["error"].lower()
    assert 4.0 < out["seconds"] < 60
    assert out["params_unchanged"] and out["grads_cleared"]
    assert out["steps_after"] == out["steps_before"]


# --------------------------------------------------------------------------- 4 processes


@pytest.mark.slow
def test_four_processes_equal_single_process_and_resume_a_two_process_checkpoint(two_ranks,
                                                                                   tmp_path):
    results2, workdir2 = two_ranks
    names = list(TRAINED)
    run = W.run_group("train_scenarios", 4, tmp_path / "train", timeout=240, names=names)
    for name in names:
        _check_same_update(run.results, name, 4)
        for r in range(4):
            assert run.results[r][name]["history"] == [(W.SIGMA if "zero" not in name else 0.0,
                                                        W.SAMPLE_RATE, W.STEPS)]
    resumed = W.run_group("resume_and_step", 4, tmp_path / "resume", timeout=120,
                          checkpoint=str(workdir2 / "ckpt_rank0.pt"))
    for r in range(4):
        out = dict(resumed.results[r])
        out["rank_batches"] = [resumed.results[q]["step"]["batches"][0] for q in range(4)]
        _check_resumed(results2, out, 4)


# --------------------------------------------------------------------------- one process


def test_get_optimizer_class_distributed():
    assert get_optimizer_class("flat", True) is DistributedDPOptimizer
    assert get_optimizer_class("flat", True, "hooks") is DistributedDPOptimizer
    assert get_optimizer_class("per_layer", True, "functorch") is SimpleDistributedPerLayerOptimizer
    assert get_optimizer_class("flat", True, "ghost") is DistributedDPOptimizerFastGradientClipping
    assert issubclass(DistributedPerLayerOptimizer, SimpleDistributedPerLayerOptimizer)
    with pytest.raises(ValueError, match="adaptive"):
        get_optimizer_class("adaptive", True)
    with pytest.raises(ValueError, match="ghost"):
        get_optimizer_class("per_layer", True, "ghost")


def test_distributed_optimizer_needs_a_process_group():
    net = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0,
                               max_grad_norm=1.0, expected_batch_size=4)


def _private(module, loader=None, engine=None, **kwargs):
    dataset = W.make_dataset()
    return (engine or PrivacyEngine()).make_private(
        module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        data_loader=loader or torch.utils.data.DataLoader(dataset, batch_size=12),
        noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)


_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(W.FEATURES, W.CLASSES)
        self.register_buffer("offset", torch.zeros(W.CLASSES))

    def forward(self, x):
        return self.fc(x) + self.offset


def _noop_user_hook(state, bucket):  # a user's own DDP hook (annotations would be checked)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: DPDDP(W.make_net()), {"clipping": "adaptive", "target_unclipped_quantile": 0.5,
                                       "clipbound_learning_rate": 0.2, "max_clipbound": 10.0,
                                       "min_clipbound": 0.1, "unclipped_num_std": 1.0},
         ValueError, "adaptive"),
        (lambda: nn.parallel.DistributedDataParallel(W.make_net(), find_unused_parameters=True),
         {}, ValueError, "find_unused_parameters"),
        (lambda: nn.parallel.DistributedDataParallel(_WithBuffer()), {}, ValueError,
         "forward_sync_buffers=False"),
        (lambda: nn.parallel.DistributedDataParallel(W.make_net(), static_graph=True), {},
         ValueError, "static_graph"),
    ],
)
def test_make_private_refuses_distributed_settings_that_cannot_be_private(single_group, make,
                                                                          kwargs, error, match):
    module = make()
    with pytest.raises(error, match=match):
        _private(module, **kwargs)
    assert not any(hasattr(m, "autograd_grad_sample_hooks") for m in module.modules())


def test_make_private_refuses_a_ddp_with_its_own_comm_hook(single_group):
    ddp = nn.parallel.DistributedDataParallel(W.make_net())
    ddp.register_comm_hook(None, _noop_user_hook)
    with pytest.raises(ValueError, match="communication hook"):
        _private(ddp)


def test_make_private_refuses_a_non_distributed_poisson_loader(single_group):
    loader = DPDataLoader(W.make_dataset(), sample_rate=0.25)
    with pytest.raises(ValueError, match="non-distributed DPDataLoader"):
        _private(DPDDP(W.make_net()), loader=loader)


def test_make_private_accepts_ddp_without_buffers_sync_and_is_idempotent(single_group):
    ddp = nn.parallel.DistributedDataParallel(_WithBuffer(), **_NO_BUFFER_SYNC)
    model, optimizer, loader = _private(ddp)
    assert isinstance(optimizer, DistributedDPOptimizer)
    assert loader.distributed and optimizer.expected_batch_size == 12
    assert ddp.require_backward_grad_sync is False
    model.cleanup()
    # A second make_private on the same DDP finds the local-only hook already there.
    model2, optimizer2, _ = PrivacyEngine().make_private(
        module=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(W.make_dataset(), batch_size=12),
        noise_multiplier=1.0, max_grad_norm=1.0, wrap_model=False)
    assert isinstance(optimizer2, DistributedDPOptimizer)
    model2.cleanup()


def test_sampler_state_moves_across_world_sizes():
    kwargs = {"total_size": W.N, "sample_rate": W.SAMPLE_RATE, "seed": 5}
    two = [DistributedUniformWithReplacementSampler(rank=r, world_size=2, **kwargs)
           for r in range(2)]
    iters = [iter(s) for s in two]
    for _ in range(2):
        for it in iters:
            next(it)
    state = two[0].state_dict()
    expected = sorted(next(iters[0]) + next(iters[1]))
    four = [DistributedUniformWithReplacementSampler(rank=r, world_size=4, **kwargs)
            for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    assert sorted(sum((next(iter(s)) for s in four), [])) == expected
    one = UniformWithReplacementSampler(num_samples=W.N, sample_rate=W.SAMPLE_RATE, seed=5)
    one.load_state_dict(state)
    perm = torch.randperm(W.N, generator=torch.Generator().manual_seed(0))
    assert sorted(perm[torch.tensor(next(iter(one)), dtype=torch.long)].tolist()) == expected
    other = DistributedUniformWithReplacementSampler(rank=0, world_size=4, total_size=W.N + 1,
                                                     sample_rate=W.SAMPLE_RATE, seed=5)
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(state)


def test_save_checkpoint_on_a_non_zero_rank_writes_nothing(tmp_path, monkeypatch, single_group):
    import dp_torch._checkpoint as checkpoint

    engine = PrivacyEngine()
    model, optimizer, _ = _private(DPDDP(W.make_net()), engine=engine)
    monkeypatch.setattr(checkpoint, "_process_rank", lambda: 1)
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    assert not (tmp_path / "c.pt").exists()
    monkeypatch.undo()
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    assert (tmp_path / "c.pt").exists()


# --------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_distributed_benchmark_smoke(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "distributed.py"), "--smoke", "--modes",
         "dp_torch-ghost", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = report["results"]
    assert set(report["meta"]["effective_cores"]) == {"1", "2"}
    assert report["meta"]["effective_cores"]["1"] == 1.0 and "Effective cores" in done.stdout
    assert [(r["mode"], r["world_size"]) for r in rows] == [("dp_torch-ghost", 1),
                                                            ("dp_torch-ghost", 2)]
    for r in rows:
        assert r["examples_per_s"] == pytest.approx(r["examples"] / r["seconds"])
        assert r["steps"] == 2 and r["seconds"] > 0
    assert "| torch | dp_torch-ghost | 2 |" in done.stdout
    pytest.importorskip("jax")
    jax_out = tmp_path / "bench_jax.json"
    jax = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "distributed.py"), "--backend", "jax",
         "--smoke", "--modes", "dp_jax-vmap", "--json", str(jax_out)],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert jax.returncode == 0, jax.stderr[-3000:]
    rows = json.loads(jax_out.read_text(encoding="utf-8"))["results"]
    assert [(r["backend"], r["mode"], r["world_size"]) for r in rows] == [
        ("jax", "dp_jax-vmap", 1), ("jax", "dp_jax-vmap", 2)]
    assert all(r["examples"] == 2 * 8 and r["examples_per_s"] > 0 for r in rows)
