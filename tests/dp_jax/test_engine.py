"""Tests of dp_jax.PrivacyEngine: jit shapes, vanilla equivalence, accounting, checkpoints."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dp_jax import PrivacyEngine, TrainState, current_hyperparams
from dpcore import sampling as core_sampling
from dpcore.accounting import create_accountant
from tests.tolerance import assert_close


def _data(n=120, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ np.linspace(-1.0, 1.0, d) + 0.1 * rng.normal(size=n)
    return {"x": x, "y": y}


def _loss(params, example):
    pred = jnp.dot(example["x"], params["w"]) + params["b"]
    return (pred - example["y"]) ** 2


def _params(d=3):
    return {"w": jnp.zeros((d,), jnp.float64), "b": jnp.zeros((), jnp.float64)}


def _private(engine=None, **overrides):
    engine = engine or PrivacyEngine()
    kwargs = dict(loss_fn=_loss, params=_params(), optimizer=optax.sgd(0.1), data=_data(),
                  sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    kwargs.update(overrides)
    return engine, engine.make_private(**kwargs)


def test_poisson_epoch_traces_step_at_most_once_per_bucket():
    calls = {"n": 0}

    def counting_loss(params, example):
        calls["n"] += 1
        return _loss(params, example)

    n, q = 400, 0.005
    engine, private = _private(loss_fn=counting_loss, data=_data(n), sample_rate=q)
    assert len(private.batches) == 200
    state = private.state
    chunk = next(iter(private.batches))[0]
    private.step(state, chunk.batch, chunk.mask, True)
    per_trace = calls["n"]
    assert per_trace > 0
    private.batches.load_state_dict(
        core_sampling_state(n, q, private.batches.buckets)
    )
    shapes = set()
    for logical in private.batches:
        shapes.update(c.mask.shape[0] for c in logical)
        state, _ = private.train_logical_step(state, logical)
    assert calls["n"] % per_trace == 0
    traces = calls["n"] // per_trace
    assert traces <= len(private.batches.buckets)
    assert traces == len(shapes)
    assert len(engine.accountant) == 200


def core_sampling_state(n, q, buckets):
    """A fresh seed-0 sampler position (the test consumed one batch to warm the jit)."""
    return {"buckets": list(buckets),
            "sampler": core_sampling.PoissonSampler(n, q, seed=0).state_dict()}


def _vanilla_run(data, batches_indices, m, optimizer, steps):
    """Oracle: per-example jax.grad in a Python loop, summed, divided by m, then optax."""
    params = _params()
    opt_state = optimizer.init(params)
    grad_one = jax.jit(jax.grad(_loss))
    for indices in batches_indices[:steps]:
        total = jax.tree_util.tree_map(np.zeros_like, params)
        for i in indices:
            g = grad_one(params, {"x": data["x"][i], "y": data["y"][i]})
            total = jax.tree_util.tree_map(lambda a, b: a + np.asarray(b), total, g)
        grads = jax.tree_util.tree_map(lambda t: jnp.asarray(t / m), total)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_zero_noise_huge_clip_equals_vanilla_optax(base):
    def make_opt():
        return optax.sgd(0.05) if base == "sgd" else optax.adam(0.05)

    data = _data()
    n, q = 120, 0.1
    engine, private = _private(optimizer=make_opt(), noise_multiplier=0.0, max_grad_norm=1e8,
                               max_physical_batch_size=5)  # forces virtual steps
    state = private.state
    multi_chunk = 0
    for logical in private.batches:
        multi_chunk += len(logical) > 1
        state, _ = private.train_logical_step(state, logical)
    assert multi_chunk > 0
    assert private.expected_batch_size == int(n * q)
    batches = list(core_sampling.PoissonSampler(n, q, seed=0))
    want = _vanilla_run(data, batches, int(n * q), make_opt(), len(batches))
    assert_close(state.params, want, rtol=1e-10, atol=1e-12)
    assert int(state.step) == len(batches)


def test_epsilon_matches_dpcore_accountant_with_same_history():
    engine, private = _private(noise_multiplier=1.3, sample_rate=0.05, data=_data(200))
    state = private.state
    for k, logical in enumerate(private.batches):
        state, _ = private.train_logical_step(state, logical)
        if k == 6:
            break
    oracle = create_accountant("rdp")
    oracle.step(noise_multiplier=1.3, sample_rate=0.05, num_steps=7)
    assert engine.accountant.history == [(1.3, 0.05, 7)]
    assert_close(engine.get_epsilon(1e-5), oracle.get_epsilon(1e-5), rtol=1e-12)


def test_injected_noise_multiplier_is_what_the_accountant_records():
    engine, private = _private(noise_multiplier=1.0)
    state = private.state
    it = iter(private.batches)
    state, _ = private.train_logical_step(state, next(it))
    # a noise schedule: change the injected hyperparameter between logical steps
    dp_state = state.opt_state.dp_state
    hyper = dict(dp_state.hyperparams, noise_multiplier=jnp.asarray(2.0, jnp.float64))
    state = state._replace(opt_state=state.opt_state._replace(
        dp_state=dp_state._replace(hyperparams=hyper)))
    state, _ = private.train_logical_step(state, next(it))
    assert float(current_hyperparams(state.opt_state)["noise_multiplier"]) == 2.0
    assert engine.accountant.history == [(1.0, 0.1, 1), (2.0, 0.1, 1)]


def test_empty_batch_steps_accountant_and_adds_noise():
    engine, private = _private(sample_rate=0.001, steps=30, data=_data(100),
                               loss_reduction="sum")
    state = private.state
    empties = 0
    for logical in private.batches:
        before = state
        state, _ = private.train_logical_step(state, logical)
        if not any(c.mask.any() for c in logical):
            empties += 1
            assert not np.array_equal(np.asarray(before.params["w"]), np.asarray(state.params["w"]))
    assert empties > 0
    assert len(engine.accountant) == 30 and int(state.step) == 30


def test_make_private_with_epsilon_meets_target():
    engine = PrivacyEngine()
    private = engine.make_private_with_epsilon(
        loss_fn=_loss, params=_params(), optimizer=optax.sgd(0.1), data=_data(),
        sample_rate=0.1, target_epsilon=2.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0,
        seed=1,
    )
    state = private.state
    for _ in range(2):
        for logical in private.batches:
            state, _ = private.train_logical_step(state, logical)
    assert len(engine.accountant) == 20
    eps = engine.get_epsilon(1e-5)
    assert eps <= 2.0 and eps > 2.0 - 0.05


def _run(private, engine, state, count):
    it = iter(private.batches)
    for _ in range(count):
        state, _ = private.train_logical_step(state, next(it))
    return state


def test_checkpoint_resume_is_bit_identical():
    def fresh():
        return _private(optimizer=optax.adam(0.05), max_physical_batch_size=8)

    engine_a, private_a = fresh()
    straight = private_a.state
    it = iter(private_a.batches)
    for _ in range(10):
        straight, _ = private_a.train_logical_step(straight, next(it))

    engine_b, private_b = fresh()
    half = _run(private_b, engine_b, private_b.state, 5)
    buffer = io.BytesIO()
    engine_b.save_checkpoint(buffer, half, checkpoint_dict={"note": "half"})
    buffer.seek(0)

    engine_c, private_c = fresh()
    resumed, extra = engine_c.load_checkpoint(buffer, private_c.state)
    assert extra == {"note": "half"}
    assert isinstance(resumed, TrainState) and int(resumed.step) == 5
    resumed = _run(private_c, engine_c, resumed, 5)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert engine_c.accountant.history == engine_a.accountant.history == [(1.0, 0.1, 10)]


def test_checkpoint_rejects_other_structure(tmp_path):
    engine, private = _private()
    path = tmp_path / "ckpt.npz"
    engine.save_checkpoint(path, private.state)
    other_engine, other = _private(optimizer=optax.adam(0.1))
    with pytest.raises(ValueError, match="same model and optimizer"):
        other_engine.load_checkpoint(path, other.state)
    assert len(other_engine.accountant) == 0


def test_per_layer_and_adaptive_clipping_train():
    engine, private = _private(clipping="per_layer", max_grad_norm={"w": 1.0, "b": 0.5})
    state = _run(private, engine, private.state, 3)
    assert len(engine.accountant) == 3 and np.all(np.isfinite(np.asarray(state.params["w"])))
    engine, private = _private(
        clipping="adaptive", max_grad_norm=1.0, noise_multiplier=0.5,
        target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0,
        min_clipbound=0.01, unclipped_num_std=2.0,
    )
    state = _run(private, engine, private.state, 5)
    bound = float(state.opt_state.dp_state.max_grad_norm)
    assert bound != 1.0 and 0.01 <= bound <= 10.0
    assert engine.accountant.history == [(0.5, 0.1, 5)]


def test_secure_mode_runs_and_refuses_seeds():
    engine = PrivacyEngine(secure_mode=True)
    _, private = _private(engine, seed=None)
    assert private.batches.sampler.secure_mode
    _run(private, engine, private.state, 2)
    assert len(engine.accountant) == 2
    with pytest.raises(ValueError, match="prohibited in secure mode"):
        _private(PrivacyEngine(secure_mode=True), seed=3)
    with pytest.raises(ValueError, match="prohibited in secure mode"):
        _private(PrivacyEngine(secure_mode=True), seed=None, key=jax.random.key(0))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"loss_reduction": "avg"}, ValueError, "loss_reduction"),
        ({"clipping": "ghost"}, ValueError, "clipping"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"batch_size": 12}, ValueError, "exactly one of sample_rate and batch_size"),
        ({"optimizer": "sgd"}, TypeError, "optax GradientTransformation"),
        ({"clipping": "per_layer", "max_grad_norm": [1.0]}, ValueError, "per_layer"),
        ({"target_unclipped_quantile": 0.5}, TypeError, "unexpected keyword"),
        ({"grad_sample_mode": "hooks"}, ValueError, "grad_sample_mode"),
        ({"grad_sample_mode": "ghost", "microbatch_size": 4}, ValueError, "microbatch_size"),
        ({"poisson_sampling": "yes"}, TypeError, "poisson_sampling"),
    ],
)
def test_make_private_guards(overrides, error, match):
    engine = PrivacyEngine()
    with pytest.raises(error, match=match):
        _private(engine, **overrides)
    assert engine.data is None and len(engine.accountant) == 0


def test_both_noise_multiplier_and_target_epsilon_refused():
    with pytest.raises(ValueError, match="both noise_multiplier"):
        PrivacyEngine().make_private_with_epsilon(
            loss_fn=_loss, params=_params(), optimizer=optax.sgd(0.1), data=_data(),
            sample_rate=0.1, target_epsilon=1.0, target_delta=1e-5, epochs=1,
            max_grad_norm=1.0, noise_multiplier=1.0,
        )


def test_other_dataset_after_spending_budget_is_refused():
    engine, private = _private()
    _run(private, engine, private.state, 1)
    with pytest.raises(ValueError, match="already spent privacy budget"):
        _private(engine, data=_data(seed=5))


# --------------------------------------------------------------------------- step structure


def test_loss_metric_is_mean_masked_loss_and_forward_traced_once():
    calls = {"n": 0}

    def counting_loss(params, example):
        calls["n"] += 1
        return _loss(params, example)

    params = {"w": jnp.asarray([0.3, -0.2, 0.1]), "b": jnp.asarray(0.05)}
    _, private = _private(loss_fn=counting_loss, params=params, noise_multiplier=0.0)
    chunk = next(iter(private.batches))[0]
    assert not chunk.mask.all()  # padded rows are in the chunk
    _, metrics = private.step(private.state, chunk.batch, chunk.mask, True)
    assert calls["n"] == 1  # one trace of the forward (value and grad together)
    rows = np.flatnonzero(chunk.mask)
    x, y = chunk.batch["x"][rows], chunk.batch["y"][rows]
    want = np.mean((x @ np.asarray(params["w"]) + float(params["b"]) - y) ** 2)
    assert_close(metrics["loss"], want, rtol=1e-12)
    assert bool(metrics["applied"])


def _stand_in_ghost(record):
    """A module object whose ghost_clipped_grad records its arguments and clips by vmap."""
    import types

    from dp_jax import clipped_grad

    def ghost_clipped_grad(loss_fn, max_grad_norm, *, clipping="flat"):
        record.append((max_grad_norm, clipping))
        return clipped_grad(loss_fn, max_grad_norm, clipping=clipping)

    return types.SimpleNamespace(ghost_clipped_grad=ghost_clipped_grad)


def test_ghost_mode_uses_ghost_clipped_grad(monkeypatch):
    import dp_jax._engine

    record = []
    stand_in = _stand_in_ghost(record)
    monkeypatch.setattr(dp_jax._engine, "_ghost", stand_in)
    engine, ghost = _private(grad_sample_mode="ghost", clipping="adaptive",
                             unclipped_num_std=2.0, max_grad_norm=0.7)
    assert record == [(0.7, "flat")]  # adaptive clipping is flat clipping with a moving bound
    _run(ghost, engine, ghost.state, 1)
    assert len(engine.accountant) == 1


def test_ghost_and_vmap_engines_agree_on_a_linen_mlp():
    flax_linen = pytest.importorskip("flax.linen")

    class MLP(flax_linen.Module):
        @flax_linen.compact
        def __call__(self, x):
            h = jnp.tanh(flax_linen.Dense(4, param_dtype=jnp.float64)(x))
            return flax_linen.Dense(1, param_dtype=jnp.float64)(h)[..., 0]

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]

    def loss(p, example):
        return (model.apply({"params": p}, example["x"][None])[0] - example["y"]) ** 2

    states = {}
    for mode in ("vmap", "ghost"):
        engine, private = _private(loss_fn=loss, params=params, grad_sample_mode=mode,
                                   max_physical_batch_size=6, max_grad_norm=0.3)
        states[mode] = _run(private, engine, private.state, 3)
    assert_close(states["ghost"].params, states["vmap"].params, rtol=1e-10)
