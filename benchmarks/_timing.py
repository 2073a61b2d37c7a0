"""Measuring, timing and reporting shared by the benchmark scripts (private).

:mod:`benchmarks.torch_step` and :mod:`benchmarks.jax_step` time several configurations
of one model in interleaved rounds and report medians in a markdown table;
:mod:`benchmarks.distributed` times a block of steps between two barriers;
:mod:`benchmarks.accounting` takes the median of repeated calls. The pieces they have in
common live here: the size plan of the command line, the timing loops, the result rows'
ratios and the table, and the argument parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

__all__ = [
    "Plan",
    "PRECISIONS",
    "add_output_arguments",
    "add_precision_arguments",
    "add_ratios",
    "add_run_arguments",
    "add_size_arguments",
    "by_model",
    "csv_of",
    "error_text",
    "failure_notes",
    "guarded",
    "log",
    "make_plan",
    "median_seconds",
    "positive",
    "precisions",
    "print_report",
    "record_times",
    "repeats_for",
    "report",
    "rounds_for",
    "sizes",
    "time_between_barriers",
    "time_interleaved",
    "time_table",
    "timed",
    "write_output",
]

_T = TypeVar("_T")
Row = dict[str, Any]
#: Compute precisions of the step: float32, or bfloat16 compute (torch autocast, flax
#: ``dtype``) with float32 parameters.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


# ---------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and round counts of one run.

    Attributes:
        batch_scale: Reference batch x this (at least 2).
        seq_scale: Reference sequence lengths x this (at least 2).
        steps: Timed rounds.
        warmup: Untimed rounds first.
    """

    batch_scale: float
    seq_scale: float
    steps: int
    warmup: int


def make_plan(args: argparse.Namespace, *, full_size: bool, smoke_warmup: int) -> Plan:
    """The :class:`Plan` of ``--smoke``, ``--quick`` or the default sizes.

    Args:
        args: Options with ``smoke``, ``quick``, ``batch_scale``, ``seq_scale``, ``steps``
            and ``warmup`` (the last four ``None`` when not given).
        full_size: Whether the default run uses the reference sizes and 20 steps (on an
            accelerator) rather than a quarter of the batch and 10 steps (on the CPU).
        smoke_warmup: Warm-up rounds of ``--smoke``.

    Returns:
        The plan.
    """
    if args.smoke:
        return Plan(batch_scale=0.0, seq_scale=1 / 16, steps=1, warmup=smoke_warmup)
    if args.quick:
        return Plan(batch_scale=args.batch_scale or 0.125, seq_scale=args.seq_scale or 1.0,
                    steps=args.steps or 7, warmup=args.warmup or 2)
    return Plan(batch_scale=args.batch_scale or (1.0 if full_size else 0.25),
                seq_scale=args.seq_scale or 1.0,
                steps=args.steps or (20 if full_size else 10), warmup=args.warmup or 3)


def sizes(spec: Any, plan: Plan) -> tuple[int, Optional[int]]:
    """``(batch, seq_len)`` of a model spec (``batch`` and ``seq_len`` fields) under ``plan``."""
    batch = max(2, round(spec.batch * plan.batch_scale))
    seq = None if spec.seq_len is None else max(2, round(spec.seq_len * plan.seq_scale))
    return batch, seq


# ---------------------------------------------------------------------- timing


def timed(step: Callable[[], Any], sync: Optional[Callable[[], None]] = None) -> float:
    """Seconds one call of ``step`` takes, with ``sync`` (if any) called before and after."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    step()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median duration of ``repeats`` consecutive calls of ``fn``."""
    return statistics.median(timed(fn) for _ in range(repeats))


