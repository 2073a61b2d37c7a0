"""Process-group workers for ``tests/dp_torch/test_distributed.py``.

Every function here runs inside a process started with the ``spawn`` method (never
``fork``): :func:`run_group` starts ``world_size`` processes that join a real gloo
process group through a ``FileStore`` in a temporary directory, run one worker
function and write its result (``torch.save``) or the traceback to that directory.
The same functions also build the single-process references in the test process.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib
import os
import pathlib
import time
import traceback
import uuid
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "GroupResult",
    "SCENARIOS",
    "Scenario",
    "make_dataset",
    "make_net",
    "run_group",
]

N = 48
FEATURES = 6
CLASSES = 3
SAMPLE_RATE = 0.25  # = 1 / len(DataLoader(dataset, batch_size=12)); expected batch 12
BATCH_SIZE = 12
LR = 1.0
SAMPLING_SEED = 7
NOISE_SEED = 11
STEPS = 3
FLAT_C = 0.5
PER_LAYER_C = [0.3, 0.2, 0.4, 0.1]
SIGMA = 0.7
DELTA = 1e-5
PG_TIMEOUT_S = 30.0
BMM_CHUNK = 5


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One distributed training configuration (and its single-process twin)."""

    name: str
    wrapper: str = "dpddp"  # "dpddp" | "ddp"
    clipping: str = "flat"
    grad_sample_mode: str = "hooks"
    sigma: float = SIGMA
    max_physical_batch_size: Optional[int] = None
    save_after: Optional[int] = None  # save a checkpoint after this many logical steps

    @property
    def max_grad_norm(self) -> Any:
        return list(PER_LAYER_C) if self.clipping == "per_layer" else FLAT_C


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("flat_zero", sigma=0.0),
        Scenario("flat_noise"),
        Scenario("perlayer_zero", clipping="per_layer", sigma=0.0),
        Scenario("perlayer_noise", clipping="per_layer"),
        Scenario("ghost_noise", grad_sample_mode="ghost"),
        Scenario("ddp_hooks_noise", wrapper="ddp"),
        Scenario("ddp_perlayer_noise", wrapper="ddp", clipping="per_layer"),
        Scenario("ddp_ghost_noise", wrapper="ddp", grad_sample_mode="ghost"),
        # chunks of <= 5: with 2 ranks the shares 5/8, 4/8, 7/3 of the first steps give
        # 1/2, 1/2, 2/1 chunks (one rank finishes its first logical step in one chunk)
        Scenario("bmm_noise", max_physical_batch_size=BMM_CHUNK),
        Scenario("bmm_ddp_ghost", wrapper="ddp", grad_sample_mode="ghost",
                 max_physical_batch_size=BMM_CHUNK),
        Scenario("resume", save_after=2),
    )
}


# --------------------------------------------------------------------------- data and model


def make_dataset() -> TensorDataset:
    """``N`` examples ``(x, y, index)``; the index lets ranks report which examples they used."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return TensorDataset(x, y, torch.arange(N))


def make_net() -> nn.Module:
    """The MLP 6 -> 5 (tanh) -> 3 with a fixed initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(FEATURES, 5), nn.Tanh(), nn.Linear(5, CLASSES))


