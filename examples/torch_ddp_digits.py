"""Data-parallel DP training of the digits MLP with dp_torch on several processes (gloo, CPU).

The distributed twin of ``examples/torch_digits.py``: same data (scikit-learn's 8x8
digits, 1,437 training and 360 test images, nothing downloaded), same MLP 64 -> 128
(tanh) -> 10, same DP-SGD settings (Poisson sampling with a *global* expected batch of
256, flat clipping at 1.0, SGD with learning rate 0.5, noise multiplier calibrated by
``make_private_with_epsilon`` so that the whole run spends at most ``--epsilon``). The
model is wrapped in ``DPDDP``; ``make_private`` then returns the distributed pieces:

* a loader in which every rank Poisson-samples *its shard* of the training set with the
  global rate ``256 / 1437`` (with the same ``--seed`` on every rank the union of the
  ranks' batches is exactly the single-process Poisson batch);
* a ``DistributedDPOptimizer``: each rank clips its own examples, rank 0 adds the noise
  once, one all-reduce sums the ranks' clipped sums, and the mean divides by the global
  expected batch size, so the update is the one-process update on the union;
* one accountant per rank, all recording the same steps.

``--physical-batch N`` adds a ``BatchMemoryManager`` (each rank splits its share of
a logical batch into chunks of at most ``N``; ranks may take different numbers of
chunks). Rank 0 shows the progress bar and prints the result; the test accuracy is
measured on rank 0 (every rank holds the same parameters). With the defaults
(epsilon 3, delta 1e-5, 30 epochs) on 2 processes it reaches about the accuracy of
``torch_digits.py`` (93-95 %).

Run ``torchrun --nproc_per_node 2 examples/torch_ddp_digits.py`` for 2 processes, or
``python examples/torch_ddp_digits.py`` for one without torchrun (``--smoke``: two
epochs, for the tests; see ``--help``).

If a rank dies, the others stop at their next optimizer step with
``dp_torch.distributed.DistributedStepError`` (nothing applied); ``--timeout`` sets the
process group's timeout, the bound for a rank that hangs instead.

The last line (printed by rank 0) reads like
``dp_torch DDP digits (2 processes): test accuracy 0.936 at epsilon 3.00 (delta 1e-05)``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dp_torch import PrivacyEngine  # noqa: E402
from dp_torch.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP  # noqa: E402
from dp_torch.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from examples.torch_digits import build_model, load_data, summary, train_epoch  # noqa: E402
from examples._cli import Check, digits_parser, parse_checked  # noqa: E402
from examples._common import NUM_IMAGES, TEST_SIZE  # noqa: E402
from examples._common import fit, result_line, run_torch_isolated  # noqa: E402

__all__ = ["main", "parse_args", "process_group"]

#: Epochs used by ``--smoke``.
SMOKE_EPOCHS = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``argv=None`` reads ``sys.argv``)."""
    parser = digits_parser(__doc__.split("\n\n")[0],
                           batch_help="global expected Poisson batch (all ranks together)")
    parser.add_argument("--physical-batch", type=int, default=None,
                        help="largest physical chunk per rank (BatchMemoryManager; default off)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="process-group timeout in seconds (bound for a hung rank)")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_EPOCHS} epochs only")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parse_checked(parser, argv, train_size=NUM_IMAGES - TEST_SIZE, smoke_epochs=SMOKE_EPOCHS,
                         extra_checks=_own_checks)


def _own_checks(args: argparse.Namespace) -> list[Check]:
    return [
        ("--physical-batch", args.physical_batch,
         args.physical_batch is None or args.physical_batch >= 1),
        ("--threads", args.threads, args.threads >= 1),
        ("--timeout", args.timeout, args.timeout > 0),
    ]


@contextlib.contextmanager
def process_group(timeout_s: float) -> Iterator[None]:
    """Join the gloo group torchrun describes (``RANK``/``WORLD_SIZE``), or a one-process group.

    Args:
        timeout_s: The group's collective timeout in seconds.

    Yields:
        Nothing; the group is destroyed on exit.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    with tempfile.TemporaryDirectory() as tmp:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0,
                                    world_size=1, timeout=timeout)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _mean_over_ranks(value: float, weight: int) -> float:
    """``sum(value * weight) / sum(weight)`` over the ranks (for the logged loss only)."""
    buf = torch.tensor([value * weight, float(weight)], dtype=torch.float64)
    dist.all_reduce(buf)
    return float(buf[0] / buf[1]) if buf[1] > 0 else float("nan")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same on every rank; DPDDP broadcasts rank 0's weights
    train_set, test_set = load_data()
    model = DPDDP(build_model(args.hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # The same sampling seed on every rank: the union of the ranks' Poisson shares is the
    # single-process batch of that seed. batch_size is the GLOBAL expected batch.
    sampling = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=sampling)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
    )

    def epoch() -> float:
        if args.physical_batch is None:
            local = train_epoch(model, optimizer, loader)
        else:
            with BatchMemoryManager(data_loader=loader, optimizer=optimizer,
                                    max_physical_batch_size=args.physical_batch) as chunks:
                local = train_epoch(model, optimizer, chunks)
        return _mean_over_ranks(local, 1)

    loss = fit(args.epochs, epoch, lambda: engine.get_epsilon(args.delta),
               desc=f"DP-SGD x{world}", hide=args.no_progress or rank != 0)
    return {**summary(model, test_set, engine, optimizer, args, loss),
            "world_size": world, "rank": rank, "steps": len(engine.accountant)}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Join the process group, train, print the result line on rank 0, return the figures.

    Without torchrun's environment it runs as a one-process group. The thread count is
    restored on return.

    Args:
        argv: Command-line arguments (see :func:`parse_args`); ``None`` reads ``sys.argv``.

    Returns:
        ``accuracy``, ``epsilon``, ``delta``, ``noise_multiplier``, ``train_loss``,
        ``epochs``, ``world_size``, ``rank``, ``steps`` and ``seconds``.
    """
    args = parse_args(argv)
    result = run_torch_isolated(_run, args, process_group(args.timeout))
    if result["rank"] == 0:
        label = f"dp_torch DDP digits ({result['world_size']} processes)"
        print(result_line(label, result, args.delta), flush=True)
    return result


if __name__ == "__main__":
    main()
