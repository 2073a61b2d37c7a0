"""The README's main job: plan a private run with dpcore, then train it with each backend.

1. The privacy plan, from ``dpcore`` alone: the noise multiplier that the planned run on
   scikit-learn's bundled digits needs for its budget, and what every accountant says
   that run spends (RDP is the default; PRV and PLD are tight; GDP is an approximation).
2. The PyTorch run (``examples/torch_digits.py``): DP-SGD through ``dp_torch`` with a
   progress bar, then the test accuracy and the epsilon spent.

Usage::

    python examples/demo.py [--smoke]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings
from collections.abc import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dpcore.accounting import create_accountant, get_noise_multiplier  # noqa: E402

#: Training examples of the digits split used by every demo run (1,797 - 360 test).
NUM_TRAIN = 1437


def print_plan(*, batch_size: int, epochs: int, epsilon: float, delta: float) -> float:
    """Print the privacy plan of the digits run and return its noise multiplier."""
    q = batch_size / NUM_TRAIN
    steps = epochs * round(1 / q)
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                 steps=steps, accountant="rdp")
    print(f"== privacy plan (dpcore): {NUM_TRAIN} examples, expected batch {batch_size} "
          f"(q={q:.4f}), {epochs} epochs = {steps} steps, budget epsilon {epsilon} at delta {delta:g}")
    print(f"   calibrated noise multiplier (RDP): {sigma:.4f}")
    print(f"   {'accountant':<11}{'epsilon':>9}")
    for kind in ("rdp", "prv", "pld", "gdp"):
        accountant = create_accountant(kind)
        accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps = accountant.get_epsilon(delta)
        note = "  (CLT approximation; may under-report)" if kind == "gdp" else ""
        print(f"   {kind:<11}{eps:>9.4f}{note}")
    return sigma


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; ``--smoke`` trains for a couple of epochs only."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds per backend")
    args = parser.parse_args(argv)
    from examples import torch_digits

    settings = torch_digits.parse_args(["--smoke"] if args.smoke else [])
    print_plan(batch_size=settings.batch_size, epochs=settings.epochs, epsilon=settings.epsilon,
               delta=settings.delta)
    print("\n== PyTorch (dp_torch)")
    torch_digits.main(["--smoke"] if args.smoke else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
