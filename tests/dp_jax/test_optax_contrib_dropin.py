"""``dp_jax.differentially_private_aggregate`` / ``dp_jax.dpsgd`` against ``optax.contrib``.

Oracles: optax' own transformations (the usage of their docstrings: a linear
model, ``jax.vmap(jax.grad(loss))`` per-example gradients, ``tx.update``), the
``dpcore.clipping`` reference math, and KS tests of the noise scale that also
reject 0.9x and 1.1x of it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
stats = pytest.importorskip("scipy.stats")

import jax.numpy as jnp  # noqa: E402

import dp_jax  # noqa: E402
from dpcore import clipping as core_clipping  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

CLIP = 1.0
BATCH = 8


def _loss(params, x, y):
    return 0.5 * jnp.square(x @ params["w"] + params["b"] - y)


def _problem(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, 5)) * 2.0, dtype)
    y = jnp.asarray(rng.normal(size=(BATCH,)), dtype)
    params = {"w": jnp.zeros((5,), dtype), "b": jnp.zeros((), dtype)}
    return params, x, y


_per_example_grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))


def _train(tx, steps=3):
    """optax' documented loop: per-example gradients in, ``tx.update``, apply."""
    params, x, y = _problem()
    state = tx.init(params)
    for _ in range(steps):
        grads = _per_example_grads(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _optax_dpsgd(*args, **kwargs):
    with warnings.catch_warnings():  # optax' dpsgd passes its seed on under a deprecated name
        warnings.simplefilter("ignore", DeprecationWarning)
        return optax.contrib.dpsgd(*args, **kwargs)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


# ---------------------------------------------------------------- (a) the one-name switch
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_dpsgd_one_name_switch_matches_optax_without_noise(momentum) -> None:
    ours = _train(dp_jax.dpsgd(0.1, CLIP, 0.0, 42, momentum=momentum))
    theirs = _train(_optax_dpsgd(0.1, CLIP, 0.0, 42, momentum=momentum))
    assert_close(ours, theirs, rtol=1e-5, atol=2e-6)


def test_clip_denominator_difference_is_below_1e6_in_float64() -> None:
    rows = np.random.default_rng(2).normal(size=(BATCH, 6)) * np.linspace(0.05, 0.6, BATCH)[:, None]
    grads = {"b": jnp.asarray(rows[:, 0]), "w": jnp.asarray(rows[:, 1:])}
    norms = np.linalg.norm(rows, axis=1)
    assert (norms > CLIP).any() and (norms < CLIP).any()
    ours = dp_jax.differentially_private_aggregate(CLIP, 0.0, 0)
    theirs = optax.contrib.differentially_private_aggregate(CLIP, 0.0, jax.random.key(0))
    both = jax.jit(lambda g: (ours.update(g, ours.init(None))[0],
                              theirs.update(g, theirs.init(None))[0]))
    got, want = both(grads)
    gap = np.linalg.norm(_flat(got) - _flat(want))
    assert 0.0 < gap < 1e-6
    factors = core_clipping.clip_factor(norms, CLIP)
    assert_close(_flat(got), (factors[:, None] * rows).sum(0) / BATCH, rtol=1e-12)


def _ks_pvalues(samples: np.ndarray, std: float) -> list[float]:
    return [stats.kstest(samples / (s * std), "norm").pvalue for s in (1.0, 0.9, 1.1)]


@pytest.mark.parametrize("maker", ["dp_jax", "optax"])
def test_noise_std_is_sigma_c_over_batch_size(maker: str) -> None:
    sigma, clip, size = 1.3, 0.7, 40_000
    grads = {"w": jnp.zeros((BATCH, size), jnp.float32)}
    if maker == "dp_jax":
        tx = dp_jax.differentially_private_aggregate(clip, sigma, jax.random.key(3))
    else:
        tx = optax.contrib.differentially_private_aggregate(clip, sigma, jax.random.key(3))
    out, _ = tx.update(grads, tx.init({"w": jnp.zeros(size, jnp.float32)}))
    same, smaller, larger = _ks_pvalues(np.asarray(out["w"], np.float64), sigma * clip / BATCH)
    assert same > 1e-3 and smaller < 1e-6 and larger < 1e-6


def test_int_seed_and_seed_keyword_equal_the_key() -> None:
    grads = {"w": jnp.ones((BATCH, 16), jnp.float32)}
    outs = []
    for tx in (dp_jax.differentially_private_aggregate(CLIP, 1.0, 5),
               dp_jax.differentially_private_aggregate(CLIP, 1.0, seed=5),
               dp_jax.differentially_private_aggregate(CLIP, 1.0, jax.random.key(5))):
        outs.append(np.asarray(tx.update(grads, tx.init(None))[0]["w"]))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_inject_hyperparams_with_an_injected_seed() -> None:
    params = {"w": jnp.zeros(6, jnp.float32)}
    grads = {"w": jnp.ones((BATCH, 6), jnp.float32)}
    tx = optax.inject_hyperparams(dp_jax.dpsgd)(learning_rate=0.1, l2_norm_clip=CLIP,
                                                noise_multiplier=0.0, seed=3)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert_close(updates["w"], np.full(6, -0.1 / np.sqrt(6)), rtol=1e-5)


def test_key_is_required_and_unique() -> None:
    with pytest.raises(TypeError, match="needs a secret PRNG key"):
        dp_jax.differentially_private_aggregate(CLIP, 1.0)
    with pytest.raises(ValueError, match="pass one of them"):
        dp_jax.differentially_private_aggregate(CLIP, 1.0, 1, seed=2)


# ---------------------------------------------------------------- (b) masks, expected batch size
def _padded(real: int, padded: int):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(padded, 6)).astype(np.float32) * 2.0
    g[real:] = np.nan  # padding rows hold garbage; the mask must zero them exactly
    mask = np.arange(padded) < real
    return {"w": jnp.asarray(g)}, jnp.asarray(mask), g[:real]


