"""Differentially private training of a small MLP on scikit-learn's digits with PyTorch Lightning.

The MNIST-like task of ``torch_digits.py`` (1,437 training and 360 test 8x8 images, the
same split, model and defaults), written as a ``LightningModule`` trained by a
``Trainer``: :class:`dp_torch.lightning.DPLightningDataModule` turns the data module's
train loader into a Poisson loader (expected batch ``--batch-size``) and
:class:`dp_torch.lightning.DPCallback` wraps the module and its optimizer for DP-SGD,
with the noise multiplier calibrated so that ``--epochs`` epochs spend at most
``--epsilon`` at ``--delta`` (RDP accountant). Each epoch prints the epsilon spent and
the test accuracy, which rises from chance (about 0.1) to about 0.9.

Run ``python examples/lightning_mnist_like.py`` (``--smoke``: two epochs, for the tests;
see ``--help``); it needs ``pip install lightning``. It ends with a line such as
``dp_torch lightning digits: test accuracy 0.930 at epsilon 3.00 (delta 1e-05)``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dp_torch.lightning import DPCallback, DPLightningDataModule  # noqa: E402
from examples._cli import digits_parser, parse_checked  # noqa: E402
from examples._common import NUM_IMAGES, TEST_SIZE, report, run_torch_isolated  # noqa: E402
from examples.torch_digits import accuracy, build_model, load_data  # noqa: E402

__all__ = ["DigitsClassifier", "DigitsData", "main", "parse_args"]

#: Epochs used by ``--smoke``.
SMOKE_EPOCHS = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``argv=None`` reads ``sys.argv``)."""
    parser = digits_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_EPOCHS} epochs only")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parse_checked(
        parser, argv, train_size=NUM_IMAGES - TEST_SIZE, smoke_epochs=SMOKE_EPOCHS,
        extra_checks=lambda args: [("--threads", args.threads, args.threads >= 1)],
    )


class DigitsData(pl.LightningDataModule):
    """The digits split: an ordinary shuffled train loader and the test set for validation."""

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        self.train_set, self.test_set = load_data()
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        """Batches of ``batch_size`` (Poisson once wrapped by ``DPLightningDataModule``)."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=generator)

    def val_dataloader(self) -> DataLoader:
        """The whole test set in one batch."""
        return DataLoader(self.test_set, batch_size=len(self.test_set))


class DigitsClassifier(pl.LightningModule):
    """The MLP of ``torch_digits.py`` with cross-entropy and plain SGD."""

    def __init__(self, hidden: int, lr: float) -> None:
        super().__init__()
        self.model = build_model(hidden)
        self.criterion = nn.CrossEntropyLoss()
        self.lr = lr

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features, labels = batch
        loss = self.criterion(self(features), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        features, labels = batch
        hits = (self(features).argmax(dim=1) == labels).float().mean()
        self.log("val_accuracy", hits, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _EpochReport(pl.Callback):
    """Print the epsilon spent and the test accuracy after each epoch."""

    def __init__(self, privacy: DPCallback) -> None:
        self.privacy = privacy

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        print(f"epoch {trainer.current_epoch + 1}: epsilon {self.privacy.epsilon():.2f}, "
              f"test accuracy {float(trainer.callback_metrics['val_accuracy']):.3f}", flush=True)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    data = DigitsData(args.batch_size, args.seed)
    module = DigitsClassifier(args.hidden, args.lr)
    initial = accuracy(module.model, data.test_set)
    privacy = DPCallback(max_grad_norm=args.max_grad_norm, target_epsilon=args.epsilon,
                         target_delta=args.delta,
                         noise_generator=torch.Generator().manual_seed(args.seed))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=args.epochs, callbacks=[privacy, _EpochReport(privacy)],
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=not args.no_progress, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=DPLightningDataModule(data))
    return {
        "accuracy": accuracy(module.model, data.test_set), "initial_accuracy": initial,
        "epsilon": privacy.epsilon(), "delta": args.delta,
        "noise_multiplier": float(privacy.noise_multiplier), "epochs": trainer.current_epoch,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train, evaluate, print the result line and return the figures.

    Args:
        argv: Command-line arguments (see :func:`parse_args`); ``None`` reads ``sys.argv``.

    Returns:
        ``accuracy`` (test), ``initial_accuracy`` (before training), ``epsilon`` (spent),
        ``delta``, ``noise_multiplier``, ``epochs`` and ``seconds``.
    """
    args = parse_args(argv)
    return report("dp_torch lightning digits", run_torch_isolated(_run, args), args.delta)


if __name__ == "__main__":
    main()