def params_of(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _loss(model: nn.Module, criterion: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    out = model(x)
    if len(y) == 0 and isinstance(criterion, nn.Module):
        return out.sum() * 0.0  # an empty Poisson share still takes part in the step
    return criterion(out, y)


# --------------------------------------------------------------------------- building


def build(scn: Scenario, *, distributed: bool, sampling_seed: Optional[int] = SAMPLING_SEED,
          wrap: bool = True, momentum: float = 0.0) -> dict[str, Any]:
    """Model, DP optimizer, criterion and loader for ``scn`` (distributed or one process)."""
    from dp_torch import PrivacyEngine
    from dp_torch.data_loader import DPDataLoader
    from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from dpcore.noise import NoiseSource

    dataset = make_dataset()
    net = make_net()
    model: nn.Module = net
    if distributed and wrap:
        model = DPDDP(net) if scn.wrapper == "dpddp" else nn.parallel.DistributedDataParallel(net)
    if sampling_seed is None:
        loader: DataLoader = DataLoader(dataset, batch_size=BATCH_SIZE)
    else:
        loader = DPDataLoader(dataset, sample_rate=SAMPLE_RATE, distributed=distributed,
                              seed=sampling_seed)
    engine = PrivacyEngine()
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum),
        data_loader=loader,
        noise_multiplier=scn.sigma, max_grad_norm=scn.max_grad_norm, clipping=scn.clipping,
        grad_sample_mode=scn.grad_sample_mode, noise_generator=NoiseSource(seed=NOISE_SEED),
    )
    if scn.grad_sample_mode == "ghost":
        dp_model, optimizer, criterion, dp_loader = out
    else:
        (dp_model, optimizer, dp_loader), criterion = out, nn.CrossEntropyLoss()
    return {"engine": engine, "net": net, "model": dp_model, "optimizer": optimizer,
            "criterion": criterion, "loader": dp_loader, "dataset": dataset}


def _physical_loader(objs: dict[str, Any], scn: Scenario) -> Any:
    from dp_torch.utils.batch_memory_manager import BatchMemoryManager

    if scn.max_physical_batch_size is None:
        return None
    return BatchMemoryManager(data_loader=objs["loader"], optimizer=objs["optimizer"],
                              max_physical_batch_size=scn.max_physical_batch_size)


def train(objs: dict[str, Any], scn: Scenario, steps: int, save_path: Optional[str] = None
          ) -> dict[str, Any]:
    """Run ``steps`` logical steps; record local batches, chunk counts and parameters."""
    bmm = _physical_loader(objs, scn)
    loader = bmm.__enter__() if bmm is not None else objs["loader"]
    model, optimizer, criterion = objs["model"], objs["optimizer"], objs["criterion"]
    batches: list[list[int]] = []
    chunks: list[int] = []
    params: list[list[torch.Tensor]] = []
    current: list[int] = []
    n_chunks = 0
    for x, y, idx in loader:
        optimizer.zero_grad()
        _loss(model, criterion, x, y).backward()
        optimizer.step()
        current += idx.tolist()
        n_chunks += 1
        if getattr(optimizer, "_is_last_step_skipped", False):
            continue
        batches.append(sorted(current))
        chunks.append(n_chunks)
        params.append(params_of(objs["net"]))
        current, n_chunks = [], 0
        if save_path is not None and len(batches) == scn.save_after:
            objs["engine"].save_checkpoint(path=save_path, module=model, optimizer=optimizer)
        if len(batches) == steps:
            break
    if bmm is not None:
        bmm.__exit__(None, None, None)
    engine = objs["engine"]
    return {"batches": batches, "chunks": chunks, "params": params,
            "history": engine.accountant.history, "epsilon": engine.get_epsilon(DELTA),
            "steps_recorded": len(engine.accountant)}


# --------------------------------------------------------------------------- workers


def train_scenarios(rank: int, world_size: int, workdir: str, names: Sequence[str],
                    noise: bool = False) -> dict:
    """Every scenario in ``names``, one after the other, in this process group (+ the noise runs)."""
    results: dict[str, Any] = {"init": params_of(make_net())}
    if noise:
        results["noise"] = noise_scenarios(rank, world_size, workdir)
    for name in names:
        scn = SCENARIOS[name]
        objs = build(scn, distributed=True)
        results[f"{name}/init"] = params_of(objs["net"])
        save_path = None
        if scn.save_after is not None:
            save_path = str(pathlib.Path(workdir) / f"ckpt_rank{rank}.pt")
        results[name] = train(objs, scn, STEPS, save_path)
    results["ddp_grads"] = _ddp_grads_stay_local(rank)
    return results


