"""Secure mode of dp_jax.PrivacyEngine: OS-entropy sampling and hardened host-drawn noise.

Oracles: :class:`dpcore.noise.NoiseSource` in secure mode replayed on the same
(patched) entropy, :func:`dpcore.clipping.adaptive_clip_update`, and KS tests
that accept the noise scale ``sigma * C / m`` and reject 0.9x and 1.1x of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dp_jax import PrivacyEngine
from dpcore import clipping as core
from dpcore import noise as core_noise
from tests.tolerance import assert_close

ALPHA = 1e-3


def _data(n=60):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 2)), "y": rng.normal(size=n)}


def _null_loss(params, example):
    """A loss whose gradient is exactly zero: the update is then pure noise."""
    return 0.0 * (jnp.sum(params["w"]) + jnp.sum(params["v"])) * example["x"][0]


def _params(size=8):
    return {"w": jnp.zeros((size,), jnp.float64), "v": jnp.zeros((3, 2), jnp.float64)}


def _secure(engine=None, **overrides):
    engine = engine or PrivacyEngine(secure_mode=True)
    kwargs = dict(loss_fn=_null_loss, params=_params(), optimizer=optax.sgd(1.0), data=_data(),
                  sample_rate=0.1, noise_multiplier=1.3, max_grad_norm=0.5)
    kwargs.update(overrides)
    return engine, engine.make_private(**kwargs)


def _key_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def _patch_entropy(monkeypatch, seed):
    """Make dpcore's OS-entropy words a seeded stream (noise only; sampling untouched)."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(core_noise, "_os_words",
                        lambda n: rng.integers(0, 2**64, size=n, dtype=np.uint64))


def _step_update(private, **kwargs):
    logical = next(iter(private.batches))
    state, _ = private.train_logical_step(private.state, logical)
    return jax.tree_util.tree_map(lambda a, b: np.asarray(b) - np.asarray(a),
                                  private.state.params, state.params), state


def test_secure_state_has_no_key_and_refuses_seeds():
    engine, private = _secure()
    assert private.batches.sampler.secure_mode
    assert _key_leaves(private.state) == []
    for bad in ({"seed": 0}, {"key": jax.random.key(0)}):
        with pytest.raises(ValueError, match="prohibited in secure mode"):
            _secure(**bad)
    with pytest.raises(ValueError, match="noise=None"):  # the transformation cannot draw itself
        private.optimizer.update(private.state.params, private.state.opt_state,
                                 private.state.params, apply_update=True,
                                 clip_aux=_aux_like(private))


def _aux_like(private):
    from dp_jax import clipped_grad

    chunk = next(iter(private.batches))[0]
    return clipped_grad(_null_loss, 0.5)(private.state.params, chunk.batch, chunk.mask)[1]


def test_noise_comes_from_dpcore_secure_noise_source(monkeypatch):
    sigma, c, m = 1.3, 0.5, 6
    updates = []
    for seed in (11, 12):
        _patch_entropy(monkeypatch, seed)
        _, private = _secure(loss_reduction="mean")
        update, _ = _step_update(private)
        _patch_entropy(monkeypatch, seed)  # replay the same entropy through NoiseSource
        source = core_noise.NoiseSource(secure_mode=True)
        leaves, treedef = jax.tree_util.tree_flatten(private.state.params)
        want = treedef.unflatten([-source.normal(x.shape, sigma * c) / m for x in leaves])
        assert_close(update, want, rtol=1e-15)
        updates.append(update)
    assert not np.allclose(updates[0]["w"], updates[1]["w"])  # other entropy, other noise


def test_secure_adaptive_draws_count_noise_from_the_source(monkeypatch):
    sigma, c0, m, std_b = 1.0, 0.5, 6, 2.0
    _patch_entropy(monkeypatch, 5)
    _, private = _secure(clipping="adaptive", noise_multiplier=sigma, max_grad_norm=c0,
                         unclipped_num_std=std_b, clipbound_learning_rate=0.4)
    logical = next(iter(private.batches))
    size = int(sum(ch.mask.sum() for ch in logical))
    state, _ = private.train_logical_step(private.state, logical)
    _patch_entropy(monkeypatch, 5)
    source = core_noise.NoiseSource(secure_mode=True)
    z_grad = core.adaptive_noise_multipliers(sigma, std_b, m)
    leaves, treedef = jax.tree_util.tree_flatten(private.state.params)
    want = treedef.unflatten([-source.normal(x.shape, z_grad * c0) / m for x in leaves])
    count_noise = float(source.normal((), std_b))
    assert_close(state.params, want, rtol=1e-15)
    # zero gradients: every example is unclipped
    want_c = core.adaptive_clip_update(c0, size, count_noise, m, 0.5, 0.4, 1e-8, 1e8,
                                       batch_size=size)
    assert_close(state.opt_state.dp_state.max_grad_norm, want_c, rtol=1e-14)


