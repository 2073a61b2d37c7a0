"""An ``optax.contrib.dpsgd`` training loop with one name changed: ``dp_jax.dpsgd``.

The loop is the one ``optax.contrib`` documents: per-example gradients from
``jax.vmap(jax.grad(loss))``, then ``tx.update(per_example_grads, state, params)``. It trains
a linear softmax classifier on scikit-learn's 8x8 digits (split and standardised as in
``examples/jax_digits.py``). The only change from optax is the import; the two arguments
optax does not have are used for what they are for: the batches are Poisson samples (rate
256/1437, padded to a fixed shape for ``jax.jit``, so ``mask=`` marks the real rows) and
``expected_batch_size=256`` divides by the expected, not the realised, batch size. The noise
multiplier is calibrated with ``dpcore`` for the run's epsilon, and dpcore's RDP accountant
records every step.

Run ``python examples/optax_contrib_dropin.py`` (``--smoke``: two epochs). It ends with a line
such as ``optax.contrib drop-in: test accuracy 0.93 at epsilon 3.00 (delta 1e-05)``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import dp_jax  # noqa: E402  (was: from optax import contrib; contrib.dpsgd)
from dpcore.accounting import RDPAccountant, get_noise_multiplier  # noqa: E402
from examples._cli import parse_digits_args  # noqa: E402
from examples._common import digits_split  # noqa: E402

__all__ = ["main", "parse_args"]

#: Epochs used by ``--smoke``.
SMOKE_EPOCHS = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``argv=None`` reads ``sys.argv``)."""
    return parse_digits_args(__doc__.split("\n\n")[0], argv, smoke_epochs=SMOKE_EPOCHS, hidden=False)


def _loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = x @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[y]


def _poisson_batch(rng: np.random.Generator, n: int, rate: float, padded: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a Poisson sample of ``range(n)`` padded to ``padded`` rows, and its mask.

    A sample larger than the padded shape (five standard deviations above the expected
    size: probability below 1e-6 per step) raises rather than being cut, which would no
    longer be the Poisson sampling the accountant assumes.
    """
    chosen = np.flatnonzero(rng.random(n) < rate)
    if len(chosen) > padded:
        raise ValueError(f"Poisson batch of {len(chosen)} exceeds the padded shape {padded}; change --seed.")
    index = np.zeros(padded, dtype=np.int64)
    index[: len(chosen)] = chosen
    return index, np.arange(padded) < len(chosen)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Train, print the result line and return ``{"accuracy", "epsilon"}``."""
    args = parse_args(argv)
    x_train, y_train, x_test, y_test = digits_split()
    x_train, x_test = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)
    n, rate = len(y_train), args.batch_size / len(y_train)
    steps = args.epochs * n // args.batch_size
    padded = int(np.ceil(args.batch_size + 5 * np.sqrt(args.batch_size)))
    noise = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta,
                                 sample_rate=rate, steps=steps)
    tx = dp_jax.dpsgd(args.lr, args.max_grad_norm, noise, args.seed, expected_batch_size=args.batch_size)
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    state = tx.init(params)

    @jax.jit
    def step(params: dict, state: Any, x: jax.Array, y: jax.Array, mask: jax.Array) -> tuple:
        grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params, x, y)
        updates, state = tx.update(grads, state, params, mask=mask)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    rng, accountant = np.random.default_rng(args.seed), RDPAccountant()
    for _ in range(steps):
        index, mask = _poisson_batch(rng, n, rate, padded)
        params, state = step(params, state, x_train[index], jnp.asarray(y_train)[index], jnp.asarray(mask))
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    predicted = jnp.argmax(x_test @ params["w"] + params["b"], axis=1)
    result = {"accuracy": float(jnp.mean(predicted == jnp.asarray(y_test))),
              "epsilon": float(accountant.get_epsilon(delta=args.delta))}
    print(f"optax.contrib drop-in: test accuracy {result['accuracy']:.3f} at epsilon "
          f"{result['epsilon']:.2f} (delta {args.delta:g})")
    return result


if __name__ == "__main__":
    main()