def rounds_for(first_s: float, *, steps: int, warmup: int, budget_s: float) -> tuple[int, int]:
    """``(warmup, steps)`` for a mode whose first (checked) step took ``first_s`` seconds.

    A mode whose ``warmup + steps`` rounds would take longer than ``budget_s`` skips the
    warm-up (the checked first call already compiled and ran it) and gets
    ``floor(budget_s / first_s)`` timed rounds, but never fewer than 3 (nor more than
    ``steps``), so that one pathologically slow mode cannot stretch the whole run.

    Args:
        first_s: Duration of the mode's first call after compiling.
        steps: Timed rounds asked for.
        warmup: Untimed rounds asked for.
        budget_s: Seconds a mode may take in the timed loop (``inf``: no limit).

    Returns:
        The warm-up and timed rounds for this mode.
    """
    if first_s * (warmup + steps) <= budget_s:
        return warmup, steps
    return 0, min(steps, max(3, int(budget_s // max(first_s, 1e-9))))


def repeats_for(first_s: float, *, block_s: float, max_repeats: int = 25) -> int:
    """Consecutive steps per round for a mode whose first (checked) step took ``first_s``.

    Args:
        first_s: Duration of the mode's first call after compiling.
        block_s: Modes faster than this run ``1 + ceil(block_s / first_s)`` steps per
            round, the first of them untimed; ``<= 0`` turns blocks off.
        max_repeats: Longest block.

    Returns:
        The block length (1: a single, timed step per round).
    """
    if block_s <= 0 or first_s >= block_s:
        return 1
    return min(max_repeats, 1 + math.ceil(block_s / max(first_s, 1e-9)))


def time_interleaved(
    steps_by_name: dict[str, Callable[[], Any]], *, steps: int, warmup: int,
    rounds: Optional[dict[str, tuple[int, int]]] = None,
    repeats: Optional[dict[str, int]] = None,
    sync: Optional[Callable[[], None]] = None,
) -> dict[str, list[float]]:
    """Call every step in rotating rounds; return each one's durations (s).

    Args:
        steps_by_name: One training step (a callable) per configuration.
        steps: Timed rounds.
        warmup: Untimed rounds first.
        rounds: Optional per-name ``(warmup, steps)`` overriding the two above (see
            :func:`rounds_for`); a step takes part in a round only while it has rounds
            left.
        repeats: Optional per-name block length (see :func:`repeats_for`, default 1): a
            step with ``r > 1`` runs ``r`` consecutive times per round and the last
            ``r - 1`` of them are timed.
        sync: Called around each timed call (a device synchronisation), or ``None``.

    Returns:
        The measured durations of each step, in seconds (``steps`` rounds, or its own
        count from ``rounds``, times ``r - 1`` timed calls per block when ``r > 1``).
    """
    names = list(steps_by_name)
    plan = {name: (rounds or {}).get(name, (warmup, steps)) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    total = max((w + n for w, n in plan.values()), default=0)
    for round_index in range(total):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            name_warmup, name_steps = plan[name]
            if round_index >= name_warmup + name_steps:
                continue
            block = (repeats or {}).get(name, 1)
            for position in range(block):
                elapsed = timed(steps_by_name[name], sync)
                if round_index >= name_warmup and (block == 1 or position > 0):
                    times[name].append(elapsed)
    return times


def time_between_barriers(step: Callable[[], int], *, steps: int, warmup: int,
                          barrier: Callable[[str], None]) -> tuple[int, float]:
    """Run ``warmup`` untimed steps, then time ``steps`` steps between two barriers.

    Args:
        step: Runs one training step and returns the number of examples it processed.
        steps: Timed steps.
        warmup: Untimed steps first.
        barrier: Called with ``"start"`` before and ``"stop"`` after the timed steps
            (waits for the device and the other processes).

    Returns:
        ``(examples, seconds)`` of the timed steps.
    """
    for _ in range(warmup):
        step()
    barrier("start")
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += step()
    barrier("stop")
    return seen, time.perf_counter() - start


def error_text(error: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:200]


def guarded(build: Callable[[], _T], row: Row, *, width: int, verbose: bool) -> Optional[_T]:
    """``build()``, or ``None`` with the failure recorded in ``row["error"]`` and logged.

    Args:
        build: Builds a configuration and runs its first, checked step.
        row: The configuration's result row (``model`` and ``mode`` set).
        width: Width of the mode column in the log line.
        verbose: Also print the traceback.

    Returns:
        What ``build`` returned, or ``None`` when it raised (a failing configuration is a
        result, not an abort).
    """
    try:
        return build()
    except Exception as error:  # noqa: BLE001  (a failing configuration is a result)
        row["error"] = error_text(error)
        log(f"  {row['model']:12s} {row['mode']:{width}s} FAILED: {row['error']}")
        if verbose:
            traceback.print_exc()
        return None


# ---------------------------------------------------------------------- results


def record_times(rows: dict[str, Row], times: dict[str, list[float]], *,
                 with_min: bool = False) -> None:
    """Store each mode's ``step_ms``, ``median_ms`` (and ``min_ms``) in its row."""
    for mode, durations in times.items():
        rows[mode]["step_ms"] = [1e3 * t for t in durations]
        rows[mode]["median_ms"] = 1e3 * statistics.median(durations)
        if with_min:
            rows[mode]["min_ms"] = 1e3 * min(durations)


def add_ratios(rows: dict[str, Row], twin_of: Callable[[str], Optional[str]], key: str) -> None:
    """Add ``vs_nonprivate`` and, where ``twin_of(mode)`` was timed, ``key`` to each row.

    Args:
        rows: Result rows by mode.
        twin_of: The mode a mode is compared with (``None``: no comparison).
        key: Name of the ratio to the twin.
    """
    base = rows.get("nonprivate", {}).get("median_ms")
    for mode, row in rows.items():
        if "median_ms" not in row:
            continue
        if base:
            row["vs_nonprivate"] = row["median_ms"] / base
        twin = twin_of(mode)
        reference = rows.get(twin, {}).get("median_ms") if twin is not None else None
        if reference:
            row[key] = row["median_ms"] / reference


def by_model(results: Sequence[Row]) -> dict[tuple[str, str], dict[str, Row]]:
    """The rows grouped by ``(model, precision)`` (``"fp32"`` if unset), then by mode."""
    grouped: dict[tuple[str, str], dict[str, Row]] = {}
    for row in results:
        key = (row["model"], row.get("precision", "fp32"))
        grouped.setdefault(key, {})[row["mode"]] = row
    return grouped


def _cell(row: Optional[Row], ratio: bool) -> str:
    if row is None:
        return "-"
    if "median_ms" not in row:
        return "fails" if "error" in row else "-"
    text = f"{row['median_ms']:.2f} ms"
    if ratio and "vs_nonprivate" in row:
        text += f" ({row['vs_nonprivate']:.1f}x)"
    if row.get("peak_mib") is not None:
        text += f", {row['peak_mib']:.0f} MiB"
    elif "memory_error" in row:
        text += ", memory fails"
    return text


def time_table(results: Sequence[Row], modes: Sequence[str],
               ratios: Sequence[tuple[str, str]], key: str) -> list[str]:
    """The lines of the markdown step-time table.

    Args:
        results: One row per model and mode.
        modes: Column order.
        ratios: ``(mode, header)`` of the ratio columns, read from ``key``.
        key: The row field of the ratio columns.

    Returns:
        Header, rule and one line per model and precision: title (with the sequence
        length), batch, precision, each mode's median ms (with the ratio to the non-private
        step of the same precision, and the peak memory in MiB where measured), the ratio
        columns.
    """
    head = ["model", "batch", "dtype"] + list(modes) + [header for _, header in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (_, precision), rows in by_model(results).items():
        any_row = next(iter(rows.values()))
        title = any_row["title"]
        if any_row["seq_len"] is not None:
            title += f", seq {any_row['seq_len']}"
        cells = [title, str(any_row["batch"]), precision]
        cells += [_cell(rows.get(m), ratio=m != "nonprivate") for m in modes]
        cells += [f"{rows[m][key]:.2f}" if key in rows.get(m, {}) else "-" for m, _ in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(results: Sequence[Row], modes: Sequence[str], ratios: Sequence[tuple[str, str]],
           key: str) -> str:
    """:func:`time_table`, then (after a blank line) the :func:`failure_notes`, if any."""
    notes = failure_notes(results)
    return "\n".join(time_table(results, modes, ratios, key) + ([""] + notes if notes else []))


def print_report(paths: Sequence[pathlib.Path],
                 render: Callable[[list[Row], list[str]], str]) -> dict[str, Any]:
    """Print one report of the rows of several JSON result files (``--report``).

    Args:
        paths: Files written by ``--json`` (unreadable ones are named on stderr and skipped,
            so that one crashed run does not hide the others).
        render: The script's table function of ``(results, modes)``.

    Returns:
        ``{"results": [row, ...], "table": str}``.
    """
    results: list[Row] = []
    for path in paths:
        try:
            results += json.loads(path.read_text(encoding="utf-8"))["results"]
        except (OSError, ValueError, KeyError) as error:
            log(f"skipping {path}: {error_text(error)}")
    modes = list(dict.fromkeys(row["mode"] for row in results))
    table = render(results, modes)
    print(table, flush=True)
    return {"results": results, "table": table}


def failure_notes(results: Sequence[Row]) -> list[str]:
    """One markdown list item per failed step or memory measurement, saying why."""
    notes = []
    for row in results:
        for key, what in (("error", "step"), ("memory_error", "memory")):
            if key in row:
                where = f"{row['model']} {row.get('precision', 'fp32')} {row['mode']}"
                notes.append(f"- {where} ({what}): {row[key]}")
    return notes


def log(text: str) -> None:
    """A progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


def write_output(results: list[Row], table: str, environment: dict[str, Any], started: float,
                 path: Optional[pathlib.Path]) -> dict[str, Any]:
    """Print the table; write (when ``path`` is set) and return the whole result.

    Args:
        results: The rows.
        table: The markdown table(s).
        environment: Versions and settings; ``wall_s`` (since ``started``) is added.
        started: ``time.perf_counter()`` at the start of the measurements.
        path: JSON output file, or ``None``.

    Returns:
        ``{"environment": {...}, "results": [row, ...], "table": str}``.
    """
    environment["wall_s"] = time.perf_counter() - started
    print(table, flush=True)
    output = {"environment": environment, "results": results, "table": table}
    if path is not None:
        path.write_text(json.dumps(output, indent=2) + "\n", encoding="utf-8")
    return output


# ---------------------------------------------------------------------- command line


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, refused unless it is > 0."""
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def csv_of(choices: Sequence[str], flag: str) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma-separated subset of ``choices``."""
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{flag} got {text!r}; use a comma-separated subset of {','.join(choices)}")
        return items

    return parse


def add_size_arguments(parser: argparse.ArgumentParser, models: Sequence[str],
                       modes: Sequence[str], batch_scale_help: str) -> None:
    """``--models``, ``--modes``, ``--batch-scale``, ``--seq-scale``, ``--steps``, ``--warmup``."""
    parser.add_argument("--models", type=csv_of(models, "--models"), default=list(models))
    parser.add_argument("--modes", type=csv_of(modes, "--modes"), default=list(modes))
    parser.add_argument("--batch-scale", type=positive(float), default=None,
                        help=batch_scale_help)
    parser.add_argument("--seq-scale", type=positive(float), default=None,
                        help="reference sequence lengths x this (default 1)")
    parser.add_argument("--steps", type=positive(int), default=None, help="timed rounds")
    parser.add_argument("--warmup", type=positive(int), default=None, help="untimed rounds")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick`` and ``--smoke``."""
    parser.add_argument("--quick", action="store_true", help="the smaller CPU sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 step: a rot check")


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision fp32,bf16`` (a list; default fp32) and ``--bf16`` (both precisions)."""
    parser.add_argument("--precision", type=csv_of(PRECISIONS, "--precision"), default=None,
                        help="compute precisions, each a table row per model (default fp32)")
    parser.add_argument("--bf16", action="store_true", help="same as --precision fp32,bf16")


def precisions(args: argparse.Namespace) -> list[str]:
    """The precisions asked for by ``--precision`` / ``--bf16``."""
    if args.precision is not None:
        return list(args.precision)
    return list(PRECISIONS) if args.bf16 else ["fp32"]


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json``, ``--report`` and ``--verbose``."""
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write results here")
    parser.add_argument("--report", type=pathlib.Path, nargs="+", default=None,
                        metavar="JSON", help="print one table of earlier runs' --json files "
                        "and exit (measures nothing)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")


def spawn_group(worker: Callable[..., None], world: int, args: tuple, timeout_s: float) -> dict[str, Any]:
    """Run ``worker(rank, world, store, *args, out_dir)`` in ``world`` spawned processes.

    The workers join a process group through the file ``store``; rank 0 writes its result row
    to ``out_dir/row.json`` and a failing rank its traceback to ``out_dir/error_RANK.txt``.

    Args:
        worker: A module-level function (picklable for ``spawn``).
        world: Number of processes.
        args: The worker's arguments after ``store``.
        timeout_s: Seconds until every process still alive is killed.

    Returns:
        Rank 0's row, or ``{"error": traceback or "timeout"}``.
    """
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, world, f"{tmp}/store", *args, tmp)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = sorted(pathlib.Path(tmp).glob("error_*.txt"))
        row_file = pathlib.Path(tmp) / "row.json"
        if errors or not row_file.exists():
            return {"error": errors[0].read_text(encoding="utf-8")[-2000:] if errors else "timeout"}
        return json.loads(row_file.read_text(encoding="utf-8"))
