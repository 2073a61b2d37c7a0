"""DP-SGD step time and peak memory: non-private, dp_torch and Opacus 1.6, side by side.

For each model of :mod:`benchmarks.models` (MLP, CNN, LSTM, transformer d 256 and d 768,
GPT-2 fine-tuning; the reference table's shapes) this script measures, in one run, one
training step (``zero_grad``, forward, loss, backward, ``optimizer.step()``; plain SGD
everywhere) of:

* ``nonprivate``: the plain model and ``torch.optim.SGD``;
* ``dp_torch-hooks`` / ``dp_torch-ghost``: ``dp_torch.PrivacyEngine().make_private(...,
  grad_sample_mode="hooks" | "ghost")``;
* ``opacus-hooks`` / ``opacus-ghost``: the same through Opacus 1.6, when importable.

The DP objects are built by ``make_private`` on a Poisson ``DataLoader`` (noise multiplier
1, clipping bound 1, expected batch = the batch size), but the timed steps use one fixed
batch of exactly the stated size, so batch sampling is not timed. The LSTM model uses
``nn.LSTM`` without privacy, ``dp_torch.layers.DPLSTM`` for dp_torch and
``opacus.layers.DPLSTM`` for Opacus. GPT-2's loss is the cross-entropy of the flattened
``[B*T, vocab]`` logits; an example's loss is the mean over its positions (ghost mode passes
``shape=(B, T)``). A configuration that fails (Opacus' ghost mode refuses GPT-2's tied
head) is a ``fails`` cell with its reason listed under the table.

Precision: ``--bf16`` (or ``--precision fp32,bf16``) measures every model twice, the second
time with the forward pass and loss under ``torch.autocast(device, dtype=torch.bfloat16)``;
each precision is a table line of its own and its ratios are to the non-private step of the
same precision.

Time: all configurations of one model and precision live in one process and are stepped in
interleaved rounds (one step of each per round, the order rotating), so that load from
other processes affects them alike; the figure is the median over ``--steps`` rounds after
``--warmup`` rounds (``time.perf_counter``; on CUDA after ``torch.cuda.synchronize()``).
``--threads`` sets torch's intra-op threads; with more threads than idle cores the thread
pool stalls, so ``--threads 1`` suits a run beside other busy processes. The JSON keeps
every step time and the minimum next to the median.

Memory (beside the time in every cell): on CUDA, ``torch.cuda.max_memory_allocated()``
while the mode is built and takes its first 3 steps, minus what was allocated before (the
other modes), so the mode's parameters, gradients, optimizer state, batch and activations.
On the CPU each configuration runs again alone in a fresh subprocess (``--warmup`` + 2
steps) and the figure is the growth of the resident set during the steps (see
:mod:`benchmarks._memory`; parameters and the interpreter are not included).

Sizes (batch = reference batch x ``--batch-scale``, at least 2; sequence lengths x
``--seq-scale``):

=============  ====  ===  ====  ===========  ===============================================
setting        mlp   cnn  lstm  transformer  notes
=============  ====  ===  ====  ===========  ===============================================
cuda default   1024  512  256   64           reference sizes; 20 steps, 3 warm-up rounds
cpu default    256   128  64    16           ``--batch-scale 0.25``; 10 steps, 3 warm-up
``--quick``    128   64   32    8            ``--batch-scale 0.125``; 7 steps, 2 warm-up
``--smoke``    2     2    2     2            seq lstm 4, transformers 8; 1 step, 1 warm-up
=============  ====  ===  ====  ===========  ===============================================

``transformer-768`` and ``gpt2`` (reference batch 32) scale the same way (32, 8, 4, 2).
Sequence lengths are the reference ones (LSTM 64, transformers 128) except with ``--smoke``.

Examples::

    python benchmarks/torch_step.py --quick --json torch_step.json   # CPU sizes
    python benchmarks/torch_step.py --device cuda --bf16 --json torch_step_cuda.json
    python benchmarks/torch_step.py --report run1.json run2.json       # one table of both
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks import _memory, _timing  # noqa: E402
from benchmarks.models import (  # noqa: E402
    LANGUAGE_MODELS,
    MODEL_NAMES,
    SPECS,
    build_model,
    count_parameters,
    make_batch,
)

__all__ = [
    "MODES",
    "Config",
    "Stepper",
    "build_stepper",
    "main",
    "markdown_tables",
    "measure_memory",
    "parse_args",
    "time_interleaved",
]

MODES: tuple[str, ...] = (
    "nonprivate",
    "dp_torch-hooks",
    "dp_torch-ghost",
    "opacus-hooks",
    "opacus-ghost",
)
_LR = 1e-3
_NOISE = 1.0
_CLIP = 1.0
_SEED = 0
#: Notices that say nothing about the measurement (Opacus' full backward hooks on the first
#: layer, whose input needs no gradient). Filtered for every mode alike.
_QUIET = ("Full backward hook is firing when gradients are computed with respect to module "
          "outputs since no inputs require gradients")


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration (everything a subprocess needs to rebuild it).

    Attributes:
        model: A name from :data:`benchmarks.models.MODEL_NAMES`.
        mode: One of :data:`MODES`.
        batch: Fixed batch size of the timed steps.
        seq_len: Sequence length for token models, else ``None``.
        device: ``"cpu"`` or ``"cuda"``.
        threads: ``torch.set_num_threads`` value.
        warmup: Untimed steps before measuring.
        precision: ``"fp32"``, or ``"bf16"``: forward and loss under ``torch.autocast``
            with ``torch.bfloat16`` (parameters and gradients stay float32).
    """

    model: str
    mode: str
    batch: int
    seq_len: Optional[int]
    device: str
    threads: int
    warmup: int
    precision: str = "fp32"


