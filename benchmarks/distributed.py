"""Data-parallel DP training throughput (examples/s) on 1, 2 and 4 processes (gloo, CPU).

For every world size ``W`` and mode, ``W`` processes are started (``spawn``), join a gloo
process group on loopback (``FileStore``), and train the ``--model`` of
:mod:`benchmarks.models` on synthetic data with one intra-op thread each:

* ``dp_torch-hooks`` / ``dp_torch-ghost``: ``DPDDP(model)`` through
  ``PrivacyEngine().make_private(..., grad_sample_mode=...)``: distributed Poisson
  sampling with the *global* expected batch ``--batch`` (each rank samples its shard),
  per-rank clipping, noise once on rank 0, one all-reduce per step;
* ``nonprivate``: ``torch`` ``DistributedDataParallel`` with a ``DistributedSampler``
  and a fixed per-rank batch ``--batch / W`` (the usual data-parallel baseline).

The data set has ``--batch * 16`` examples (sample rate 1/16). After ``--warmup`` steps,
``--steps`` steps are timed between two barriers; the figure is the number of examples
all ranks processed (data loading, forward, backward, clipping, noise, all-reduce and
update included) divided by the wall time, and the speed-up is relative to ``W = 1`` of
the same mode. Processes beyond the number of idle cores share them, so a ``W`` above
the idle cores measures oversubscription, not scaling. To tell the machine's share from
the code's, the script ends with the *effective cores* that ``W`` concurrent one-thread
processes get for a pure matrix-multiply kernel (``W`` when ``W`` cores are idle).

``--backend jax`` measures ``dp_jax`` the same way (:func:`run_jax`): ``W`` processes
joined by ``jax.distributed.initialize`` (one CPU device and one thread each, gloo
collectives), the engine with ``mesh=dp_jax.data_mesh()`` in ``vmap`` and ``ghost``
modes, and non-private ``jax.jit`` SGD on a sharded fixed batch.

Examples::

    python benchmarks/distributed.py                        # torch, W = 1, 2, 4
    python benchmarks/distributed.py --world-sizes 1 2 --json distributed.json
    python benchmarks/distributed.py --smoke                # seconds, for a rot check
    python benchmarks/distributed.py --backend jax          # dp_jax, W = 1, 2, 4
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks import _timing  # noqa: E402

__all__ = ["BenchConfig", "JAX_MODES", "TORCH_MODES", "format_table", "main", "run_jax", "run_torch"]

TORCH_MODES = ("dp_torch-hooks", "dp_torch-ghost", "nonprivate")
SAMPLE_RATE_INVERSE = 16


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting (shared by every world size and mode)."""

    model: str = "mlp"
    batch: int = 256
    steps: int = 30
    warmup: int = 3
    timeout_s: float = 600.0


def _measure(run_group: Any, world_sizes: Sequence[int], modes: Sequence[str],
             cfg: BenchConfig) -> list[dict[str, Any]]:
    """``run_group(mode, W, cfg)`` for every mode and world size, with the speed-up column."""
    rows = []
    for mode in modes:
        base = None
        for world in world_sizes:
            row = run_group(mode, world, cfg)
            if "error" not in row:
                base = base or row["examples_per_s"]
                row["speedup"] = row["examples_per_s"] / base
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def _throughput_row(backend: str, mode: str, world: int, cfg: BenchConfig, examples: int,
                    seconds: float) -> dict[str, Any]:
    """The result row of ``examples`` processed by all ranks in ``seconds``."""
    return {"backend": backend, "mode": mode, "world_size": world, "model": cfg.model,
            "batch": cfg.batch, "steps": cfg.steps, "examples": examples, "seconds": seconds,
            "examples_per_s": examples / seconds, "step_ms": 1000.0 * seconds / cfg.steps}


# --------------------------------------------------------------------------- torch


