"""Data, training loop, timing and result line shared by the examples.

No framework is imported at module level: the JAX examples never load torch and the
torch examples never load JAX (``run_torch_isolated`` imports torch when called).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "NUM_IMAGES",
    "TEST_SIZE",
    "digits_split",
    "fit",
    "result_line",
    "run_timed",
    "run_torch_isolated",
]

#: Number of digits images in scikit-learn's bundle.
NUM_IMAGES = 1797
#: Size of the held-out test split (stratified, fixed ``random_state``).
TEST_SIZE = 360


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, split once (stratified, ``random_state=0``) and standardised.

    The pixels are standardised with the training set's mean and standard deviation (a
    few border pixels are always 0: their deviation is taken as 1).

    Returns:
        ``(x_train, y_train, x_test, y_test)`` as float64 features and integer labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=TEST_SIZE, random_state=0, stratify=labels
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def fit(
    epochs: int,
    train_epoch: Callable[[], float],
    epsilon: Callable[[], float],
    *,
    desc: str = "DP-SGD",
    hide: bool = False,
) -> float:
    """Run ``epochs`` epochs under a tqdm bar that shows the loss and the epsilon spent.

    Args:
        epochs: Number of epochs.
        train_epoch: Trains one epoch and returns its mean loss.
        epsilon: The epsilon spent so far.
        desc: The bar's label.
        hide: Whether to hide the bar.

    Returns:
        The last epoch's loss (``nan`` for zero epochs).
    """
    from tqdm import tqdm

    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=hide)
    loss = float("nan")
    for _ in bar:
        loss = train_epoch()
        bar.set_postfix(loss=f"{loss:.3f}", epsilon=f"{epsilon():.2f}")
    bar.close()
    return loss


def run_timed(run: Callable[[argparse.Namespace], dict[str, Any]],
              args: argparse.Namespace) -> dict[str, Any]:
    """``run(args)`` with its wall time added as ``result["seconds"]``."""
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - start
    return result


def run_torch_isolated(run: Callable[[argparse.Namespace], dict[str, Any]],
                       args: argparse.Namespace, context: Any = None) -> dict[str, Any]:
    """:func:`run_timed` on ``args.threads`` torch threads, torch's RNG state restored after.

    Args:
        run: The example's training and evaluation.
        args: Its parsed options (with ``threads``).
        context: An optional context manager entered around the run (e.g. a process group).

    Returns:
        The run's figures with ``seconds``; the thread count is restored on return.
    """
    import contextlib

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with context or contextlib.nullcontext(), torch.random.fork_rng(devices=[]):
            return run_timed(run, args)
    finally:
        torch.set_num_threads(threads)


def result_line(label: str, result: dict[str, Any], delta: float) -> str:
    """The line every digits example prints last: label, test accuracy, epsilon, delta."""
    return (f"{label}: test accuracy {result['accuracy']:.3f} at epsilon "
            f"{result['epsilon']:.2f} (delta {delta:g})")


def report(label: str, result: dict[str, Any], delta: float) -> dict[str, Any]:
    """Print the example's result line (see :func:`result_line`) and return the result."""
    print(result_line(label, result, delta), flush=True)
    return result
