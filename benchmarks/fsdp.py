"""Per-rank peak memory and step time of DP training under FSDP2 on 1, 2 and 4 processes (gloo, CPU).

For every world size ``W`` and mode, ``W`` processes are started (``spawn``), join a gloo
group on loopback (``FileStore``) with one intra-op thread each, and train a stack of
``--depth`` square ``Linear`` layers of width ``--width`` applied at each of ``--seq``
positions (tanh between them; the mean over positions of the last layer's output are the
class scores), a transformer's MLP stack without attention, sharded by
:func:`dp_torch.utils.fsdp_utils.FSDP2Wrapper`, with SGD and momentum:

* ``nonprivate``: the FSDP model as it is (FSDP averages the gradients over ranks);
* ``ghost_fsdp``: the same model through ``PrivacyEngine().make_private(...,
  grad_sample_mode="ghost_fsdp")`` (norm pass, clipped pass, noise on every shard).

Every rank trains on a fixed local batch of ``--batch / W`` examples per step (the global
batch stays ``--batch``; the DP run averages over the expected batch ``--batch``), so both
modes do the same arithmetic per step and data loading is left out. After ``--warmup``
steps, ``--steps`` steps are timed between two barriers.

The model is created on the ``meta`` device, sharded, and only then given storage
(``to_empty`` and ``reset_parameters`` on each shard), as a model that does not fit on one
device must be: no rank ever holds all of it.

Memory: each rank's resident-set growth from just before the model is built to the end of
the steps (peak RSS, reset through ``/proc/self/clear_refs`` first): parameters, gradients,
optimizer state, gathered parameters, activations and the DP step's buffers, without the
interpreter and the libraries. The workers run with ``MALLOC_MMAP_THRESHOLD_=65536``, so
every tensor of 64 KiB or more is its own mapping, returned when freed, and the resident
set follows the live tensors rather than the allocator's caches. The table shows the largest rank's figure and its ratio to
``W = 1``. Processes beyond the idle cores share them, which slows the step but does not
change the memory figures.

Examples::

    python benchmarks/fsdp.py                       # W = 1, 2, 4; width 1024, depth 8, 32 positions
    python benchmarks/fsdp.py --json fsdp.json
    python benchmarks/fsdp.py --smoke               # seconds, for a rot check
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import _memory, _timing
from dp_torch import PrivacyEngine
from dp_torch.utils.fsdp_utils import FSDP2Wrapper

__all__ = ["MODES", "BenchConfig", "format_table", "main", "run"]

MODES = ("nonprivate", "ghost_fsdp")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting (shared by every world size and mode)."""

    width: int = 1024
    depth: int = 8
    seq: int = 32
    batch: int = 32
    steps: int = 3
    warmup: int = 1
    timeout_s: float = 900.0


def make_model(cfg: BenchConfig) -> nn.Module:
    """``depth`` Linear layers ``width -> width`` with tanh between them."""
    layers: list[nn.Module] = []
    for i in range(cfg.depth):
        layers.append(nn.Linear(cfg.width, cfg.width))
        if i < cfg.depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _objects(mode: str, cfg: BenchConfig) -> tuple[Any, Any, Any]:
    """The (private) sharded model, optimizer and loss for ``mode``."""
    with torch.device("meta"):  # no rank ever holds the whole model: shard, then allocate shards
        model = FSDP2Wrapper(make_model(cfg))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    if mode == "nonprivate":
        return model, optimizer, criterion
    data = TensorDataset(torch.zeros(cfg.batch * 16, cfg.width), torch.zeros(cfg.batch * 16, dtype=torch.long))
    model, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=cfg.batch),
        noise_multiplier=1.0, max_grad_norm=1.0, criterion=criterion, grad_sample_mode="ghost_fsdp")
    return model, optimizer, criterion


def _train(mode: str, cfg: BenchConfig, rank: int, world: int) -> dict[str, float]:
    """Build the run, warm up, time the steps; returns the step time."""
    model, optimizer, criterion = _objects(mode, cfg)
    local = cfg.batch // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(local, cfg.seq, cfg.width, generator=g)
    y = torch.randint(0, cfg.width, (local,), generator=g)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x).mean(dim=1), y).backward()
        optimizer.step()
        return local

    _, seconds = _timing.time_between_barriers(step, steps=cfg.steps, warmup=cfg.warmup,
                                               barrier=lambda _: dist.barrier())
    return {"step_ms": 1000.0 * seconds / cfg.steps}


