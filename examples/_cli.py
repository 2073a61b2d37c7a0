"""The command line shared by the examples (no framework imported here).

Every digits example, and the GPT-2 example with its own defaults, takes the same
privacy and training options (``--epsilon``, ``--delta``, ``--epochs``, ``--seed``,
``--batch-size``, ``--lr``, ``--max-grad-norm``, optionally ``--hidden``) and checks
them the same way; each adds its own options (threads, devices, processes, ...) and
their checks.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

from examples._common import NUM_IMAGES, TEST_SIZE

__all__ = ["Check", "digits_parser", "parse_checked", "parse_digits_args"]

#: ``(flag, value seen, valid?)``: one option check.
Check = tuple[str, Any, bool]


def digits_parser(
    description: str,
    *,
    batch_help: str = "expected Poisson batch",
    lr_help: str = "SGD learning rate",
    hidden: bool = True,
) -> argparse.ArgumentParser:
    """A parser with the options every digits example takes.

    Args:
        description: The parser's description (the example's first docstring line).
        batch_help: Help text of ``--batch-size``.
        lr_help: Help text of ``--lr``.
        hidden: Whether to add ``--hidden`` (units of the MLP's hidden layer).

    Returns:
        The parser; add the example's own options (and change defaults with
        ``parser.set_defaults``; the help shows the current ones) before
        :func:`parse_checked`.
    """
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--epsilon", type=float, default=3.0, help="privacy budget (default %(default)g)")
    add("--delta", type=float, default=1e-5, help="delta (default %(default)g)")
    add("--epochs", type=int, default=30, help="training epochs (default %(default)d)")
    add("--seed", type=int, default=0, help="seed of init, batches, noise")
    add("--batch-size", type=int, default=256, help=f"{batch_help} (default %(default)d)")
    add("--lr", type=float, default=0.5, help=f"{lr_help} (default %(default)g)")
    add("--max-grad-norm", type=float, default=1.0, help="clipping bound C (default %(default)g)")
    if hidden:
        add("--hidden", type=int, default=128, help="hidden units of the MLP")
    return parser


def _positive_finite(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def _common_checks(args: argparse.Namespace, train_size: int) -> list[Check]:
    checks = [
        ("--epsilon", args.epsilon, _positive_finite(args.epsilon)),
        ("--delta", args.delta, 0 < args.delta < 1),
        ("--epochs", args.epochs, args.epochs >= 1),
        ("--seed", args.seed, args.seed >= 0),
        ("--batch-size", args.batch_size, 1 <= args.batch_size <= train_size),
        ("--lr", args.lr, _positive_finite(args.lr)),
        ("--max-grad-norm", args.max_grad_norm, _positive_finite(args.max_grad_norm)),
    ]
    if hasattr(args, "hidden"):
        checks.append(("--hidden", args.hidden, args.hidden >= 1))
    return checks


def parse_checked(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]],
    *,
    train_size: int,
    smoke_epochs: int,
    extra_checks: Callable[[argparse.Namespace], Iterable[Check]] = lambda args: (),
) -> argparse.Namespace:
    """Parse, check every option (exit with a message naming the first bad one), apply --smoke.

    Args:
        parser: From :func:`digits_parser`, with a ``--smoke`` flag added.
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
        train_size: Training examples (the largest valid ``--batch-size``).
        smoke_epochs: Epochs that ``--smoke`` sets.
        extra_checks: The example's own checks of its own options.

    Returns:
        The parsed options.
    """
    args = parser.parse_args(argv)
    for flag, value, ok in [*_common_checks(args, train_size), *extra_checks(args)]:
        if not ok:
            parser.error(f"{flag} got {value!r}; pass a value in its valid range (see --help).")
    if args.smoke:
        args.epochs = smoke_epochs
    return args


def parse_digits_args(
    description: str, argv: Optional[Sequence[str]], *, smoke_epochs: int, hidden: bool = True
) -> argparse.Namespace:
    """The common digits options plus ``--smoke``, parsed and checked (no options of its own).

    Args:
        description: The parser's description (the example's first docstring line).
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
        smoke_epochs: Epochs that ``--smoke`` sets.
        hidden: Whether the example takes ``--hidden``.

    Returns:
        The parsed options.
    """
    parser = digits_parser(description, hidden=hidden)
    parser.add_argument("--smoke", action="store_true", help=f"{smoke_epochs} epochs only")
    return parse_checked(parser, argv, train_size=NUM_IMAGES - TEST_SIZE, smoke_epochs=smoke_epochs)