def _ddp_grads_stay_local(rank: int) -> dict[str, Any]:
    """After ``backward`` through a private DDP model, ``p.grad`` is this rank's own gradient."""
    objs = build(SCENARIOS["ddp_hooks_noise"], distributed=True)
    x, y, _ = objs["dataset"][rank * 5 : rank * 5 + 5]
    objs["optimizer"].zero_grad()
    nn.CrossEntropyLoss()(objs["model"](x), y).backward()
    seen = [p.grad.detach().clone() for p in objs["net"].parameters()]
    local = make_net()
    nn.CrossEntropyLoss()(local(x), y).backward()
    return {"seen": seen, "local": [p.grad.detach().clone() for p in local.parameters()]}


def noise_scenarios(rank: int, world_size: int, workdir: str) -> dict:
    """The noise in the aggregated gradient of one step (rank 0's view), in three settings."""
    from dp_torch import PrivacyEngine
    from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    g = torch.Generator().manual_seed(3)
    dataset = TensorDataset(torch.randn(64, 100, generator=g), torch.randint(0, 50, (64,), generator=g))
    out: dict[str, Any] = {}
    for name, secure, clipping, bound in (
        ("seeded_flat", False, "flat", 1.0),
        ("seeded_per_layer", False, "per_layer", [1.5, 2.0]),
        ("secure_flat", True, "flat", 1.0),
    ):
        torch.manual_seed(123)  # the same default-generator seed on every rank: the worst case
        model = DPDDP(nn.Linear(100, 50))
        engine = PrivacyEngine(secure_mode=secure)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(dataset, batch_size=16), noise_multiplier=1.0,
            max_grad_norm=bound, clipping=clipping,
        )
        x, y = next(iter(loader))
        optimizer.zero_grad()
        _loss(model, nn.CrossEntropyLoss(), x, y).backward()
        optimizer.step()
        params = list(optimizer.params)
        total = [p.summed_grad.detach().clone() for p in params]
        for t in total:
            dist.all_reduce(t)
        noise = torch.cat([(p.grad * optimizer.expected_batch_size - t).reshape(-1)
                           for p, t in zip(params, total)])
        out[name] = {"noise": noise.double(), "expected_batch_size": optimizer.expected_batch_size,
                     "max_grad_norm": float(optimizer.max_grad_norm)}
    return out


def resume_and_step(rank: int, world_size: int, workdir: str, checkpoint: str) -> dict:
    """Load the 2-process run's checkpoint into this group and take one more logical step."""
    scn = SCENARIOS["resume"]
    objs = build(scn, distributed=True)
    objs["engine"].load_checkpoint(path=checkpoint, module=objs["model"],
                                   optimizer=objs["optimizer"])
    loaded = {"params": params_of(objs["net"]), "history": objs["engine"].accountant.history}
    return {"loaded": loaded, "step": train(objs, scn, 1)}


def die_mid_step(rank: int, world_size: int, workdir: str, how: str) -> dict:
    """One good step; in the second, the last rank exits (or hangs) before its optimizer step."""
    from dp_torch.distributed import DistributedStepError

    scn = SCENARIOS["flat_noise"]
    objs = build(scn, distributed=True, momentum=0.9)  # momentum: optimizer state to compare
    model, optimizer, criterion = objs["model"], objs["optimizer"], objs["criterion"]
    for step, (x, y, _) in enumerate(objs["loader"]):
        optimizer.zero_grad()
        _loss(model, criterion, x, y).backward()
        if step == 1 and rank == world_size - 1:
            if how == "exit":
                os._exit(17)
            time.sleep(600)  # hang: the harness kills this process
        before = params_of(objs["net"])
        state_before = copy.deepcopy(optimizer.state_dict())
        steps_before = len(objs["engine"].accountant)
        start = time.monotonic()
        try:
            optimizer.step()
        except DistributedStepError as err:
            return {
                "step": step, "error": str(err), "seconds": time.monotonic() - start,
                "params_unchanged": all(torch.equal(a, b) for a, b in
                                        zip(before, params_of(objs["net"]))),
                "state_unchanged": _same_state(state_before, optimizer.state_dict()),
                "steps_before": steps_before, "steps_after": len(objs["engine"].accountant),
                "grads_cleared": all(p.grad is None for p in optimizer.params),
            }
    return {"error": None}


