"""bfloat16 models: norms, clip factors, clipped sums, noise and accumulators stay float32.

docs/design.md, precision: whatever the model's dtype, per-example norms, clip factors,
the clipped sum, the noise and the virtual-step accumulator are float32 or wider; the
update is rounded to the parameter dtype once, at the end. Oracles: the same zoo model
computing in float32 at the same (bfloat16-representable) parameter values, a KS test
of the released noise (that must also reject 0.9x and 1.1x the scale), and exact
float32 sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import dp_jax
from dp_jax import transforms
from tests.dp_jax.zoo_models import BATCH, BUILDERS, linen_cnn

BF16, F32 = jnp.bfloat16, jnp.float32
LR = 1e3  # the update dominates the parameters, so (old - new) / LR keeps its precision


def _zero_aux() -> dp_jax.ClipAux:
    zero = jnp.zeros((), jnp.int32)
    return dp_jax.ClipAux(jnp.zeros((1,), F32), zero, zero, zero)


def _as(tree, dtype):
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x).astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
        else x, tree)


def _engine_update(case, params, batch, mode, bound):
    """The update of one engine step with noise 0, leaf by leaf in float64; its opt_state."""
    private = dp_jax.PrivacyEngine().make_private(
        loss_fn=case.loss_fn, params=params, optimizer=optax.sgd(LR), data=batch,
        noise_multiplier=0.0, max_grad_norm=bound, sample_rate=0.5, loss_reduction="sum",
        grad_sample_mode=mode, seed=0)
    state, _ = private.step(private.state, batch, np.ones(BATCH, bool), True)
    assert [x.dtype for x in jax.tree_util.tree_leaves(state.params)] == [
        x.dtype for x in jax.tree_util.tree_leaves(params)]
    update = [(np.asarray(old, np.float64) - np.asarray(new, np.float64)) / LR
              for old, new in zip(jax.tree_util.tree_leaves(params),
                                  jax.tree_util.tree_leaves(state.params))]
    return update, state.opt_state


def _rel(got, want) -> float:
    diff = sum(np.sum((g - w) ** 2) for g, w in zip(got, want))
    return float(np.sqrt(diff / sum(np.sum(w**2) for w in want)))


def _cases(name):
    """The bfloat16 model and its float32 twin at the same parameter values and inputs."""
    if name == "cnn_f32_params":
        low, high = linen_cnn(BF16, param_dtype=F32), linen_cnn(F32)
        params = _as(_as(low.params, BF16), F32)  # bfloat16-representable float32 values
        return low, params, high, params
    low, high = BUILDERS[name](BF16), BUILDERS[name](F32)
    return low, low.params, high, _as(low.params, F32)


def _definition(per_example, bound):
    """The clipped sum by the definition, float64, from per-example gradients."""
    leaves = [np.asarray(g, np.float64).reshape(BATCH, -1) for g in per_example]
    norms = np.sqrt(sum(np.sum(g**2, axis=1) for g in leaves))
    factors = np.minimum(1.0, bound / (norms + 1e-6))
    return [np.tensordot(factors, g, axes=1) for g in leaves], norms


@pytest.mark.parametrize("name,mode", [
    pytest.param("cnn_f32_params", "ghost", marks=pytest.mark.slow),
    pytest.param("cnn", "ghost", marks=pytest.mark.slow),
    pytest.param("tied", "vmap", marks=pytest.mark.slow),
    pytest.param("gpt_full", "ghost", marks=pytest.mark.slow)])
def test_bfloat16_step_equals_float32_step_to_bfloat16_rounding(name, mode):
    low, low_params, high, high_params = _cases(name)
    per_example = jax.tree_util.tree_leaves(jax.jit(dp_jax.per_example_grads, static_argnums=0)(
        high.loss_fn, high_params, _as(low.batch, F32)))
    _, norms = _definition(per_example, 1.0)
    bound = float(np.median(norms))  # half of the examples are clipped
    want, _ = _definition(per_example, bound)  # the float32 model's clipped sum
    got, opt_state = _engine_update(low, low_params, low.batch, mode, bound)
    got = [g.reshape(-1) for g in got]
    accumulators = [x for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                    if "grad_sum" in jax.tree_util.keystr(p)]
    assert accumulators and all(x.dtype == F32 for x in accumulators)
    tol = 3e-2  # bfloat16 forward and backward passes
    assert _rel(got, want) <= tol
    # The tolerance tells clipping apart: the unclipped sum, or a bound 10% off, fails it.
    for wrong in (1e9, 1.1 * bound, 0.9 * bound):
        assert _rel(_definition(per_example, wrong)[0], want) > 1.5 * tol


def test_noise_is_drawn_at_the_exact_scale_for_bfloat16_parameters():
    params = {"w": jnp.zeros((2**16,), BF16), "b": jnp.zeros((3,), BF16)}
    sigma, c, m = 1.3, 0.7, 4
    tx = transforms.dp_accumulate_clipped_sums(c, sigma, m, jax.random.key(3))
    state = tx.init(params)
    assert all(x.dtype == F32 for x in jax.tree_util.tree_leaves(state.grad_sum))
    clipped = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, F32), params)
    out, _ = jax.jit(lambda s: tx.update(clipped, s, params, clip_aux=_zero_aux(),
                                         apply_update=True))(state)
    assert all(x.dtype == BF16 for x in jax.tree_util.tree_leaves(out))
    samples = np.asarray(out["w"], np.float64) * m
    std = sigma * c
    assert stats.kstest(samples, stats.norm(scale=std).cdf).pvalue > 1e-3
    for wrong in (0.9, 1.1):
        assert stats.kstest(samples, stats.norm(scale=wrong * std).cdf).pvalue < 1e-6


def test_accumulator_keeps_float32_precision_over_many_chunks():
    params = {"w": jnp.zeros((4,), BF16)}
    tx = transforms.dp_accumulate_clipped_sums(1.0, 0.0, 1, jax.random.key(0),
                                               loss_reduction="sum")
    chunk = {"w": jnp.full((4,), 1.0 + 2.0**-7, F32)}  # bfloat16 sums would stall at 256
    step = jax.jit(lambda s, apply: tx.update(chunk, s, params, clip_aux=_zero_aux(),
                                              apply_update=apply))
    state = tx.init(params)
    for _ in range(299):
        _, state = step(state, False)
    out, state = step(state, True)
    want = 300 * (1.0 + 2.0**-7)
    assert out["w"].dtype == BF16
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), want, rtol=2**-8)
    assert int(state.num_chunks) == 0


def test_per_example_transforms_round_once_to_the_parameter_dtype():
    grads = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), BF16)}
    params = {"w": jnp.zeros((5,), BF16)}
    tx = transforms.dp_aggregate(0.0, 1.0, 1, jax.random.key(0), loss_reduction="sum")
    out, _ = tx.update(grads, tx.init(params), params)
    clipped, _ = dp_jax.clip_per_example(grads, 1.0)
    assert clipped["w"].dtype == F32 and out["w"].dtype == BF16
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(clipped["w"].astype(BF16)))


def test_injected_noise_multiplier_and_bound_are_not_rounded_to_bfloat16():
    """optax.inject_hyperparams would store them in the parameters' dtype: 1.3 would become
    1.296875 in bfloat16, less noise than the accountant records."""
    from dp_jax._optimizer import build_optimizer

    params = {"w": jnp.zeros((3,), BF16)}
    parts = build_optimizer(optimizer=optax.sgd(0.1), params=params, clipping="flat", max_grad_norm=0.7,
                            noise_multiplier=1.3, expected_batch_size=4, loss_reduction="mean",
                            key=jax.random.key(0), adaptive_kwargs={})
    state = parts.tx.init(params)
    assert parts.noise_multiplier_of(state) == 1.3
    assert parts.noise_std_of(state) == pytest.approx(1.3 * 0.7, rel=1e-7)
    assert float(jnp.asarray(1.3, BF16)) != pytest.approx(1.3, rel=1e-3)  # what the bug gave
