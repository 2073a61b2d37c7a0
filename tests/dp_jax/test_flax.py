"""Tests of the flax helpers (per-example losses) and the BatchNorm validator / fixer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from dp_jax import (
    GroupNormLinen,
    UnsupportedModuleError,
    fix,
    is_valid,
    linen_loss,
    nnx_loss,
    nnx_merge,
    nnx_split_params,
    validate,
)
from tests.tolerance import assert_close


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(6)(x))
        return nn.Dense(3)(x)


class _LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


class _LinenFieldBN(nn.Module):
    norm: nn.Module

    def __call__(self, x):
        return self.norm(x)


class _NnxBN(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs)])
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = self.bn(self.lin(x))
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _np_group_norm(x, groups, scale, bias, eps):
    x = np.asarray(x, np.float64)
    b, c = x.shape
    g = x.reshape(b, groups, c // groups)
    mean = g.mean(axis=-1, keepdims=True)
    var = g.var(axis=-1, keepdims=True)
    out = ((g - mean) / np.sqrt(var + eps)).reshape(b, c)
    return out * np.asarray(scale) + np.asarray(bias)


def test_linen_loss_is_cross_entropy_of_one_example():
    module = _LinenMLP()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    params = module.init(jax.random.key(0), x)["params"]
    loss_fn = linen_loss(module)
    logits = np.asarray(module.apply({"params": params}, x))
    for i, y in enumerate([0, 2, 1, 1, 0]):
        want = -_np_log_softmax(logits[i])[y]
        assert_close(loss_fn(params, (x[i], y)), want, rtol=1e-5)
        assert_close(loss_fn(params, {"x": x[i], "y": y}), want, rtol=1e-5)


def test_linen_loss_mse_and_callable():
    module = _LinenMLP()
    x = np.ones((1, 4), np.float32)
    params = module.init(jax.random.key(1), x)["params"]
    out = np.asarray(module.apply({"params": params}, x))[0]
    target = np.array([0.5, -1.0, 2.0], np.float32)
    assert_close(linen_loss(module, "mse")(params, (x[0], target)),
                 np.mean((out - target) ** 2), rtol=1e-5)
    custom = linen_loss(module, lambda o, t: jnp.sum(o * t))
    assert_close(custom(params, (x[0], target)), float(np.sum(out * target)), rtol=1e-5)
    with pytest.raises(ValueError, match="loss must be one of"):
        linen_loss(module, "hinge")


def test_nnx_split_loss_and_merge_round_trip():
    model = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
    graphdef, params, rest = nnx_split_params(model)
    loss_fn = nnx_loss(graphdef, rest)
    x = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    logits = np.asarray(model(jnp.asarray(x)))
    for i, y in enumerate([2, 0, 1, 2]):
        assert_close(loss_fn(params, (x[i], y)), -_np_log_softmax(logits[i])[y], rtol=1e-5)
    rebuilt = nnx_merge(graphdef, params, rest)
    assert_close(np.asarray(rebuilt(jnp.asarray(x))), logits, rtol=1e-6)
    # the per-example loss is differentiable through merge
    grads = jax.grad(loss_fn)(params, (x[0], 1))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)


def test_validate_linen_traced_batchnorm_names_the_submodule():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(UnsupportedModuleError, match=r"BatchNorm_0.*GroupNorm or LayerNorm") as err:
        validate(_LinenBN(), x)
    assert err.value.paths == ["BatchNorm_0"]
    validate(_LinenBN(), x, train=False)  # frozen statistics are per-example: allowed
    assert is_valid(_LinenMLP(), x)


def test_validate_linen_field_batchnorm_without_inputs():
    assert not is_valid(_LinenFieldBN(norm=nn.BatchNorm(use_running_average=False)))
    assert is_valid(_LinenFieldBN(norm=nn.LayerNorm()))


def test_fix_linen_computes_group_norm_with_same_param_tree():
    module = _LinenBN()
    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    fixed = fix(module)
    assert isinstance(fixed, GroupNormLinen)
    validate(fixed, x)
    variables = fixed.init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # no batch_stats
    params = variables["params"]
    assert set(params["BatchNorm_0"]) == {"scale", "bias"}
    scale = np.linspace(0.5, 1.5, 8).astype(np.float32)
    bias = np.linspace(-1, 1, 8).astype(np.float32)
    params = {**params, "BatchNorm_0": {"scale": scale, "bias": bias}}
    # oracle: Dense -> numpy group norm (8 features -> 8 groups) -> relu -> Dense
    h = x @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(params["Dense_0"]["bias"])
    h = np.maximum(_np_group_norm(h, 8, scale, bias, 1e-5), 0.0)
    want = h @ np.asarray(params["Dense_1"]["kernel"]) + np.asarray(params["Dense_1"]["bias"])
    assert_close(np.asarray(fixed.apply({"params": params}, x)), want, rtol=1e-4, atol=1e-5)
    # rows are independent now: one example's output does not depend on the others
    one = np.asarray(fixed.apply({"params": params}, x[:1]))
    assert_close(one, want[:1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_groups"):
        fix(module, num_groups=0)


def test_validate_and_fix_nnx():
    model = _NnxBN(nnx.Rngs(0))
    with pytest.raises(UnsupportedModuleError, match="GroupNorm") as err:
        validate(model)
    assert sorted(err.value.paths) == ["bn", "layers/1"]
    fixed = fix(model)
    validate(fixed)
    assert isinstance(fixed.bn, nnx.GroupNorm) and isinstance(fixed.layers[1], nnx.GroupNorm)
    assert fixed.bn.num_groups == 8 and fixed.layers[1].num_groups == 6
    assert isinstance(model.bn, nnx.BatchNorm)  # the original is untouched
    x = np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32)
    out = np.asarray(fixed(jnp.asarray(x)))
    one = np.asarray(fixed(jnp.asarray(x[1:2])))
    assert_close(one, out[1:2], rtol=1e-4, atol=1e-5)  # per-example after the fix
    model.eval()  # BatchNorm with running averages is per-example
    validate(model)


def test_validate_rejects_non_flax_objects():
    with pytest.raises(TypeError, match="flax"):
        validate(object())


def _blobs(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    centers = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    x = (centers[y] + 0.3 * rng.normal(size=(n, 4))).astype(np.float32)
    return {"x": x, "y": y.astype(np.int32)}


def _train(loss_fn, params, data, epochs=3):
    import optax

    from dp_jax import PrivacyEngine

    engine = PrivacyEngine()
    private = engine.make_private(
        loss_fn=loss_fn, params=params, optimizer=optax.sgd(0.5), data=data,
        sample_rate=0.25, noise_multiplier=0.3, max_grad_norm=1.0, seed=0)
    full = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)))
    before = float(np.mean(full(params, data)))
    state = private.state
    for _ in range(epochs):
        for logical in private.batches:
            state, _ = private.train_logical_step(state, logical)
    after = float(np.mean(full(state.params, data)))
    assert len(engine.accountant) == 4 * epochs
    return before, after, state


def test_linen_model_trains_privately():
    module = _LinenMLP()
    data = _blobs()
    params = module.init(jax.random.key(0), data["x"][:1])["params"]
    before, after, _ = _train(linen_loss(module), params, data)
    assert after < 0.7 * before


def test_nnx_model_trains_privately():
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.tanh,
                           nnx.Linear(6, 3, rngs=nnx.Rngs(1)))
    graphdef, params, rest = nnx_split_params(model)
    data = _blobs()
    before, after, state = _train(nnx_loss(graphdef, rest), params, data)
    assert after < 0.7 * before
    trained = nnx_merge(graphdef, state.params, rest)
    assert isinstance(trained, nnx.Sequential)