class Stepper:
    """A ready-to-step training configuration: call it to run one full step."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: Any,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        labels: torch.Tensor,
        autocast: Optional[str] = None,
    ) -> None:
        """Hold the objects of one configuration.

        Args:
            module: The (possibly wrapped) model.
            optimizer: The (possibly DP) optimizer.
            criterion: The (possibly ghost-clipping) loss of ``(output, labels)``.
            inputs: The fixed batch.
            labels: Its labels.
            autocast: Device type (``"cpu"``, ``"cuda"``) of a bfloat16
                ``torch.autocast`` around the forward pass and the loss, or ``None``.
        """
        self.module = module
        self.optimizer = optimizer
        self.criterion = criterion
        self.inputs = inputs
        self.labels = labels
        self.autocast = autocast

    def __call__(self) -> None:
        """``zero_grad``, forward and loss (under autocast), backward, ``optimizer.step()``."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.autocast or "cpu", dtype=torch.bfloat16,
                            enabled=self.autocast is not None):
            loss = self.criterion(self.module(self.inputs), self.labels)
        loss.backward()
        self.optimizer.step()


def _sequence_loss(criterion: Any, ghost: bool) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The loss of a language model: ``criterion`` on the flattened ``[B*T, V]`` logits.

    A ghost-clipping criterion gets ``shape=(B, T)`` so that an example's loss is the mean
    over its positions.
    """
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> Any:
        batch, length = labels.shape
        extra = {"shape": (batch, length)} if ghost else {}
        return criterion(logits.reshape(batch * length, -1), labels.reshape(-1), **extra)

    return loss


def _framework(mode: str) -> tuple[str, str]:
    library, _, grad_sample_mode = mode.partition("-")
    return library, grad_sample_mode


def _opacus_available() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def _lstm_class(library: str) -> type[nn.Module]:
    if library == "dp_torch":
        from dp_torch.layers import DPLSTM

        return DPLSTM
    if library == "opacus":
        from opacus.layers import DPLSTM as OpacusDPLSTM

        return OpacusDPLSTM
    return nn.LSTM


def _engine(library: str) -> Any:
    if library == "dp_torch":
        from dp_torch import PrivacyEngine

        return PrivacyEngine(accountant="rdp")
    from opacus import PrivacyEngine as OpacusPrivacyEngine

    with warnings.catch_warnings():  # Opacus' "secure RNG turned off" notice
        warnings.simplefilter("ignore")
        return OpacusPrivacyEngine(accountant="rdp")


def build_stepper(config: Config) -> Stepper:
    """Build the model, optimizer and loss of ``config`` and move its batch to the device.

    The DP objects come from ``make_private`` on a Poisson data loader over
    ``4 * batch`` synthetic examples (so the expected batch is ``batch``); the steps use
    one fixed batch. Weights are seeded identically for every mode.

    Args:
        config: The configuration.

    Returns:
        The :class:`Stepper`.

    Raises:
        ValueError: If ``config.mode`` or ``config.precision`` is unknown.
    """
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {config.mode!r}.")
    if config.precision not in _timing.PRECISIONS:
        raise ValueError(f"precision must be one of {list(_timing.PRECISIONS)}, "
                         f"got {config.precision!r}.")
    library, grad_sample_mode = _framework(config.mode)
    device = torch.device(config.device)
    torch.manual_seed(_SEED)
    model = build_model(config.model, lstm_cls=_lstm_class(library), seq_len=config.seq_len)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=_LR)
    criterion: Any = nn.CrossEntropyLoss()
    data = torch.Generator().manual_seed(_SEED)
    inputs, labels = make_batch(config.model, config.batch, seq_len=config.seq_len, generator=data)
    if library != "nonprivate":
        pool = make_batch(config.model, 4 * config.batch, seq_len=config.seq_len, generator=data)
        loader = DataLoader(TensorDataset(*pool), batch_size=config.batch)
        model, optimizer, criterion = _make_private(library, grad_sample_mode, model, optimizer,
                                                    criterion, loader)
    if config.model in LANGUAGE_MODELS:
        criterion = _sequence_loss(criterion, ghost=grad_sample_mode == "ghost")
    autocast = config.device if config.precision == "bf16" else None
    return Stepper(model, optimizer, criterion, inputs.to(device), labels.to(device), autocast)


def _make_private(library: str, grad_sample_mode: str, model: nn.Module, optimizer: Any,
                  criterion: Any, loader: DataLoader) -> tuple[nn.Module, Any, Any]:
    """``make_private`` of ``library`` (noise 1, bound 1, Poisson); the criterion is
    replaced by the ghost-clipping loss in ghost mode."""
    engine = _engine(library)
    kwargs: dict[str, Any] = {"criterion": criterion} if grad_sample_mode == "ghost" else {}
    with warnings.catch_warnings():
        if library == "opacus":  # its notices about secure RNG and hooks, not ours
            warnings.simplefilter("ignore")
        made = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=_NOISE, max_grad_norm=_CLIP, poisson_sampling=True,
            grad_sample_mode=grad_sample_mode, **kwargs,
        )
    if grad_sample_mode == "ghost":
        return made[0], made[1], made[2]
    return made[0], made[1], criterion


def _sync(device: str) -> Optional[Callable[[], None]]:
    return torch.cuda.synchronize if device == "cuda" else None


def time_interleaved(
    steppers: dict[str, Stepper], *, steps: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Step every configuration in rotating rounds; return each one's step times (s).

    Args:
        steppers: Configurations by mode.
        steps: Timed rounds.
        warmup: Untimed rounds first.
        device: ``"cpu"`` or ``"cuda"`` (CUDA is synchronised around each step).

    Returns:
        The ``steps`` measured durations of each mode, in seconds.
    """
    return _timing.time_interleaved(dict(steppers), steps=steps, warmup=warmup,
                                    sync=_sync(device))