def test_secure_noise_scale_ks():
    sigma, c, m = 1.3, 0.5, 6
    _, private = _secure(params=_params(size=30000))
    update, _ = _step_update(private)
    z = -np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(update)]) * m
    assert stats.kstest(z / (sigma * c), "norm").pvalue > ALPHA
    assert stats.kstest(z / (0.9 * sigma * c), "norm").pvalue < ALPHA
    assert stats.kstest(z / (1.1 * sigma * c), "norm").pvalue < ALPHA


def test_two_secure_engines_differ_and_compile_once_per_bucket():
    calls = {"n": 0}

    def counting(params, example):
        calls["n"] += 1
        return _null_loss(params, example)

    _, first = _secure(loss_fn=counting, max_physical_batch_size=4)
    state, shapes, multi = first.state, set(), 0
    for k, logical in enumerate(first.batches):
        shapes.update(ch.mask.shape[0] for ch in logical)
        multi += len(logical) > 1
        state, _ = first.train_logical_step(state, logical)
        if k == 5:
            break
    assert multi > 0 and calls["n"] == len(shapes)  # zero-noise chunks reuse the compile
    _, second = _secure()
    other, _ = _step_update(second)
    mine, _ = _step_update(first)
    assert not np.allclose(mine["w"], other["w"])


def test_secure_checkpoint_round_trip(tmp_path):
    engine, private = _secure()
    it = iter(private.batches)
    state = private.state
    for _ in range(2):
        state, _ = private.train_logical_step(state, next(it))
    path = tmp_path / "secure.npz"
    engine.save_checkpoint(path, state)
    engine_b, private_b = _secure()
    resumed, _ = engine_b.load_checkpoint(path, private_b.state)
    assert_close(resumed.params, state.params, rtol=0.0)
    assert int(resumed.step) == 2 and engine_b.accountant.history == [(1.3, 0.1, 2)]
    resumed, _ = private_b.train_logical_step(resumed, next(iter(private_b.batches)))
    assert engine_b.accountant.history == [(1.3, 0.1, 3)] and int(resumed.step) == 3


def test_secure_noise_of_a_bfloat16_model_is_rounded_once(monkeypatch):
    # The precision rule: noise stays float32 until the update is rounded to the
    # parameter dtype. Noise rounded to bfloat16 on the host, then divided by m = 6
    # and rounded again, differs from this in the last bit of some coordinates.
    # sigma and C are exact in bfloat16 (the state keeps them in the parameters' dtype).
    sigma, c, m = 1.25, 0.5, 6
    params = {"w": jnp.zeros((2000,), jnp.bfloat16), "v": jnp.zeros((3, 2), jnp.bfloat16)}
    _patch_entropy(monkeypatch, 21)
    _, private = _secure(params=params, loss_reduction="mean", noise_multiplier=sigma,
                         max_grad_norm=c)
    update, _ = _step_update(private)
    _patch_entropy(monkeypatch, 21)
    source = core_noise.NoiseSource(secure_mode=True)
    leaves, treedef = jax.tree_util.tree_flatten(private.state.params)
    draws = [source.normal(x.shape, sigma * c) for x in leaves]
    once = [-(np.float32(z) / np.float32(m)).astype(jnp.bfloat16) for z in draws]
    twice = [-(np.float32(z.astype(jnp.bfloat16)) / np.float32(m)).astype(jnp.bfloat16)
             for z in draws]
    got = jax.tree_util.tree_leaves(update)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    assert_close(got, once, rtol=0.0)
    assert any(np.any(a != b) for a, b in zip(once, twice))  # the test can tell them apart
