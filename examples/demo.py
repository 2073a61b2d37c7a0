"""The README's main job: plan a private run with dpcore, then train it with each backend.

1. The privacy plan, from ``dpcore`` alone: the noise multiplier that the planned run on
   scikit-learn's bundled digits needs for its budget, and what every accountant says
   that run spends (RDP is the default; PRV and PLD are tight; GDP is an approximation).
2. The PyTorch run (``examples/torch_digits.py``): DP-SGD through ``dp_torch`` with a
   progress bar, then the test accuracy and the epsilon spent.
3. The JAX run (``examples/jax_digits.py``): the same model, data split and privacy
   settings through ``dp_jax`` (flax + optax).
4. Both runs side by side, and a parity summary from ``conformance``: the same MLP in
   both frameworks gives the same per-example gradients, clipped sums, noised update,
   batches, 20-step trajectory, ledger and epsilon.

Usage::

    python examples/demo.py [--smoke]
"""

from __future__ import annotations

import argparse
import math
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
    batches = math.ceil(NUM_TRAIN / batch_size)  # len() of the plain DataLoader
    q = 1 / batches  # Opacus' rule: sample_rate = 1 / len(data_loader)
    steps = epochs * batches
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                 steps=steps, accountant="rdp")
    print(f"== privacy plan (dpcore): {NUM_TRAIN} examples, batch size {batch_size} -> sample rate "
          f"q = 1/{batches}, {epochs} epochs = {steps} steps, budget epsilon {epsilon} at delta {delta:g}")
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
    flags = ["--smoke"] if args.smoke else []
    print("\n== PyTorch (dp_torch)")
    torch_result = torch_digits.main(flags)
    print("\n== JAX (dp_jax)")
    from examples import jax_digits

    jax_result = jax_digits.main(flags)
    print_side_by_side(torch_result, jax_result)
    return 0


def print_side_by_side(torch_result: dict, jax_result: dict) -> None:
    """Print both runs' figures in two columns, then the conformance parity summary."""
    print("\n== side by side")
    print(f"   {'':<18}{'PyTorch (dp_torch)':>20}{'JAX (dp_jax)':>16}")
    for key, fmt in (("accuracy", ".3f"), ("epsilon", ".4f"), ("noise_multiplier", ".4f")):
        print(f"   {key:<18}{torch_result[key]:>20{fmt}}{jax_result[key]:>16{fmt}}")
    import conformance

    report = conformance.run_conformance(["mlp"], ["float64"], accountants=("rdp",))
    worst = max(r.max_rel for r in report.results)
    verdict = "all pass" if report.passed else f"{len(report.failures)} FAIL"
    print(f"== parity (conformance, MLP, float64): {len(report.results)} checks, {verdict}; "
          f"largest relative difference {worst:.1e}")
    for result in report.failures:
        print(f"   mismatch: {result.case} {result.check}: {result.detail}")


if __name__ == "__main__":
    sys.exit(main())