def _worker(rank: int, world: int, store: str, mode: str, cfg: BenchConfig, out_dir: str) -> None:
    """One rank: measure its memory growth over build and steps; rank 0 writes the row."""
    out = pathlib.Path(out_dir)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.timeout_s))
        tiny = dataclasses.replace(cfg, width=8, depth=2, seq=2, batch=2 * world, steps=1, warmup=0)
        _train(mode, tiny, rank, world)  # lazy initialisation of torch and dp_torch, not measured
        timing: dict[str, float] = {}
        memory = _memory.rss_growth(lambda: timing.update(_train(mode, cfg, rank, world)))
        peaks: list[Any] = [None] * world
        dist.all_gather_object(peaks, memory["peak_mib"])
        if rank == 0:
            row = {"mode": mode, "world_size": world, "step_ms": timing["step_ms"],
                   "peak_mib_per_rank": max(peaks), "peaks_mib": peaks,
                   "memory_kind": memory["memory_kind"]}
            (out / "row.json").write_text(json.dumps(row), encoding="utf-8")
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        (out / f"error_{rank}.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise


#: malloc settings of the workers: every allocation of 64 KiB or more is its own mapping,
#: returned to the system when freed, so that the resident set follows the live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _run_group(mode: str, world: int, cfg: BenchConfig) -> dict[str, Any]:
    os.environ.update(MALLOC_ENV)  # inherited by the spawned workers
    row = _timing.spawn_group(_worker, world, (mode, cfg), cfg.timeout_s)
    if "error" in row:
        row.update(mode=mode, world_size=world)
    return row


def run(world_sizes: Sequence[int], modes: Sequence[str], cfg: BenchConfig) -> list[dict[str, Any]]:
    """One row per ``(world size, mode)``, with ``memory_vs_w1`` and (for DP) ``dp_vs_nonprivate``.

    The modes of one world size run one after the other, so their times are side by side.
    """
    rows: list[dict[str, Any]] = []
    first: dict[str, float] = {}
    for world in world_sizes:
        by_mode = {}
        for mode in modes:
            row = _run_group(mode, world, cfg)
            if "error" not in row:
                first.setdefault(mode, row["peak_mib_per_rank"])
                row["memory_vs_w1"] = row["peak_mib_per_rank"] / first[mode]
            by_mode[mode] = row
        base = by_mode.get("nonprivate")
        for mode, row in by_mode.items():
            if mode != "nonprivate" and base and "error" not in base and "error" not in row:
                row["dp_vs_nonprivate"] = row["step_ms"] / base["step_ms"]
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['mode']} W={row['world_size']}: ERROR {row['error'][-300:]}"
    ratio = f", x{row['dp_vs_nonprivate']:.2f} of non-private" if "dp_vs_nonprivate" in row else ""
    return (f"{row['mode']} W={row['world_size']}: {row['step_ms']:.0f} ms/step{ratio}, "
            f"{row['peak_mib_per_rank']:.0f} MiB per rank (x{row['memory_vs_w1']:.2f} of W=1)")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    lines = ["| mode | processes | ms/step | DP / non-private | peak MiB per rank | vs 1 process |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mode']} | {row['world_size']} | error | | | |")
            continue
        ratio = f"{row['dp_vs_nonprivate']:.2f}" if "dp_vs_nonprivate" in row else ""
        lines.append(f"| {row['mode']} | {row['world_size']} | {row['step_ms']:.0f} | {ratio} | "
                     f"{row['peak_mib_per_rank']:.0f} | {row['memory_vs_w1']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32, help="positions per example")
    parser.add_argument("--batch", type=int, default=32, help="global batch (divisible by every W)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per group")
    parser.add_argument("--smoke", action="store_true", help="W = 1, 2; width 64, depth 2; 1 step")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.world_sizes, args.width, args.depth, args.seq = [1, 2], 64, 2, 4
        args.batch, args.steps, args.warmup = 8, 1, 1
    if min(args.world_sizes) < 1 or min(args.width, args.depth, args.seq, args.steps) < 1 or args.warmup < 0:
        parser.error("--world-sizes, --width, --depth, --seq and --steps must be >= 1 and --warmup >= 0.")
    bad = [w for w in args.world_sizes if args.batch % w]
    if bad:
        parser.error(f"--batch {args.batch} must be divisible by every world size; not by {bad}.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table, optionally write JSON; return the rows."""
    args = parse_args(argv)
    cfg = BenchConfig(width=args.width, depth=args.depth, seq=args.seq, batch=args.batch, steps=args.steps,
                      warmup=args.warmup, timeout_s=args.timeout)
    rows = run(args.world_sizes, args.modes, cfg)
    params = cfg.depth * (cfg.width * cfg.width + cfg.width)
    table = format_table(rows) + f"\n\nModel: {params / 1e6:.1f} M parameters ({4 * params / 2**20:.0f} MiB in float32)."
    print(table, flush=True)
    if args.json is not None:
        meta = {"platform": platform.platform(), "torch": torch.__version__,
                "cpus": torch.multiprocessing.cpu_count(), "config": dataclasses.asdict(cfg)}
        args.json.write_text(json.dumps({"meta": meta, "results": rows, "table": table}, indent=2),
                             encoding="utf-8")
    if any("error" in row for row in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
