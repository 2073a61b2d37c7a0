"""Drop-in replacements for ``optax.contrib``'s DP-SGD: change one name, keep the call.

:func:`differentially_private_aggregate` and :func:`dpsgd` take the arguments of
their ``optax.contrib`` namesakes and, like them, per-example gradients (a
leading batch axis on every leaf) as ``updates``. They are thin wrappers of
:func:`dp_jax.dp_aggregate`, so clipping, noise and precision follow dp_jax's
rules (see ``docs/migrating/optax_contrib.md`` for every difference).

Guarantee:
    One ``update`` releases ``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / m`` with
    ``clip(g) = g * min(1, C / (||g|| + 1e-6))``: the Gaussian mechanism with noise
    multiplier ``sigma`` on a query of L2 sensitivity ``C``, followed by a public
    division by ``m``. It is private for a Poisson-sampled batch only when ``m``
    does not depend on the realised batch size: pass ``expected_batch_size``
    (``m`` is then that number); the default, ``m`` = the leading-axis size of
    ``updates``, is optax' rule and is public only for fixed-size batches.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

import jax
import numpy as np
import optax

from dp_jax import _tree
from dp_jax._transforms import dp_aggregate
from dp_jax._types import PyTree

__all__ = ["differentially_private_aggregate", "dpsgd"]

KeyOrSeed = Union[jax.Array, int]


def _as_key(key: Optional[KeyOrSeed], seed: Optional[int]) -> jax.Array:
    """The PRNG key of optax' ``key``/``seed`` pair; an int becomes ``jax.random.key``."""
    if key is not None and seed is not None:
        raise ValueError(
            f"got both key={key!r} and seed={seed!r}; pass one of them (key is optax' "
            f"current name, seed its former one)."
        )
    value = key if key is not None else seed
    if value is None:
        raise TypeError(
            "differentially_private_aggregate needs a secret PRNG key: pass key=jax.random.key(s) "
            "or an int seed (optax falls back to key 0 with a warning; a fixed key is not private)."
        )
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return jax.random.key(int(value))
    if np.ndim(value) == 0 and jax.dtypes.issubdtype(getattr(value, "dtype", float), np.integer):
        return jax.random.key(value)  # an int seed as an array, e.g. from inject_hyperparams
    return value


def _denominator(updates: PyTree, mask: Any, expected_batch_size: Optional[int]) -> int:
    """``m``: ``expected_batch_size`` if given, else the leading-axis size of ``updates``."""
    if expected_batch_size is not None:
        return expected_batch_size
    if mask is not None:
        raise ValueError(
            "mask= marks padding of a variable-size (Poisson) batch, so the leading-axis size "
            "is not the batch size and the realised size must not be released; build the "
            "transformation with expected_batch_size=int(N * sample_rate)."
        )
    return _tree.batch_size_of(updates, "updates (per-example gradients)")


def differentially_private_aggregate(
    l2_norm_clip: Any,
    noise_multiplier: Any,
    key: Optional[KeyOrSeed] = None,
    *,
    seed: Optional[int] = None,
    expected_batch_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
    """``optax.contrib.differentially_private_aggregate`` on dp_jax's DP aggregation.

    ``update(per_example_grads, state, params=None, *, mask=None, noise=None)``
    clips each example's gradient to global L2 norm ``l2_norm_clip``, sums, adds
    ``N(0, (noise_multiplier * l2_norm_clip)^2)`` to every coordinate once and
    divides by ``m``. Differences from optax:

    * clip factor ``min(1, C / (norm + 1e-6))`` (optax: ``min(1, C / norm)``):
      each clipped example moves by less than ``1e-6`` in L2 norm, so with equal
      noise the averaged updates differ by less than ``1e-6``;
    * an example with a non-finite norm is dropped (factor 0) and counted in
      the state; optax lets the ``nan``/``inf`` through;
    * ``mask`` (``[B]`` booleans) zeroes padded rows exactly; it requires
      ``expected_batch_size`` (the realised batch size must not be released);
    * ``expected_batch_size=m`` divides by ``m`` instead of the leading-axis
      size (optax' rule, kept as the default): use it with Poisson sampling;
    * the noise is drawn in float32 or wider and from a different split of the
      key: same distribution as optax, not the same draws; a key is required
      (optax warns and uses key 0); the state is a
      :class:`dp_jax.transforms.DPAggregateState` (noise key plus clipping counts).

    Args:
        l2_norm_clip: ``C > 0``, the bound on each example's gradient norm.
        noise_multiplier: ``sigma >= 0``; the noise std on the sum is ``sigma * C``.
        key: A secret JAX PRNG key, or an int seed (optax' third argument).
        seed: optax' former name for the key; give ``key`` or ``seed``, not both.
        expected_batch_size: ``int(N * q) >= 1`` for Poisson sampling; ``None``
            divides by the leading-axis size of ``updates`` (as optax does).

    Returns:
        The transformation; run it first in any chain, on per-example gradients.

    Raises:
        TypeError: If neither ``key`` nor ``seed`` is given.
        ValueError: If both are given, an argument is out of range, or an
            update passes ``mask`` without ``expected_batch_size``.
    """
    base = dp_aggregate(noise_multiplier, l2_norm_clip, expected_batch_size or 1,
                        _as_key(key, seed))

    def update_fn(updates, state, params=None, *, mask=None, noise=None, **extra):
        m = _denominator(updates, mask, expected_batch_size)
        step = dp_aggregate(noise_multiplier, l2_norm_clip, m, None)
        return step.update(updates, state, params, mask=mask, noise=noise, **extra)

    return optax.GradientTransformationExtraArgs(base.init, update_fn)


def dpsgd(
    learning_rate: Any,
    l2_norm_clip: Any,
    noise_multiplier: Any,
    seed: KeyOrSeed,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    *,
    expected_batch_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
    """``optax.contrib.dpsgd``: :func:`differentially_private_aggregate`, momentum, step.

    The chain has optax' three parts (aggregate; ``optax.trace`` or identity;
    ``optax.scale_by_learning_rate``), so its updates equal
    ``optax.chain(differentially_private_aggregate(...), optax.sgd(learning_rate,
    momentum, nesterov))``. ``update`` takes per-example gradients and ``mask=``.

    Args:
        learning_rate: Learning rate or schedule.
        l2_norm_clip: ``C > 0``.
        noise_multiplier: ``sigma >= 0``.
        seed: An int seed or a secret JAX PRNG key.
        momentum: Momentum decay, or ``None`` for none.
        nesterov: Nesterov momentum.
        expected_batch_size: As for :func:`differentially_private_aggregate`.

    Returns:
        The chained transformation.
    """
    return optax.chain(
        differentially_private_aggregate(l2_norm_clip, noise_multiplier, seed,
                                         expected_batch_size=expected_batch_size),
        optax.trace(decay=momentum, nesterov=nesterov) if momentum is not None
        else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
