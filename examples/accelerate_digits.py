"""Differentially private training of the digits MLP in an ``accelerate`` loop.

The same data, model and DP-SGD as ``examples/torch_digits.py`` (Poisson batches of expected
size 256, clipping at 1.0, SGD with learning rate 0.5, the noise multiplier calibrated so that
30 epochs spend epsilon 3 at delta 1e-5), written the way an ``accelerate`` user writes a
loop: :func:`dp_torch.integrations.accelerate.make_private_with_accelerator` makes the model,
optimizer and loader private, then ``Accelerator.prepare`` places them; the loop calls
``accelerator.backward(loss)``. One process (several processes: ``dp_torch.distributed``).

Run ``python examples/accelerate_digits.py`` (``--smoke``: two epochs, for the tests). It ends
with a line such as ``accelerate digits: test accuracy 0.93 at epsilon 3.00 (delta 1e-05)``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dp_torch import PrivacyEngine  # noqa: E402
from dpcore.accounting import get_noise_multiplier  # noqa: E402
from examples._cli import parse_digits_args  # noqa: E402
from examples.torch_digits import SMOKE_EPOCHS, accuracy, build_model, load_data  # noqa: E402

__all__ = ["main", "parse_args"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``argv=None`` reads ``sys.argv``)."""
    return parse_digits_args(__doc__.split("\n\n")[0], argv, smoke_epochs=SMOKE_EPOCHS)


def _epoch(accelerator: Any, model: nn.Module, optimizer: Any, loader: DataLoader) -> None:
    criterion = nn.CrossEntropyLoss()
    for features, labels in loader:
        optimizer.zero_grad()
        out = model(features)
        # an empty Poisson batch is still a (noise-only) step
        loss = out.sum() * 0.0 if len(labels) == 0 else criterion(out, labels)
        accelerator.backward(loss)
        optimizer.step()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Train, print the result line and return ``{"accuracy", "epsilon"}``."""
    from accelerate import Accelerator

    from dp_torch.integrations.accelerate import make_private_with_accelerator

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, test = load_data()
    model = build_model(args.hidden)
    engine = PrivacyEngine()
    noise = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta,
                                 sample_rate=args.batch_size / len(train), epochs=args.epochs)
    accelerator = Accelerator(cpu=True)
    private = make_private_with_accelerator(
        accelerator, engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr),
        data_loader=DataLoader(train, batch_size=args.batch_size), noise_multiplier=noise,
        max_grad_norm=args.max_grad_norm, noise_generator=torch.Generator().manual_seed(args.seed),
    )
    for _ in range(args.epochs):
        _epoch(accelerator, private.model, private.optimizer, private.data_loader)
    result = {"accuracy": accuracy(model, test), "epsilon": engine.get_epsilon(args.delta)}
    print(f"accelerate digits: test accuracy {result['accuracy']:.3f} at epsilon "
          f"{result['epsilon']:.2f} (delta {args.delta:g})")
    return result


if __name__ == "__main__":
    main()
