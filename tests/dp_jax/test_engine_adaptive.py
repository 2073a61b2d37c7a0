"""Adaptive clipping over virtual steps: a logical batch in k chunks is one release.

Oracles: the numpy reference math of :mod:`dpcore.clipping` (clip-and-sum, the
bound update) on the whole logical batch, and the same engine run with the
logical batches kept in one chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import PrivacyEngine, clipped_grad
from dp_jax._transforms import DPAccumulateAdaptiveState, dp_accumulate_sums_adaptive
from dpcore import clipping as core
from tests.tolerance import assert_close

KEY = jax.random.key(3)
OPTIONS = dict(unclipped_num_std=2.0, clipbound_learning_rate=0.3, target_unclipped_quantile=0.6)


def _loss(params, example):
    x, y = example
    return jnp.sum((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def _problem(batch=9):
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k[0], (3, 4), jnp.float64),
              "w2": jax.random.normal(k[1], (4, 2), jnp.float64)}
    x = jax.random.normal(k[2], (batch, 3), jnp.float64)
    y = jax.random.normal(k[3], (batch, 2), jnp.float64)
    return params, (x, y)


def _release_in_chunks(tx, params, batch, cuts, **noise):
    """Feed the batch to ``tx`` as chunks ``batch[a:b]``, every one clipped with state's bound."""
    grad_fn = jax.jit(clipped_grad(_loss, 1.0))
    update = jax.jit(tx.update)
    state = tx.init(params)
    bounds = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        chunk = jax.tree_util.tree_map(lambda v, a=a, b=b: v[a:b], batch)
        bounds.append(float(state.max_grad_norm))
        clipped, aux = grad_fn(params, chunk, max_grad_norm=state.max_grad_norm)
        out, state = update(clipped, state, clip_aux=aux, apply_update=i == len(cuts) - 2,
                            **noise)
    return out, state, bounds


def test_k_chunks_release_like_one_chunk_and_match_dpcore():
    params, batch = _problem()
    sigma, c0, m = 0.9, 10.0, 9  # norms 5.3 .. 16.1: some clipped, some not
    tx = dp_accumulate_sums_adaptive(sigma, c0, m, None, **OPTIONS)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(1)
    noise = dict(noise=treedef.unflatten([rng.normal(size=x.shape) for x in leaves]),
                 count_noise=jnp.asarray(0.37))
    one, state_one, _ = _release_in_chunks(tx, params, batch, [0, 9], **noise)
    three, state_k, bounds = _release_in_chunks(tx, params, batch, [0, 2, 6, 9], **noise)
    assert isinstance(state_k, DPAccumulateAdaptiveState)
    assert bounds == [c0] * 3  # every chunk of the logical batch clipped with the same bound
    assert_close(three, one, rtol=1e-12)
    assert int(state_k.last.num_unclipped) == int(state_one.last.num_unclipped)
    assert int(state_k.last.num_examples) == 9 and int(state_k.num_chunks) == 0
    assert_close(state_k.max_grad_norm, state_one.max_grad_norm, rtol=1e-12)
    # independent oracle: dpcore's reference math on the whole logical batch
    g = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, batch)
    g_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(g)]
    count = core.count_unclipped(core.per_example_norms(g_leaves), c0)
    assert 0 < count < 9 and int(state_k.last.num_unclipped) == count
    want_c = core.adaptive_clip_update(c0, count, 0.37, m, 0.6, 0.3, 1e-8, 1e8, batch_size=9)
    assert_close(state_k.max_grad_norm, want_c, rtol=1e-14)
    want = [(s + n) / m for s, n in  # host noise is on the sum scale, added as given
            zip(core.clip_and_sum(g_leaves, c0), jax.tree_util.tree_leaves(noise["noise"]))]
    assert_close(jax.tree_util.tree_leaves(three), want, rtol=1e-12)


def test_key_noise_is_drawn_once_per_logical_batch():
    """With a key, k chunks draw exactly the noise one chunk draws (the key moves at release)."""
    params, batch = _problem()
    tx = dp_accumulate_sums_adaptive(1.0, 0.8, 9, KEY, **OPTIONS)
    one, state_one, _ = _release_in_chunks(tx, params, batch, [0, 9])
    three, state_k, _ = _release_in_chunks(tx, params, batch, [0, 4, 5, 9])
    assert_close(three, one, rtol=1e-12)
    assert_close(state_k.max_grad_norm, state_one.max_grad_norm, rtol=1e-12)
    assert float(state_k.max_grad_norm) != 0.8


def _adaptive_run(cap):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=120)}

    def loss(params, example):
        return (example["x"] @ params["w"] + params["b"] - example["y"]) ** 2

    engine = PrivacyEngine()
    private = engine.make_private(
        loss_fn=loss, params={"w": jnp.zeros(3, jnp.float64), "b": jnp.zeros((), jnp.float64)},
        optimizer=optax.sgd(0.1), data=data, sample_rate=0.1, noise_multiplier=0.7,
        max_grad_norm=1.0, clipping="adaptive", max_physical_batch_size=cap, seed=0,
        unclipped_num_std=2.0, clipbound_learning_rate=0.5,
    )
    state, chunks = private.state, 0
    bounds = []
    for step, logical in enumerate(private.batches):
        chunks = max(chunks, len(logical))
        state, _ = private.train_logical_step(state, logical)
        bounds.append(float(state.opt_state.dp_state.max_grad_norm))
        if step == 5:
            break
    return engine, state, chunks, bounds


def test_engine_accepts_adaptive_with_virtual_steps():
    engine_k, state_k, chunks_k, bounds_k = _adaptive_run(cap=4)
    engine_1, state_1, chunks_1, bounds_1 = _adaptive_run(cap=None)
    assert chunks_k >= 3 and chunks_1 == 1
    assert_close(state_k.params, state_1.params, rtol=1e-12)
    assert_close(bounds_k, bounds_1, rtol=1e-12)
    assert len(set(bounds_k)) > 1  # the bound moves once per logical batch
    assert engine_k.accountant.history == engine_1.accountant.history == [(0.7, 0.1, 6)]
