"""``python -m conformance``: print the PyTorch / JAX parity table; exit 1 on any mismatch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from conformance._cases import CASES
from conformance._engines import ACCOUNTANTS
from conformance._runner import DTYPES, run_conformance

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Check that dp_torch and dp_jax agree: gradients, clipping, noise, "
                    "sampling, ledgers, epsilon and training trajectories.",
    )
    p.add_argument("--out", metavar="FILE", help="also write the markdown table to FILE")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=None,
                   help="run only these cases (default: all)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--accountants", nargs="+", choices=ACCOUNTANTS, default=list(ACCOUNTANTS))
    p.add_argument("--no-trajectory", action="store_true", help="skip the 20-step trajectories")
    p.add_argument("--no-ledger", action="store_true", help="skip the engine ledger checks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks, print the table, return the exit status (0 iff all pass)."""
    args = _parser().parse_args(argv)
    report = run_conformance(
        args.cases, args.dtypes, trajectory=not args.no_trajectory,
        ledger=not args.no_ledger, accountants=args.accountants,
    )
    table = report.markdown()
    print(table)
    print(report.summary())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