def _torch_objects(mode: str, cfg: BenchConfig, rank: int, world: int) -> tuple[Any, Any, Any, Any]:
    """Model, optimizer, criterion and loader for ``mode`` in this process group."""
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from benchmarks.models import build_model, make_batch
    from dp_torch import PrivacyEngine
    from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    torch.manual_seed(0)
    inputs, labels = make_batch(cfg.model, cfg.batch * SAMPLE_RATE_INVERSE,
                                generator=torch.Generator().manual_seed(0))
    dataset = TensorDataset(inputs, labels)
    criterion = nn.CrossEntropyLoss()
    net = build_model(cfg.model)
    if mode == "nonprivate":
        model = nn.parallel.DistributedDataParallel(net)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
        loader = DataLoader(dataset, batch_size=max(1, cfg.batch // world), sampler=sampler)
        return model, torch.optim.SGD(model.parameters(), lr=0.01), criterion, loader
    model = DPDDP(net)
    out = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data_loader=DataLoader(dataset, batch_size=cfg.batch), noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode=mode.split("-")[1], criterion=criterion,
    )
    if len(out) == 4:
        model, optimizer, criterion, loader = out
    else:
        model, optimizer, loader = out
    return model, optimizer, criterion, loader


def _batches(loader: Any) -> Any:
    epoch = 0
    while True:
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _torch_step(model: Any, optimizer: Any, criterion: Any, x: torch.Tensor, y: torch.Tensor,
                private: bool) -> None:
    optimizer.zero_grad()
    out = model(x)
    loss = out.sum() * 0.0 if (len(y) == 0 and private and isinstance(criterion, torch.nn.Module)) \
        else criterion(out, y)
    loss.backward()
    optimizer.step()


def _torch_worker(rank: int, world: int, store: str, mode: str, cfg: BenchConfig,
                  out_dir: str) -> None:
    """One rank: build, warm up, time ``cfg.steps`` steps between barriers, write the row."""
    out = pathlib.Path(out_dir)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        model, optimizer, criterion, loader = _torch_objects(mode, cfg, rank, world)
        private = mode != "nonprivate"
        batches = _batches(loader)

        def step() -> int:
            x, y = next(batches)
            _torch_step(model, optimizer, criterion, x, y, private)
            return len(y)

        seen, seconds = _timing.time_between_barriers(
            step, steps=cfg.steps, warmup=cfg.warmup, barrier=lambda _: dist.barrier())
        total = torch.tensor([float(seen)], dtype=torch.float64)
        dist.all_reduce(total)
        if rank == 0:
            row = _throughput_row("torch", mode, world, cfg, int(total.item()), seconds)
            (out / "row.json").write_text(json.dumps(row), encoding="utf-8")
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        (out / f"error_{rank}.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _run_torch_group(mode: str, world: int, cfg: BenchConfig) -> dict[str, Any]:
    row = _timing.spawn_group(_torch_worker, world, (mode, cfg), cfg.timeout_s)
    if "error" in row:
        row.update(backend="torch", mode=mode, world_size=world)
    return row


def run_torch(world_sizes: Sequence[int], modes: Sequence[str], cfg: BenchConfig
              ) -> list[dict[str, Any]]:
    """Throughput rows for ``dp_torch`` (and the non-private DDP baseline).

    Args:
        world_sizes: Numbers of processes to measure.
        modes: Subset of :data:`TORCH_MODES`.
        cfg: Model, batch and step counts.

    Returns:
        One row per ``(mode, world size)``: ``examples_per_s``, ``step_ms``,
        ``speedup`` (vs the mode's first world size), or ``error``.
    """
    return _measure(_run_torch_group, world_sizes, modes, cfg)


def _matmul_worker(seconds_out: Any, reps: int) -> None:
    torch.set_num_threads(1)
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    seconds_out.put(time.perf_counter() - start)


def machine_parallelism(world_sizes: Sequence[int], reps: int = 400) -> dict[int, float]:
    """How much compute ``W`` concurrent one-thread processes get, relative to one alone.

    Each process multiplies two 256 x 256 matrices ``reps`` times; the figure for ``W``
    is ``W * t_1 / mean(t_W)`` (``W`` on a machine with ``W`` idle cores, about 1 on a
    machine that gives the group one core). It tells how much of a throughput change
    comes from the machine rather than from the training code.

    Args:
        world_sizes: Numbers of concurrent processes.
        reps: Multiplications per process.

    Returns:
        ``{W: effective number of cores}``.
    """
    ctx = mp.get_context("spawn")
    times: dict[int, float] = {}
    for world in sorted(set(world_sizes) | {1}):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_matmul_worker, args=(queue, reps)) for _ in range(world)]
        for p in procs:
            p.start()
        times[world] = sum(queue.get(timeout=600) for _ in procs) / world
        for p in procs:
            p.join()
    return {w: w * times[1] / times[w] for w in world_sizes}


# --------------------------------------------------------------------------- jax


JAX_MODES = ("dp_jax-vmap", "dp_jax-ghost", "nonprivate")


