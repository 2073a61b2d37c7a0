"""Accounting speed: dpcore's accountants against Opacus 1.6 and dp-accounting, in one run.

Measures, in one process:

- one RDP epsilon query on a single-segment history of 1e5 steps and on a
  history of 1e5 *distinct* steps (a noise schedule that changes every step);
- one cold PRV and PLD query (a fresh accountant, nothing cached) on
  single-segment histories of up to 1e5 steps, next to Opacus 1.6's
  ``PRVAccountant`` and dp-accounting's ``PLDAccountant`` on the same query;
- ``get_noise_multiplier`` for RDP, PRV and PLD.

Each figure is the median of ``--repeats`` runs. Run with the bench extra
installed (``pip install -e '.[bench]'``); missing baselines are reported as
such. Example::

    python benchmarks/accounting.py --json accounting.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks._timing import median_seconds  # noqa: E402
from dpcore.accounting import RDPAccountant, get_noise_multiplier  # noqa: E402
from dpcore.accounting.pld import PLDAccountant  # noqa: E402
from dpcore.accounting.prv import PRVAccountant  # noqa: E402
from dpcore.accounting.rdp import _rdp_cached  # noqa: E402

SETTINGS = [
    (1.1, 256 / 60000, 14062, 1e-5),
    (1.0, 0.01, 1000, 1e-5),
    (1.5, 0.04, 2250, 1e-5),
    (1.0, 0.01, 100000, 1e-5),
    (1.1, 256 / 60000, 100000, 1e-5),
    (0.8, 0.001, 100000, 1e-6),
]


def _ours(cls: type, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = cls()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return acc.get_epsilon(delta)


def _opacus_prv(sigma: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants import PRVAccountant as OpacusPRV

    acc = OpacusPRV()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def _dpa_pld(sigma: float, q: float, steps: int, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def _available(fn: Callable[..., float]) -> bool:
    try:
        fn(1.0, 0.01, 10, 1e-5)
    except ImportError:
        return False
    return True


def bench_rdp(repeats: int) -> list[dict[str, Any]]:
    """RDP query time for a long single segment and for 1e5 distinct entries."""
    single = RDPAccountant()
    single.step(noise_multiplier=1.1, sample_rate=0.004, num_steps=100000)
    varying = RDPAccountant()
    start = time.perf_counter()
    for t in range(100000):
        varying.step(noise_multiplier=1.0 + (t % 1000) / 1000.0, sample_rate=0.004)
    record_s = time.perf_counter() - start
    rows = []
    for name, acc in (("1 segment of 1e5 steps", single), ("1e5 distinct steps", varying)):
        seconds = median_seconds(lambda: acc.get_epsilon(1e-5), repeats * 20)
        rows.append({"history": name, "query_ms": seconds * 1e3, "epsilon": acc.get_epsilon(1e-5)})
    rows[1]["record_1e5_steps_s"] = record_s
    return rows


def bench_numerical(repeats: int) -> list[dict[str, Any]]:
    """Cold PRV and PLD queries, ours and the baselines, setting by setting."""
    have_opacus, have_dpa = _available(_opacus_prv), _available(_dpa_pld)
    rows = []
    for sigma, q, steps, delta in SETTINGS:
        row: dict[str, Any] = {"sigma": sigma, "q": q, "steps": steps, "delta": delta}
        for key, fn in (
            ("prv", lambda: _ours(PRVAccountant, sigma, q, steps, delta)),
            ("pld", lambda: _ours(PLDAccountant, sigma, q, steps, delta)),
            ("opacus_prv", (lambda: _opacus_prv(sigma, q, steps, delta)) if have_opacus else None),
            ("dpa_pld", (lambda: _dpa_pld(sigma, q, steps, delta)) if have_dpa else None),
        ):
            if fn is None:
                continue
            row[f"{key}_epsilon"] = fn()
            row[f"{key}_ms"] = median_seconds(fn, repeats) * 1e3
        rows.append(row)
    return rows


def bench_calibration(repeats: int) -> list[dict[str, Any]]:
    """get_noise_multiplier wall time per accountant (target 8, delta 1e-5, q 0.04, 90 epochs)."""
    rows = []
    for kind in ("rdp", "prv", "pld"):
        def run() -> float:
            _rdp_cached.cache_clear()  # cold: no per-step RDP vectors from earlier runs
            return get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.04,
                                        epochs=90, accountant=kind)

        sigma = run()
        rows.append({"accountant": kind, "sigma": sigma,
                     "seconds": median_seconds(run, max(1, repeats // 2))})
    return rows


def _markdown(rdp: list, numerical: list, calibration: list) -> str:
    lines = ["### RDP query", "", "| history | query (ms) | epsilon |", "|---|---|---|"]
    lines += [f"| {r['history']} | {r['query_ms']:.3f} | {r['epsilon']:.4f} |" for r in rdp]
    lines += ["", f"(recording 1e5 distinct steps took {rdp[1]['record_1e5_steps_s']:.2f} s in all)",
              "", "### PRV and PLD: one cold query", "",
              "| sigma | q | steps | delta | ours PRV ms | Opacus PRV ms | speed-up | ours PLD ms "
              "| dp-acc PLD ms | speed-up | PRV eps | PLD eps |", "|" + "---|" * 12]
    for r in numerical:
        prv_x = r.get("opacus_prv_ms", float("nan")) / r["prv_ms"]
        pld_x = r.get("dpa_pld_ms", float("nan")) / r["pld_ms"]
        lines.append(
            f"| {r['sigma']} | {r['q']:.4g} | {r['steps']} | {r['delta']:g} | {r['prv_ms']:.1f} | "
            f"{r.get('opacus_prv_ms', float('nan')):.1f} | {prv_x:.1f}x | {r['pld_ms']:.1f} | "
            f"{r.get('dpa_pld_ms', float('nan')):.1f} | {pld_x:.1f}x | {r['prv_epsilon']:.4f} | "
            f"{r['pld_epsilon']:.4f} |"
        )
    lines += ["", "### Calibration (target epsilon 8, delta 1e-5, q 0.04, 90 epochs)", "",
              "| accountant | sigma | seconds |", "|---|---|---|"]
    lines += [f"| {r['accountant']} | {r['sigma']:.6g} | {r['seconds']:.3f} |" for r in calibration]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the accounting benchmark and print a markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rdp = bench_rdp(args.repeats)
    numerical = bench_numerical(args.repeats)
    calibration = bench_calibration(args.repeats)
    print(_markdown(rdp, numerical, calibration))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rdp": rdp, "numerical": numerical, "calibration": calibration}, handle,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