def _same_state(a: dict, b: dict) -> bool:
    """Whether two SGD state dicts hold equal momentum buffers (and at least one)."""
    buffers = [(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])
               for k in a["state"]]
    return bool(buffers) and set(a["state"]) == set(b["state"]) and all(
        torch.equal(x, y) for x, y in buffers)


# --------------------------------------------------------------------------- harness


def _worker(fn_name: str) -> Any:
    """A worker of this module by name, or ``"package.module:function"`` of another module."""
    if ":" not in fn_name:
        return globals()[fn_name]
    module, name = fn_name.split(":")
    return getattr(importlib.import_module(module), name)


def _entry(fn_name: str, rank: int, world_size: int, store: str, workdir: str,
           kwargs: dict[str, Any], pg_timeout: float, abort: bool) -> None:
    """Body of one spawned process: join the group, run ``fn_name``, write its result."""
    out = pathlib.Path(workdir)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result = _worker(fn_name)(rank, world_size, workdir, **kwargs)
        torch.save(result, out / f"result_{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the test process
        (out / f"error_{rank}.txt").write_text(traceback.format_exc(), encoding="utf-8")
        os._exit(1)
    if abort:
        os._exit(0)  # the group is broken: do not wait in destroy_process_group
    dist.destroy_process_group()


@dataclasses.dataclass
class GroupResult:
    """What :func:`run_group` collected: per-rank results, exit codes, wall time."""

    results: dict[int, Any]
    exitcodes: dict[int, Optional[int]]
    seconds: float


def run_group(fn_name: str, world_size: int, workdir: pathlib.Path, *, timeout: float,
              pg_timeout: float = PG_TIMEOUT_S, expect_results: Optional[Sequence[int]] = None,
              abort: bool = False, **kwargs: Any) -> GroupResult:
    """Run ``fn_name`` on ``world_size`` spawned processes; fail clearly on errors or timeout.

    Args:
        fn_name: A worker function of this module, or ``"package.module:function"``.
        world_size: Number of processes.
        workdir: A fresh directory for the store, results and checkpoints.
        timeout: Seconds until the whole group must have produced its results;
            every process still alive then is killed and the test fails.
        pg_timeout: The process group's collective timeout.
        expect_results: Ranks that must produce a result (default: all).
        abort: Exit the workers without ``destroy_process_group`` (broken groups).
        **kwargs: Passed to the worker function.

    Returns:
        The results of the ranks that produced one, and every exit code.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / f"store_{uuid.uuid4().hex}"
    expected = list(range(world_size)) if expect_results is None else list(expect_results)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(fn_name, rank, world_size, str(store), str(workdir),
                                         kwargs, pg_timeout, abort), daemon=True)
        for rank in range(world_size)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        while time.monotonic() - start < timeout:
            if all((workdir / f"result_{r}.pt").exists() or (workdir / f"error_{r}.txt").exists()
                   for r in expected) and all(not p.is_alive() or i not in expected
                                             for i, p in enumerate(procs)):
                break
            time.sleep(0.05)
        seconds = time.monotonic() - start
    finally:
        for p in procs:
            if p.is_alive() and (p.pid is not None):
                p.kill()
        for p in procs:
            p.join(timeout=10)
    errors = {r: (workdir / f"error_{r}.txt").read_text(encoding="utf-8")
              for r in range(world_size) if (workdir / f"error_{r}.txt").exists()}
    if errors:
        raise AssertionError("worker errors:\n" + "\n".join(f"rank {r}:\n{t}" for r, t in errors.items()))
    missing = [r for r in expected if not (workdir / f"result_{r}.pt").exists()]
    if missing:
        raise AssertionError(f"ranks {missing} produced no result within {timeout} s (killed)")
    results = {r: torch.load(workdir / f"result_{r}.pt", weights_only=False)
               for r in range(world_size) if (workdir / f"result_{r}.pt").exists()}
    return GroupResult(results, {r: p.exitcode for r, p in enumerate(procs)}, seconds)