def _jax_setup(mode: str, cfg: BenchConfig) -> tuple[Any, Any]:
    """``(run, state)``: ``run(state) -> (state, examples)`` trains one logical step."""
    import optax  # pylint: disable=import-outside-toplevel

    import dp_jax  # pylint: disable=import-outside-toplevel
    from benchmarks import models_flax  # pylint: disable=import-outside-toplevel

    module = models_flax.build_model(cfg.model)
    params = models_flax.init_params(cfg.model)
    x, y = models_flax.make_batch(cfg.model, cfg.batch * SAMPLE_RATE_INVERSE, seed=1)
    mesh = dp_jax.data_mesh()
    loss_fn = dp_jax.linen_loss(module)
    if mode == "nonprivate":
        return _jax_nonprivate(loss_fn, params, {"x": x, "y": y}, mesh, cfg)
    private = dp_jax.PrivacyEngine().make_private(
        loss_fn=loss_fn, params=params, optimizer=optax.sgd(0.01), data={"x": x, "y": y},
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0 / SAMPLE_RATE_INVERSE,
        seed=0, mesh=mesh, grad_sample_mode=mode.removeprefix("dp_jax-"),
        steps=10 ** 6,  # one long "epoch": the iterator never ends inside the benchmark
    )
    batches = iter(private.batches)

    def run(state: Any) -> tuple[Any, int]:
        # The mask is a global array spread over the processes: count the expected
        # batch (the mean of the realised Poisson sizes) rather than gather it.
        state, _ = private.train_logical_step(state, next(batches))
        return state, private.expected_batch_size

    return run, private.state


def _jax_nonprivate(loss_fn: Any, params: Any, data: dict, mesh: Any, cfg: BenchConfig
                    ) -> tuple[Any, Any]:
    """Plain data-parallel SGD: a fixed global batch sharded over the mesh, jit does the rest."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

    import dp_jax  # pylint: disable=import-outside-toplevel

    tx = optax.sgd(0.01)
    rows = cfg.batch - cfg.batch % mesh.devices.size or mesh.devices.size

    @jax.jit
    def step(state: Any, batch: Any) -> Any:
        p, opt = state
        grads = jax.grad(lambda q: jax.numpy.mean(jax.vmap(loss_fn, (None, 0))(q, batch)))(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    rng = np.random.default_rng(0)
    n = len(data["y"])

    def run(state: Any) -> tuple[Any, int]:
        idx = rng.integers(0, n, rows)
        batch, _ = dp_jax.shard_batch({k: v[idx] for k, v in data.items()}, None, mesh)
        return step(state, batch), rows

    return run, dp_jax.replicate((params, tx.init(params)), mesh)


def _jax_worker(args: argparse.Namespace) -> None:
    """One JAX process of a group (started by :func:`_run_jax_group` with ``--jax-worker``)."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    if args.world > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.world, process_id=args.rank)
    cfg = BenchConfig(model=args.model, batch=args.batch, steps=args.steps, warmup=args.warmup)
    run, state = _jax_setup(args.jax_mode, cfg)

    def step() -> int:
        nonlocal state
        state, rows = run(state)
        return rows

    def barrier(name: str) -> None:
        jax.block_until_ready(state)
        multihost_utils.sync_global_devices(name)

    seen, seconds = _timing.time_between_barriers(step, steps=cfg.steps, warmup=cfg.warmup,
                                                  barrier=barrier)
    if jax.process_index() == 0:
        row = _throughput_row("jax", args.jax_mode, args.world, cfg, seen, seconds)
        pathlib.Path(args.out).write_text(json.dumps(row), encoding="utf-8")


def _free_port() -> int:
    import socket  # pylint: disable=import-outside-toplevel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_jax_group(mode: str, world: int, cfg: BenchConfig) -> dict[str, Any]:
    import os  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel

    root = pathlib.Path(__file__).resolve().parent.parent
    # One CPU device and one compute thread per process, as the torch ranks have.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
               XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                         "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/row.json"
        coordinator = f"127.0.0.1:{_free_port()}"
        procs = [subprocess.Popen(  # noqa: S603 - our own script
            [sys.executable, "-m", "benchmarks.distributed", "--jax-worker", "--jax-mode", mode,
             "--world", str(world), "--rank", str(rank), "--coordinator", coordinator,
             "--model", cfg.model, "--batch", str(cfg.batch), "--steps", str(cfg.steps),
             "--warmup", str(cfg.warmup), "--out", out],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ) for rank in range(world)]
        errors = _wait_all(procs, cfg.timeout_s)
        if errors or not pathlib.Path(out).exists():
            return {"backend": "jax", "mode": mode, "world_size": world,
                    "error": errors[0] if errors else "no result"}
        return json.loads(pathlib.Path(out).read_text(encoding="utf-8"))


