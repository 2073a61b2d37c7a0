"""The ``dpcore`` command line: epsilon tables, noise calibration, epsilon curves and audits.

Examples::

    dpcore epsilon --noise-multiplier 1.1 --sample-rate 0.004 --steps 14000 --delta 1e-5
    dpcore epsilon ... --accountant all --json
    dpcore epsilon --ledger run.json --delta 1e-5     # re-account a saved run, every accountant
    dpcore calibrate --target-epsilon 8 --delta 1e-5 --sample-rate 0.04 --epochs 90
    dpcore calibrate --target-epsilon 8 --target-delta 1e-5 ...   # Opacus' name for --delta
    dpcore plot --noise-multiplier 1.1 --sample-rate 0.004 --epochs 20 --delta 1e-5 -o curve.png
    dpcore audit --noise-multiplier 1.0 --sample-rate 0.1 --steps 50

Every bad argument exits with status 2 and a message that names the flag.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from dpcore import _cli_ledger
from dpcore._audit_run import audit_backends, format_reports
from dpcore.accounting import create_accountant, get_noise_multiplier
from dpcore.accounting.gdp import GDPApproximationWarning
from dpcore.ledger import Ledger

__all__ = ["build_parser", "main"]

ACCOUNTANTS = ("rdp", "prv", "pld", "gdp")


# ---------------------------------------------------------------------------- argument types
def _number(flag: str, check: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {rule}, got {text!r}")
        return value

    return parse


def _integer(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < 1 or value != float(text):
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number >= 1, got {text!r}")
        return value

    return parse


_SIGMA = _number("--noise-multiplier", lambda x: math.isfinite(x) and x > 0, "a number > 0")
_RATE = _number("--sample-rate", lambda x: 0 < x <= 1, "in (0, 1]")
_DELTA = _number("--delta", lambda x: 0 < x < 1, "in (0, 1), e.g. 1e-5")
_TARGET_DELTA = _number("--target-delta", lambda x: 0 < x < 1, "in (0, 1), e.g. 1e-5")
_EPOCHS = _number("--epochs", lambda x: math.isfinite(x) and x > 0, "a number > 0")
_TARGET = _number("--target-epsilon", lambda x: math.isfinite(x) and x > 0, "a number > 0")
_TOL = _number("--epsilon-tolerance", lambda x: math.isfinite(x) and x > 0, "a number > 0")


def _add_schedule(parser: argparse.ArgumentParser, *, sigma: bool, required: bool = True,
                  delta_required: bool = True) -> None:
    unless = "" if required else " (unless --ledger is given)"
    if sigma:
        parser.add_argument("--noise-multiplier", type=_SIGMA, required=required,
                            help="noise standard deviation / clipping norm (sigma)" + unless)
    parser.add_argument("--sample-rate", type=_RATE, required=required,
                        help="Poisson sampling rate q = expected batch size / dataset size"
                        + unless)
    length = parser.add_mutually_exclusive_group(required=required)
    length.add_argument("--steps", type=_integer("--steps"),
                        help="number of training steps" + unless)
    length.add_argument("--epochs", type=_EPOCHS, help="number of epochs (steps = epochs / q)")
    parser.add_argument("--delta", type=_DELTA, required=delta_required,
                        help="target delta, e.g. 1e-5")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dpcore`` command."""
    parser = argparse.ArgumentParser(
        prog="dpcore", description="Privacy accounting for DP-SGD (Poisson-subsampled Gaussian)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_epsilon(sub)
    cal = sub.add_parser("calibrate", help="find the noise multiplier for a target epsilon",
                         description="Print the smallest noise multiplier meeting the budget.")
    cal.add_argument("--target-epsilon", type=_TARGET, required=True, help="target epsilon")
    _add_schedule(cal, sigma=False, delta_required=False)
    cal.add_argument("--target-delta", type=_TARGET_DELTA,
                     help="Opacus' name for --delta (give either; both must then agree)")
    cal.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp",
                     help="accountant used for calibration (default: rdp)")
    cal.add_argument("--epsilon-tolerance", type=_TOL, default=0.01,
                     help="how far below the target the result may be (default 0.01)")
    plot = sub.add_parser("plot", help="plot epsilon against epochs",
                          description="Draw epsilon against epochs for each accountant.")
    _add_schedule(plot, sigma=True)
    plot.add_argument("--accountant", choices=(*ACCOUNTANTS, "all"), default="all")
    plot.add_argument("--points", type=_integer("--points"), default=30,
                      help="number of points on each curve (default 30)")
    plot.add_argument("-o", "--output", required=True, help="output image file, e.g. curve.png")
    _add_audit(sub)
    return parser


def _add_epsilon(sub: Any) -> None:
    eps = sub.add_parser(
        "epsilon", help="print epsilon for a training schedule or a saved run's ledger",
        description="Print the epsilon of a DP-SGD schedule, or of a saved run's privacy ledger "
                    "(--ledger run.json, written by dpcore.ledger.save_ledger from a dp_torch or "
                    "dp_jax accountant), under each accountant.")
    _add_schedule(eps, sigma=True, required=False)
    eps.add_argument("--ledger", metavar="PATH",
                     help="re-account this saved ledger instead of a schedule given by flags")
    eps.add_argument("--accountant", choices=(*ACCOUNTANTS, "all"), default="all",
                     help="which accountant (default: all)")
    eps.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_audit(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="audit the backends empirically (canary attacks on their real code paths)",
        description="Run each backend's step and run audits and print the claimed epsilon beside "
                    "the audited lower bound at each delta. Exit status 1 when an audit flags.")
    audit.add_argument("--backend", choices=("torch", "jax", "both"), default="both")
    audit.add_argument("--noise-multiplier", type=_SIGMA, default=1.0, help="sigma (default 1.0)")
    audit.add_argument("--sample-rate", type=_RATE, default=0.1, help="q of the run audit (default 0.1)")
    audit.add_argument("--steps", type=_integer("--steps"), default=50, help="steps of the run audit (default 50)")
    audit.add_argument("--num-canaries", type=_integer("--num-canaries"), default=500,
                       help="canaries of the run audit (default 500)")
    audit.add_argument("--trials", type=_integer("--trials"), default=2000,
                       help="trials of the step audit (default 2000)")
    audit.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="claim's accountant (default prv)")
    audit.add_argument("--seed", type=int, default=None, help="seed of both audits (default: fresh)")
    audit.add_argument("--json", action="store_true", help="print the backends' reports as JSON")


