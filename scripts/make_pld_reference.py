"""Regenerate tests/dpcore/data/dp_accounting_reference.json from Google's dp-accounting.

For every setting of tests/dpcore/grid.py this records dp-accounting's PLD epsilon
(pessimistic estimate) at a fine value discretisation: 1e-4, or 1e-6 where epsilon
is below 1 (there a 1e-4 grid is coarse next to one step's privacy loss and
over-reports; e.g. sigma 2, q 1e-4, 1e5 steps, delta 1e-8 gives 0.0984 at 1e-4 but
0.07684 at 1e-6, where it has converged). Run with the test extra installed:

    python scripts/make_pld_reference.py [--interval 1e-4]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dp_accounting import dp_event  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402

from tests.dpcore.grid import GRID  # noqa: E402

OUT = ROOT / "tests" / "dpcore" / "data" / "dp_accounting_reference.json"


def pld_epsilon(sigma: float, q: float, steps: int, delta: float, interval: float) -> float:
    """dp-accounting's PLD epsilon of ``steps`` Poisson-subsampled Gaussian steps."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interval", type=float, default=1e-4)
    args = parser.parse_args()
    rows = []
    for sigma, q, steps, delta in GRID:
        start = time.perf_counter()
        interval = args.interval
        eps = pld_epsilon(sigma, q, steps, delta, interval)
        if eps < 1.0:
            interval = min(interval, 1e-6)
            eps = pld_epsilon(sigma, q, steps, delta, interval)
        took = time.perf_counter() - start
        rows.append({"sigma": sigma, "q": q, "steps": steps, "delta": delta,
                     "pld_epsilon": eps, "interval": interval})
        print(f"sigma={sigma} q={q:.3g} steps={steps} delta={delta:g}: {eps:.6f} ({took:.1f}s)")
    payload = {"interval": args.interval, "fine_interval_below_epsilon_1": 1e-6,
               "source": "dp-accounting 0.6.0 PLDAccountant", "rows": rows}
    OUT.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