def _wait_all(procs: Sequence[Any], timeout_s: float) -> list[str]:
    """Wait for every process (kill all at the deadline); the stderr tails of the failures."""
    deadline, errors = time.monotonic() + timeout_s, []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a timeout: kill the whole group
            for other in procs:
                other.kill()
            return ["timeout"]
        if proc.returncode != 0:
            errors.append(err[-2000:])
    return errors


def run_jax(world_sizes: Sequence[int], modes: Sequence[str], cfg: BenchConfig
            ) -> list[dict[str, Any]]:
    """Throughput rows for ``dp_jax`` on a mesh of ``W`` processes (one CPU device each).

    Every process runs ``jax.distributed.initialize`` (gloo collectives on loopback) and
    the engine with ``mesh=dp_jax.data_mesh()``: the global Poisson batch (expected size
    ``cfg.batch``) is sharded over the processes, each clips its rows, the clipped sums
    are ``psum``-ed and the noise is added once. ``nonprivate`` is ``jax.jit`` SGD on a
    fixed global batch sharded the same way.

    Args:
        world_sizes: Numbers of processes to measure.
        modes: Subset of :data:`JAX_MODES`.
        cfg: Model, batch and step counts.

    Returns:
        Rows as :func:`run_torch` returns them.
    """
    return _measure(_run_jax_group, world_sizes, modes, cfg)


# --------------------------------------------------------------------------- report


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['backend']} {row['mode']} W={row['world_size']}: ERROR {row['error'][-300:]}"
    return (f"{row['backend']} {row['mode']} W={row['world_size']}: "
            f"{row['examples_per_s']:.0f} examples/s, {row['step_ms']:.1f} ms/step, "
            f"x{row['speedup']:.2f}")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the rows (errors shown in the throughput column)."""
    lines = ["| backend | mode | processes | examples/s | ms/step | speed-up |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['backend']} | {row['mode']} | {row['world_size']} | error | | |")
        else:
            lines.append(
                f"| {row['backend']} | {row['mode']} | {row['world_size']} | "
                f"{row['examples_per_s']:.0f} | {row['step_ms']:.1f} | {row['speedup']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=list(TORCH_MODES),
                        help=f"torch modes {list(TORCH_MODES)} or jax modes {list(JAX_MODES)}")
    parser.add_argument("--model", default="mlp", help="a benchmarks.models name (default mlp)")
    parser.add_argument("--batch", type=int, default=256, help="global (expected) batch")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first (JAX compiles one step per bucket size)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per group")
    parser.add_argument("--smoke", action="store_true", help="W = 1, 2; batch 8; 2 steps")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write rows here")
    for hidden in ("--world", "--rank", "--coordinator", "--jax-mode", "--out"):  # worker only
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jax_worker:
        args.world, args.rank = int(args.world), int(args.rank)
        return args
    known = TORCH_MODES if args.backend == "torch" else JAX_MODES
    if args.modes == list(TORCH_MODES):
        args.modes = list(known)
    bad = [m for m in args.modes if m not in known]
    if bad:
        parser.error(f"--modes got {bad}; choose from {list(known)} for --backend {args.backend}.")
    if min(args.world_sizes) < 1 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--world-sizes, --batch and --steps must be >= 1 and --warmup >= 0.")
    if args.smoke:
        args.world_sizes, args.batch, args.steps, args.warmup = [1, 2], 8, 2, 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table, optionally write JSON; return the rows."""
    args = parse_args(argv)
    if args.jax_worker:
        _jax_worker(args)
        return []
    cfg = BenchConfig(model=args.model, batch=args.batch, steps=args.steps,
                      warmup=args.warmup, timeout_s=args.timeout)
    runner = run_torch if args.backend == "torch" else run_jax
    rows = runner(args.world_sizes, args.modes, cfg)
    table = format_table(rows)
    cores = machine_parallelism(args.world_sizes, reps=40 if args.smoke else 400)
    table += "\n\nEffective cores for W one-thread processes (concurrent 256x256 matmuls): " + \
        ", ".join(f"W={w}: {c:.2f}" for w, c in cores.items())
    print(table, flush=True)
    if args.json is not None:
        meta = {"platform": platform.platform(), "torch": torch.__version__,
                "cpus": torch.multiprocessing.cpu_count(), "config": dataclasses.asdict(cfg),
                "effective_cores": {str(w): c for w, c in cores.items()}}
        args.json.write_text(json.dumps({"meta": meta, "results": rows, "table": table},
                                        indent=2), encoding="utf-8")
    if any("error" in row for row in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
