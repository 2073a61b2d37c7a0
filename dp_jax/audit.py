"""Canary audits of dp_jax's real training paths: one step, one run, and the sampler.

The statistics live in :mod:`dpcore.audit`; this module builds the canaries and
runs them through the code a user runs: :meth:`dp_jax.PrivacyEngine.make_private`,
its jitted ``step`` (per-example clipping by vmap or ghost clipping, the
clipped-sum accumulator, noise, ``optax.sgd``) and its Poisson batches.

The model is one ``flax.linen.Dense`` layer without bias and the loss is linear,
``loss(w, x) = -<w, x>``, so an example's gradient is ``-x`` whatever the
parameters. A canary is a "Dirac" example: ``x = 10 C e_k`` on a coordinate ``k``
no other example touches, so its clipped gradient is exactly ``C e_k`` and the
released value of coordinate ``k``, in units of ``C`` on the sum scale, is
``1 + N(0, sigma^2)`` when it was in the batch and ``N(0, sigma^2)`` when not.
It is recovered from the parameter change: ``u = delta_w * m / (lr * C)`` with the
known SGD learning rate ``lr`` and denominator ``m`` (``expected_batch_size`` for
``loss_reduction="mean"``, 1 for ``"sum"``).

Public API:

- :func:`step_audit`: many trials of ONE logical step at sample rate 1 through the
  engine's jitted step (``jax.lax.scan`` over trials, the noise key advancing as in
  training); two attacks: the canary's coordinate, and the spread of coordinates no
  example touches (it exposes a denominator that depends on the realised batch).
  Bounds by :func:`dpcore.audit.clopper_pearson_bound` and
  :func:`dpcore.audit.gdp_bound` against the exact claim ``mu = 1 / sigma``.
- :func:`run_audit`: one training run with real Poisson batches and many canaries
  (Steinke, Nasr and Jagielski 2023): :func:`dpcore.audit.one_run_bound` and
  Clopper-Pearson against the engine's accountant, and
  :func:`dpcore.audit.sampler_test` on the batches the engine produced.
- ``python -m dp_jax.audit --noise-multiplier 1 --sample-rate 0.1 --steps 50 --json``
  prints a JSON report (a ``dpcore`` command can run it without importing JAX).

Guarantee:
    For an implementation that is ``(claimed_epsilon[i], deltas[i])``-DP (for
    :func:`step_audit`: ``1 / sigma``-GDP, the exact privacy of one unsampled
    Gaussian step), ``flagged`` is true with probability at most ``significance``
    (Bonferroni over every bound it compares). ``flagged`` is evidence of a bug;
    not flagged is evidence, never proof, of a correct implementation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from dp_jax._audit_common import DEFAULT_DELTAS, AttackBounds, RunAuditResult, StepAuditResult, _GRAD_SAMPLE_MODES
from dp_jax._audit_run import run_audit
from dp_jax._audit_step import step_audit
from dpcore._audit_run import add_audit_arguments, run_audit_cli

__all__ = [
    "AttackBounds",
    "DEFAULT_DELTAS",
    "RunAuditResult",
    "StepAuditResult",
    "main",
    "run_audit",
    "step_audit",
]


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dp_jax.audit",
        description="Canary audit of dp_jax's engine: one run (Poisson batches, many "
                    "canaries) and/or one step (many trials).")
    add_audit_arguments(parser, num_canaries=500, trials=2000, accountant="rdp",
                        significance=0.05, seed=0)
    parser.add_argument("--kind", choices=("run", "step", "both"), default="run")
    parser.add_argument("--grad-sample-mode", choices=_GRAD_SAMPLE_MODES, default="vmap")
    return parser


def _report(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"backend": "dp_jax", "run": None, "step": None}
    if args.kind in ("run", "both"):
        report["run"] = run_audit(
            noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate,
            steps=args.steps, num_canaries=args.num_canaries,
            grad_sample_mode=args.grad_sample_mode, accountant=args.accountant,
            significance=args.significance, seed=args.seed).to_dict()
    if args.kind in ("step", "both"):
        report["step"] = step_audit(
            noise_multiplier=args.noise_multiplier, trials=args.trials,
            grad_sample_mode=args.grad_sample_mode, significance=args.significance,
            seed=args.seed).to_dict()
    report["flagged"] = any(r["flagged"] for r in (report["run"], report["step"]) if r)
    return report


def _text(report: dict[str, Any]) -> str:
    lines = []
    for kind in ("step", "run"):
        result = report[kind]
        if result is None:
            continue
        lines.append(f"{kind} audit: flagged={result['flagged']}")
        for d, a, c in zip(result["deltas"], result["audited_epsilon"],
                           result["claimed_epsilon"]):
            lines.append(f"  delta={d:g}: audited eps >= {a:.3f}, claimed eps {c:.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the audit(s) and print the report.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 if nothing was flagged, 1 if an audit flagged the implementation.
    """
    return run_audit_cli(argv, _parser(), _report, _text)


if __name__ == "__main__":
    sys.exit(main())