# ---------------------------------------------------------------------------- commands
def _steps_of(args: argparse.Namespace) -> int:
    return args.steps if args.steps is not None else max(1, int(args.epochs / args.sample_rate))


def _epsilon(kind: str, sigma: float, q: float, steps: int, delta: float) -> tuple[float, str]:
    accountant = create_accountant(kind)
    accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return _cli_ledger.accountant_epsilon(accountant, delta)


def _schedule_ledger(args: argparse.Namespace) -> Ledger:
    """The one-entry ledger of the schedule flags; a missing flag is an error naming it."""
    missing = [flag for flag, value in (("--noise-multiplier", args.noise_multiplier),
                                        ("--sample-rate", args.sample_rate)) if value is None]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)} "
                         f"(or --ledger PATH)")
    if args.steps is None and args.epochs is None:
        raise ValueError("one of the arguments --steps --epochs is required (or --ledger PATH)")
    return Ledger(entries=((args.noise_multiplier, args.sample_rate, _steps_of(args)),))


def _check_ledger_alone(args: argparse.Namespace) -> None:
    given = [flag for flag, value in (
        ("--noise-multiplier", args.noise_multiplier), ("--sample-rate", args.sample_rate),
        ("--steps", args.steps), ("--epochs", args.epochs)) if value is not None]
    if given:
        raise ValueError(f"--ledger replaces the schedule; drop {', '.join(given)} "
                         f"(the ledger records every step's noise multiplier and sample rate)")


def _cmd_epsilon(args: argparse.Namespace) -> int:
    if args.ledger is not None:
        _check_ledger_alone(args)
        ledger = _cli_ledger.read_ledger(args.ledger)
        header = _cli_ledger.ledger_header(ledger, args.ledger, args.delta)
    else:
        ledger = _schedule_ledger(args)
        header = (f"noise_multiplier={args.noise_multiplier:g} sample_rate={args.sample_rate:g} "
                  f"steps={ledger.total_steps} delta={args.delta:g}")
    kinds = ACCOUNTANTS if args.accountant == "all" else (args.accountant,)
    rows = _cli_ledger.reaccount(ledger, kinds, args.delta)
    if args.json:
        print(json.dumps(_cli_ledger.report(ledger, rows, args.delta, args.ledger), indent=2))
    else:
        print(_cli_ledger.format_table(header, rows))
    return 0


def _delta_of(args: argparse.Namespace) -> float:
    """``--delta`` or its alias ``--target-delta``; both given must agree."""
    if args.delta is not None and args.target_delta is not None and args.delta != args.target_delta:
        raise ValueError(f"--delta {args.delta:g} and --target-delta {args.target_delta:g} "
                         f"disagree; they are one option (give either, or equal values)")
    delta = args.delta if args.delta is not None else args.target_delta
    if delta is None:
        raise ValueError("one of the arguments --delta --target-delta is required")
    return delta


def _cmd_calibrate(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GDPApproximationWarning)
        sigma = get_noise_multiplier(
            target_epsilon=args.target_epsilon, target_delta=_delta_of(args),
            sample_rate=args.sample_rate, steps=_steps_of(args), accountant=args.accountant,
            epsilon_tolerance=args.epsilon_tolerance,
        )
    print(f"{sigma:.10g}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print("dpcore plot needs matplotlib: pip install 'dp-parity[plot]'", file=sys.stderr)
        return 1
    total = _steps_of(args)
    kinds = ACCOUNTANTS if args.accountant == "all" else (args.accountant,)
    points = sorted({max(1, round(total * k / args.points)) for k in range(1, args.points + 1)})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind in kinds:
        eps = [_epsilon(kind, args.noise_multiplier, args.sample_rate, s, args.delta)[0]
               for s in points]
        ax.plot([s * args.sample_rate for s in points], eps, label=kind)
    ax.set_xlabel("epochs")
    ax.set_ylabel(f"epsilon (delta={args.delta:g})")
    ax.set_title(f"sigma={args.noise_multiplier:g}, q={args.sample_rate:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output)
    plt.close(fig)
    print(f"wrote {args.output}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    backends = ("torch", "jax") if args.backend == "both" else (args.backend,)
    settings = {name: getattr(args, name) for name in
                ("noise_multiplier", "sample_rate", "steps", "num_canaries", "trials", "accountant", "seed")}
    reports = audit_backends(backends, **settings)
    print(json.dumps(reports, indent=2) if args.json else format_reports(reports))
    return 1 if any(report.get("flagged") for report in reports.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dpcore`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"epsilon": _cmd_epsilon, "calibrate": _cmd_calibrate, "plot": _cmd_plot, "audit": _cmd_audit}
    try:
        return handler[args.command](args)
    except ValueError as err:
        parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