def test_mask_and_expected_batch_size_follow_the_reference() -> None:
    grads, mask, real = _padded(real=5, padded=8)
    tx = dp_jax.differentially_private_aggregate(CLIP, 0.0, 0, expected_batch_size=4)
    out, state = jax.jit(lambda g, s, m: tx.update(g, s, mask=m))(grads, tx.init(None), mask)
    factors = core_clipping.clip_factor(np.linalg.norm(real.astype(np.float64), axis=1), CLIP)
    assert_close(out["w"], (factors[:, None] * real).sum(0) / 4, rtol=1e-5, atol=1e-7)
    assert int(state.clip_state.num_examples) == 5
    optax_tx = optax.contrib.differentially_private_aggregate(CLIP, 0.0, jax.random.key(0))
    unpadded, _ = optax_tx.update({"w": jnp.asarray(real)}, optax_tx.init(None))
    assert_close(out["w"] * 4, unpadded["w"] * 5, rtol=1e-5, atol=1e-6)


def test_expected_batch_size_sets_the_noise_scale() -> None:
    sigma, size, expected = 1.0, 40_000, 3
    grads = {"w": jnp.zeros((BATCH, size), jnp.float32)}
    mask = jnp.arange(BATCH) < 2
    tx = dp_jax.differentially_private_aggregate(CLIP, sigma, 7, expected_batch_size=expected)
    out, _ = tx.update(grads, tx.init(None), mask=mask)
    same, smaller, larger = _ks_pvalues(np.asarray(out["w"], np.float64), sigma * CLIP / expected)
    assert same > 1e-3 and smaller < 1e-6 and larger < 1e-6


def test_mask_without_expected_batch_size_is_refused() -> None:
    grads, mask, _ = _padded(real=5, padded=8)
    tx = dp_jax.differentially_private_aggregate(CLIP, 1.0, 0)
    with pytest.raises(ValueError, match="expected_batch_size=int"):
        tx.update(grads, tx.init(None), mask=mask)


def test_nonfinite_example_is_dropped_and_counted() -> None:
    g = np.ones((BATCH, 6), np.float32)
    g[2, 0] = np.inf
    tx = dp_jax.differentially_private_aggregate(CLIP, 0.0, 0)
    out, state = tx.update({"w": jnp.asarray(g)}, tx.init(None))
    assert np.isfinite(np.asarray(out["w"])).all() and int(state.clip_state.num_nonfinite) == 1


# ---------------------------------------------------------------- (c) dpsgd = aggregate + sgd
@pytest.mark.parametrize(("momentum", "nesterov"), [(None, False), (0.9, False), (0.9, True)])
def test_dpsgd_equals_aggregate_then_sgd(momentum, nesterov) -> None:
    ours = _train(dp_jax.dpsgd(0.05, CLIP, 1.1, 9, momentum, nesterov))
    chained = _train(optax.chain(dp_jax.differentially_private_aggregate(CLIP, 1.1, 9),
                                 optax.sgd(0.05, momentum=momentum, nesterov=nesterov)))
    assert_close(ours, chained, rtol=0.0)


def test_dpsgd_passes_mask_and_expected_batch_size() -> None:
    grads, mask, _ = _padded(real=5, padded=8)
    params = {"w": jnp.zeros(6, jnp.float32)}
    tx = dp_jax.dpsgd(1.0, CLIP, 0.0, 0, expected_batch_size=4)
    agg = dp_jax.differentially_private_aggregate(CLIP, 0.0, 0, expected_batch_size=4)
    got, _ = tx.update(grads, tx.init(params), params, mask=mask)
    want, _ = agg.update(grads, agg.init(params), params, mask=mask)
    assert_close(got, jax.tree_util.tree_map(jnp.negative, want), rtol=0.0)
