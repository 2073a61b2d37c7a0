"""The model, data and optimizer shared by the distributed tests and their subprocesses.

No side effects on import (the subprocesses configure JAX before importing it).
Everything is float64: the callers enable ``jax_enable_x64`` first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dp_jax

N, DIM, HIDDEN = 40, 5, 4
Q, STEPS, EXPECTED = 0.3, 3, 12
SEED = 3
BUCKETS = (24,)  # one shape, one compile per case (the three batches have 14, 12 and 9 rows)
LR = 0.1
C_FLAT = 0.5
C_LAYERS = [0.3, 0.2, 0.4, 0.1]  # leaf order: dense.b, dense.w, out.b, out.w
SIGMA = 1.1
NOISE_SEED = 7


def loss_fn(params: Any, example: Any) -> jax.Array:
    """Squared error of a one-hidden-layer tanh network (a nonlinear per-example loss)."""
    h = jnp.tanh(example["x"] @ params["dense"]["w"] + params["dense"]["b"])
    pred = h @ params["out"]["w"] + params["out"]["b"]
    return (pred - example["y"]) ** 2


def init_params() -> Any:
    """Fixed float64 parameters."""
    rng = np.random.default_rng(1)
    return {
        "dense": {"w": jnp.asarray(rng.normal(size=(DIM, HIDDEN))), "b": jnp.zeros(HIDDEN)},
        "out": {"w": jnp.asarray(rng.normal(size=HIDDEN)), "b": jnp.asarray(0.1)},
    }


def make_data() -> dict[str, np.ndarray]:
    """``N`` examples, scaled up so that most per-example gradients are clipped."""
    rng = np.random.default_rng(2)
    return {"x": 2.0 * rng.normal(size=(N, DIM)), "y": rng.normal(size=N)}


def make_tx(sigma: float, bound: Any, seed: int = NOISE_SEED) -> optax.GradientTransformation:
    """Takes the clipped SUM: divide by m, add N(0, (sigma C / m)^2) once, SGD."""
    return optax.chain(
        optax.scale(1.0 / EXPECTED),
        dp_jax.add_gaussian_noise(sigma, bound, EXPECTED, jax.random.key(seed)),
        optax.sgd(LR),
    )


def initial_state(tx: optax.GradientTransformation) -> dp_jax.TrainState:
    """The TrainState every run starts from."""
    params = init_params()
    return dp_jax.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))


def poisson_batches(seed: int = SEED, **kwargs: Any) -> dp_jax.PoissonBatches:
    """The Poisson batches of the runs (one chunk per logical batch)."""
    return dp_jax.PoissonBatches(make_data(), Q, steps=STEPS, seed=seed, buckets=BUCKETS, **kwargs)


def reference_step(grad_fn: Any, tx: Any, bound: Any = None) -> Any:
    """The single-device step: the whole batch through ``grad_fn``, then ``tx``."""

    def step(state: dp_jax.TrainState, batch: Any, mask: Any):
        kwargs = {} if bound is None else {"max_grad_norm": bound}
        clipped, aux = grad_fn(state.params, batch, mask, **kwargs)
        updates, opt_state = tx.update(clipped, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return dp_jax.TrainState(params, opt_state, state.step + 1), aux.loss

    return jax.jit(step)


def reference_run(grad_fn: Any, tx: Any, bound: Any = None) -> tuple[Any, list[float], list[int]]:
    """``STEPS`` single-device steps on :func:`poisson_batches`: params, losses, batch sizes."""
    step = reference_step(grad_fn, tx, bound)
    state, losses, counts = initial_state(tx), [], []
    for logical in poisson_batches():
        assert len(logical) == 1, "a logical batch outgrew the single bucket"
        batch, mask = logical[0]
        state, loss = step(state, batch, mask)
        losses.append(float(loss))
        counts.append(int(np.sum(mask)))
    return state.params, losses, counts


def flat(tree: Any) -> dict[str, np.ndarray]:
    """``{keystr(path): numpy leaf}``."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def shards(tree: Any) -> dict[str, np.ndarray]:
    """Every addressable shard of every leaf, stacked on a new first axis (keys as raw data)."""
    tree = jax.tree_util.tree_map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        tree,
    )
    return {
        jax.tree_util.keystr(path): np.stack([np.asarray(s.data) for s in leaf.addressable_shards])
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