# ---------------------------------------------------------------------- memory (subprocess)


def _memory_worker(config: Config) -> dict[str, Any]:
    """Run ``config`` alone (warm-up + 2 steps) and measure its resident-set growth in MiB."""
    torch.set_num_threads(config.threads)
    warnings.filterwarnings("ignore", message=_QUIET)
    stepper = build_stepper(config)

    def steps() -> None:
        for _ in range(config.warmup + 2):
            stepper()

    return _memory.rss_growth(steps)


def measure_memory(config: Config, *, timeout: float = 600.0) -> dict[str, Any]:
    """Peak memory of ``config`` on the CPU, measured in a fresh Python process.

    Args:
        config: The configuration.
        timeout: Seconds before the subprocess is abandoned.

    Returns:
        ``{"peak_mib": float, "memory_kind": str}``, or ``{"memory_error": str}``.
    """
    return _memory.run_worker(__file__, dataclasses.asdict(config), timeout=timeout)


def _cuda_mark() -> int:
    """Reset CUDA's peak counter; the bytes allocated now (the other modes' state)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _cuda_peak(stepper: Stepper, base: int) -> dict[str, Any]:
    """Two more steps of ``stepper``; its peak CUDA allocation above ``base`` in MiB."""
    for _ in range(2):
        stepper()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"peak_mib": peak / 2**20, "memory_kind": "cuda-peak"}


# ---------------------------------------------------------------------- driver


def _plan(args: argparse.Namespace) -> _timing.Plan:
    return _timing.make_plan(args, full_size=args.device == "cuda", smoke_warmup=1)


def _sizes(model: str, plan: _timing.Plan) -> tuple[int, Optional[int]]:
    return _timing.sizes(SPECS[model], plan)


def _bench_model(model: str, precision: str, modes: Sequence[str], plan: _timing.Plan,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    batch, seq = _sizes(model, plan)
    configs = {mode: Config(model, mode, batch, seq, args.device, args.threads, plan.warmup,
                            precision) for mode in modes}
    rows = {mode: {**dataclasses.asdict(c), "title": SPECS[model].title}
            for mode, c in configs.items()}
    steppers: dict[str, Stepper] = {}
    for mode, config in configs.items():
        stepper = _timing.guarded(lambda c=config: _build_checked(c, rows[c.mode], args),
                                  rows[mode], width=15, verbose=args.verbose)
        if stepper is not None:
            steppers[mode] = stepper
    times = time_interleaved(steppers, steps=plan.steps, warmup=plan.warmup, device=args.device)
    del steppers
    _timing.record_times(rows, times, with_min=True)
    for mode, config in configs.items():
        if "median_ms" in rows[mode] and not args.no_memory and args.device == "cpu":
            rows[mode].update(measure_memory(config))
        _timing.log(_row_log(rows[mode]))
    _timing.add_ratios(rows, _opacus_twin, "vs_opacus")
    return [rows[mode] for mode in modes]


def _build_checked(config: Config, row: dict[str, Any], args: argparse.Namespace) -> Stepper:
    """Build ``config`` and run its first step (so that it fails here, not in a round).

    On CUDA (unless ``--no-memory``) the mode's own peak allocation (its model, gradients,
    optimizer state, batch and activations; not the other modes') is measured here.
    """
    base = _cuda_mark() if args.device == "cuda" and not args.no_memory else None
    stepper = build_stepper(config)
    row["params"] = count_parameters(stepper.module)
    _timing.timed(stepper, _sync(args.device))
    if base is not None:
        row.update(_cuda_peak(stepper, base))
    return stepper


def _row_log(row: dict[str, Any]) -> str:
    where = f"  {row['model']:15s} {row['precision']} {row['mode']:15s}"
    if "median_ms" not in row:
        return f"{where} failed"
    memory = f"{row['peak_mib']:.0f} MiB" if "peak_mib" in row else row.get("memory_error", "-")
    return f"{where} {row['median_ms']:9.2f} ms  {memory}"


def _opacus_twin(mode: str) -> Optional[str]:
    library, grad_sample_mode = _framework(mode)
    return f"opacus-{grad_sample_mode}" if library == "dp_torch" else None


def markdown_tables(results: list[dict[str, Any]], modes: Sequence[str]) -> str:
    """The step-time table (with ratios and peak memory), then why any cell failed.

    Args:
        results: Rows as produced by this script (one per model, precision and mode).
        modes: Column order.

    Returns:
        The table in markdown, followed (after a blank line) by one list item per failed
        step or memory measurement.
    """
    ours = [(m, f"{m.split('-')[1]} ours/Opacus") for m in modes if m.startswith("dp_torch")]
    return _timing.report(results, modes, ours, "vs_opacus")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring); ``argv=None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    _timing.add_size_arguments(parser, MODEL_NAMES, MODES,
                               "reference batch x this (default 1 on cuda, 0.25 on cpu, "
                               "0.125 with --quick)")
    parser.add_argument("--threads", type=_timing.positive(int),
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else (os.cpu_count() or 1), help="torch.set_num_threads (default: all)")
    _timing.add_precision_arguments(parser)
    _timing.add_run_arguments(parser)
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory measurement (subprocesses on the CPU)")
    _timing.add_output_arguments(parser)
    parser.add_argument(_memory.WORKER_FLAG, dest="memory_worker", default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not args.report and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch.cuda.is_available() is False; "
                     "use --device cpu.")
    return args


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _environment(args: argparse.Namespace, plan: _timing.Plan) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "steps": plan.steps, "warmup": plan.warmup, "batch_scale": plan.batch_scale,
        "seq_scale": plan.seq_scale, "optimizer": f"SGD(lr={_LR})",
        "noise_multiplier": _NOISE, "max_grad_norm": _CLIP,
        "precisions": _timing.precisions(args),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    if _opacus_available():
        import opacus

        info["opacus"] = opacus.__version__
    return info


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown tables, optionally write JSON.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        ``{"environment": {...}, "results": [row, ...], "table": str}``.
    """
    args = parse_args(argv)
    if args.memory_worker is not None:
        config = Config(**json.loads(args.memory_worker))
        print(json.dumps(_memory_worker(config)), flush=True)
        return {}
    if args.report:
        return _timing.print_report(args.report, markdown_tables)
    plan = _plan(args)
    modes = [m for m in args.modes if not m.startswith("opacus") or _opacus_available()]
    skipped = sorted(set(args.modes) - set(modes))
    warnings.filterwarnings("ignore", message=_QUIET)
    if skipped:
        _timing.log(f"opacus is not importable: skipping {', '.join(skipped)}")
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with _threads(args.threads):
        for model in args.models:
            _timing.log(f"{model}: batch {_sizes(model, plan)[0]}, seq {_sizes(model, plan)[1]}")
            for precision in _timing.precisions(args):
                results += _bench_model(model, precision, modes, plan, args)
    table = markdown_tables(results, modes)
    return _timing.write_output(results, table, _environment(args, plan), started, args.json)


if __name__ == "__main__":
    main()
