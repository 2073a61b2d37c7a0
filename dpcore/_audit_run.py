"""Run the backends' canary audits as subprocesses and put their reports side by side.

``dpcore`` never imports a framework, so each backend's audit (``python -m dp_torch.audit``,
``python -m dp_jax.audit``) runs in its own interpreter and prints a JSON report; this module
starts them, reads the reports and formats the claimed epsilon beside the audited lower bound at
each delta.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

from dpcore.checks import check_choice

__all__ = ["BACKENDS", "add_audit_arguments", "audit_backends", "format_reports", "run_audit_cli"]

#: Backend name -> (the module whose ``python -m`` entry runs its audits, arguments that ask
#: it for both the step and the run audit).
BACKENDS = {"torch": ("dp_torch.audit", ["--audit", "both"]), "jax": ("dp_jax.audit", ["--kind", "both"])}


def _arguments(settings: dict[str, Any]) -> list[str]:
    args = []
    for key, value in settings.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _run_one(backend: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    module, both = BACKENDS[backend]
    command = [sys.executable, "-m", module, "--json", *both, *_arguments(settings)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(
            f"The {backend} audit failed (exit {done.returncode}); is dp-parity[{backend}] installed? "
            f"Its last output:\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout)


def audit_backends(backends: Sequence[str] = ("torch", "jax"), *, timeout: float = 600.0,
                   **settings: Any) -> dict[str, dict[str, Any]]:
    """Run each backend's audits (step and run audits) and return their reports.

    Args:
        backends: Which of ``"torch"`` and ``"jax"`` to audit.
        timeout: Seconds allowed for each backend.
        **settings: Passed to each backend's command line (``noise_multiplier``,
            ``sample_rate``, ``steps``, ``max_grad_norm``, ``seed``, ...).

    Returns:
        ``{backend: report}``; each report has a ``"flagged"`` entry and one entry per audit
        with ``deltas``, ``claimed_epsilons``, ``audited_epsilons``, ``flagged`` and ``reasons``.

    Raises:
        ValueError: For an unknown backend.
        RuntimeError: If a backend's audit could not run.
    """
    for backend in backends:
        check_choice(backend, "backends", tuple(BACKENDS))
    return {backend: _run_one(backend, settings, timeout) for backend in backends}


def _series(part: dict[str, Any], name: str) -> list[float]:
    """A per-delta list of a report part (the backends name it in the plural or singular)."""
    return list(part.get(f"{name}s", part.get(name, [])))


def _rows(backend: str, report: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("step", "run"):
        part: Optional[dict[str, Any]] = report.get(name)
        if not part:
            continue
        series = zip(part["deltas"], _series(part, "claimed_epsilon"), _series(part, "audited_epsilon"))
        rows += [f"{backend:<7} {name:<5} {d:<8g} {c:>12.3f} {a:>15.3f}" for d, c, a in series]
    return rows


def format_reports(reports: dict[str, dict[str, Any]]) -> str:
    """A table of claimed and audited epsilon per backend, audit and delta, and the verdicts."""
    lines = [f"{'backend':<7} {'audit':<5} {'delta':<8} {'claimed eps':>12} {'audited eps >=':>15}"]
    for backend, report in reports.items():
        lines += _rows(backend, report)
    for backend, report in reports.items():
        reasons = [r for name in ("step", "run") for r in (report.get(name) or {}).get("reasons", [])]
        verdict = "FLAGGED: " + "; ".join(reasons) if report.get("flagged") else "no evidence against the claim"
        lines.append(f"{backend}: {verdict}")
    lines.append(
        "An audit gives a lower bound on epsilon: a pass is evidence that the implementation "
        "matches its accounting, not a proof."
    )
    return "\n".join(lines)


def add_audit_arguments(parser: argparse.ArgumentParser, *, num_canaries: int, trials: int,
                        accountant: str, significance: float, seed: Optional[int]) -> None:
    """Add the options every backend's ``python -m <backend>.audit`` shares, with its defaults.

    Args:
        parser: The backend's parser; its own options are added before or after.
        num_canaries: Default of ``--num-canaries``.
        trials: Default of ``--trials``.
        accountant: Default of ``--accountant``.
        significance: Default of ``--significance``.
        seed: Default of ``--seed``.
    """
    parser.add_argument("--noise-multiplier", type=float, required=True)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-canaries", type=int, default=num_canaries)
    parser.add_argument("--trials", type=int, default=trials, help="step audit trials")
    parser.add_argument("--accountant", default=accountant)
    parser.add_argument("--significance", type=float, default=significance)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_audit_cli(argv: Optional[Sequence[str]], parser: argparse.ArgumentParser,
                  report: Callable[[argparse.Namespace], dict[str, Any]],
                  text: Callable[[dict[str, Any]], str]) -> int:
    """Parse ``argv``, run a backend's audits, print the report; the backends' ``main``.

    Args:
        argv: Arguments (``None``: ``sys.argv[1:]``).
        parser: The backend's parser.
        report: Runs the audits the arguments ask for; the report has a ``"flagged"`` entry.
        text: Formats the report for people (``--json`` prints it as JSON instead).

    Returns:
        0 when no audit is flagged, 1 when one is (argparse exits 2 on bad arguments).
    """
    args = parser.parse_args(argv)
    result = report(args)
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 1 if result["flagged"] else 0
