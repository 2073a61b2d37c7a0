"""The optax DP transformations: vanilla equivalence, noise scale, padding, virtual steps,
inject_hyperparams, composition with other optax optimizers, adaptive clipping.

Oracles: plain optax on the mean gradient, ``jax.grad`` of the batch loss, the
numpy reference math of :mod:`dpcore.clipping`, and Kolmogorov-Smirnov tests
that accept the right noise scale and reject 0.9x and 1.1x of it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dp_jax._grads import clip_per_example, per_example_grads
from dp_jax._transforms import (
    AdaptiveClipState,
    DPAggregateState,
    adaptive_clip_update,
    add_gaussian_noise,
    clip_and_aggregate,
    current_hyperparams,
    dp_accumulate,
    dp_accumulate_sums,
    dp_adam,
    dp_aggregate,
    dp_aggregate_adaptive,
    dp_multi_steps,
    dp_sgd,
    noise_from_normals,
)
from dpcore import clipping as core
from dpcore.noise import NoiseSource
from tests.tolerance import assert_close
from tests.dp_jax.toy_models import padded_nan_batch  # noqa: E402

KEY = jax.random.key(0)
ALPHA = 1e-3  # KS significance: accept p > ALPHA at the right scale, reject below it


def _loss(params, example):
    x, y = example
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.sum((h @ params["w2"] - y) ** 2)


def _setup(batch=6, dtype=jnp.float64, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    params = {
        "w1": jax.random.normal(k[0], (3, 4), dtype),
        "b1": jnp.zeros(4, dtype),
        "w2": jax.random.normal(k[1], (4, 2), dtype),
    }
    x = jax.random.normal(k[2], (batch, 3), dtype)
    y = jax.random.normal(k[3], (batch, 2), dtype)
    return params, (x, y)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _zeros_grads(batch, sizes, dtype=jnp.float64):
    """All-zero per-example gradients: the DP output is then pure noise / denominator."""
    return {f"p{i}": jnp.zeros((batch, n), dtype) for i, n in enumerate(sizes)}


def _ks_p(samples, scale):
    flat = np.concatenate([np.ravel(x) for x in samples]) if isinstance(samples, list) else samples
    return stats.kstest(np.ravel(flat) / scale, "norm").pvalue


def _assert_noise_scale(samples, std):
    assert _ks_p(samples, std) > ALPHA
    assert _ks_p(samples, 0.9 * std) < ALPHA
    assert _ks_p(samples, 1.1 * std) < ALPHA


# --------------------------------------------------------------------------- vanilla


def test_zero_noise_huge_clip_is_vanilla_sgd():
    """sigma = 0, C = 1e10: every clip factor is exactly 1.0 and the noise exactly 0.

    Executed op by op (no jit), the DP update is then ``sum_i g_i / m`` with the
    same per-example gradients and the same reduction as the oracle
    ``jnp.sum(vmap grads, 0) / m`` fed to ``optax.sgd``: bitwise equal. Under
    ``jax.jit`` XLA may fuse the two computations differently (1-ulp changes),
    and ``jax.grad`` of the mean batch loss sums inside the backward pass in
    another order; both agree to 1e-12 in float64.
    """
    params, batch = _setup()
    m = 6
    dp = dp_sgd(0.1, 0.0, 1e10, m, KEY)
    ref = optax.sgd(0.1)
    grads = jax.jit(lambda p: per_example_grads(_loss, p, batch))
    mean_grad = jax.jit(jax.grad(
        lambda p: sum(_loss(p, (batch[0][i], batch[1][i])) for i in range(m)) / m))
    dp_step = jax.jit(dp.update)
    p_dp, p_ref, p_jit, p_exact = params, params, params, params
    dp_state, ref_state, jit_state, exact_state = (
        dp.init(params), ref.init(params), dp.init(params), ref.init(params))
    for _ in range(3):
        updates, dp_state = dp.update(grads(p_dp), dp_state, p_dp)
        p_dp = optax.apply_updates(p_dp, updates)
        mean = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0) / m, grads(p_ref))
        u_ref, ref_state = ref.update(mean, ref_state, p_ref)
        p_ref = optax.apply_updates(p_ref, u_ref)
        u_jit, jit_state = dp_step(grads(p_jit), jit_state, p_jit)
        p_jit = optax.apply_updates(p_jit, u_jit)
        u_exact, exact_state = ref.update(mean_grad(p_exact), exact_state, p_exact)
        p_exact = optax.apply_updates(p_exact, u_exact)
    for a, b in zip(_leaves(p_dp), _leaves(p_ref)):
        np.testing.assert_array_equal(a, b)
    assert_close(_leaves(p_jit), _leaves(p_exact), rtol=1e-12)
    assert_close(_leaves(p_dp), _leaves(p_exact), rtol=1e-12)


def test_finite_clip_bounds_each_example_and_matches_dpcore():
    params, batch = _setup(batch=5)
    g = per_example_grads(_loss, params, batch)
    c, m = 0.3, 5
    norms = core.per_example_norms(_leaves(g))
    assert np.all(norms > c)
    tx = clip_and_aggregate(c, m)
    update = jax.jit(tx.update)
    for i in range(5):
        out, state = update(g, tx.init(params), mask=jnp.arange(5) == i)
        total = math.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree_util.tree_leaves(out)))
        assert total * m <= c
        assert int(state.num_examples) == 1 and int(state.num_unclipped) == 0
    out, _ = tx.update(g, tx.init(params))
    assert_close(_leaves(out), [x / m for x in core.clip_and_sum(_leaves(g), c)], rtol=1e-12)
    out_sum, _ = clip_and_aggregate(c, m, loss_reduction="sum").update(g, tx.init(params))
    assert_close(_leaves(out_sum), core.clip_and_sum(_leaves(g), c), rtol=1e-12)
    pl = [0.1, 0.2, 0.3]
    out_pl, _ = clip_and_aggregate(pl, m, clipping="per_layer").update(g, tx.init(params))
    assert_close(_leaves(out_pl), [x / m for x in core.clip_and_sum_per_layer(_leaves(g), pl)],
                 rtol=1e-12)


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_noise_scale_ks(reduction):
    sigma, c, m = 1.3, 0.7, 8
    grads = _zeros_grads(3, [20000, 30000])
    tx = dp_aggregate(sigma, c, m, KEY, loss_reduction=reduction)
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    denom = m if reduction == "mean" else 1
    _assert_noise_scale(_leaves(out), sigma * c / denom)
    # the key advances: a second step draws fresh noise
    out2, _ = jax.jit(tx.update)(grads, state)
    assert not np.allclose(_leaves(out)[0], _leaves(out2)[0])


def test_per_layer_noise_uses_root_sum_of_squares():
    sigma, bounds, m = 1.0, [0.3, 0.4, 1.2], 4
    grads = _zeros_grads(2, [20000, 20000, 10000])
    tx = dp_aggregate(sigma, bounds, m, KEY, clipping="per_layer")
    out, _ = tx.update(grads, tx.init(grads))
    assert core.per_layer_noise_norm(bounds) == pytest.approx(1.3)
    _assert_noise_scale(_leaves(out), sigma * 1.3 / m)


def test_add_gaussian_noise_after_clip_and_aggregate():
    sigma, c, m = 2.0, 0.5, 10
    grads = _zeros_grads(4, [50000])
    tx = optax.chain(clip_and_aggregate(c, m), add_gaussian_noise(sigma, c, m, KEY))
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    _assert_noise_scale(_leaves(out), sigma * c / m)


def test_shared_noise_path_is_exact():
    """Host-drawn dpcore noise: ``(clipped_sum + noise) / m`` computed in numpy."""
    params, batch = _setup(batch=4)
    g = per_example_grads(_loss, params, batch)
    sigma, c, m = 1.1, 0.5, 4
    leaves, treedef = jax.tree_util.tree_flatten(params)
    source = NoiseSource(seed=3)
    noise = treedef.unflatten([source.normal(x.shape, sigma * c) for x in leaves])
    tx = dp_aggregate(sigma, c, m, KEY)
    out, _ = jax.jit(tx.update)(g, tx.init(params), noise=noise)
    ref = [(s + n) / m for s, n in
           zip(core.clip_and_sum(_leaves(g), c), jax.tree_util.tree_leaves(noise))]
    assert_close(_leaves(out), ref, rtol=1e-14)
    source2 = NoiseSource(seed=3)
    normals = treedef.unflatten([source2.normal(x.shape, 1.0) for x in leaves])
    out2, _ = tx.update(g, tx.init(params), noise=noise_from_normals(normals, sigma * c))
    assert_close(_leaves(out2), ref, rtol=1e-14)
    with pytest.raises(ValueError, match="structure"):
        tx.update(g, tx.init(params), noise=[np.zeros(3)])


# --------------------------------------------------------------------------- padding, nonfinite


def _nan_loss(params, example):
    x, bad = example
    z = jnp.where(bad, -1.0, 1.0)
    return jnp.sum(params["w"] * x) ** 2 + jnp.log(z) * params["b"]


def test_padding_changes_nothing_in_dp_sgd():
    params, (x, bad), (x_pad, bad_pad), mask = padded_nan_batch(5)
    tx = dp_sgd(0.1, 1.0, 0.5, 4, KEY, momentum=0.9)

    @jax.jit
    def step(p, s, batch, mask):
        g = per_example_grads(_nan_loss, p, batch)
        u, s = tx.update(g, s, p, mask=mask)
        return optax.apply_updates(p, u), s

    p1, s1 = params, tx.init(params)
    p2, s2 = params, tx.init(params)
    for _ in range(2):
        p1, s1 = step(p1, s1, (x, bad), jnp.ones(5, bool))
        p2, s2 = step(p2, s2, (x_pad, bad_pad), mask)
    assert_close(_leaves(p2), _leaves(p1), rtol=1e-15)
    assert int(s2[0].clip_state.num_nonfinite) == 0
    assert int(s2[0].clip_state.num_examples) == 5


def test_nonfinite_examples_counted_and_contribute_zero():
    params = {"w": jnp.arange(1.0, 4.0), "b": jnp.asarray(0.5)}
    x = jax.random.normal(jax.random.key(6), (6, 3))
    bad = jnp.array([True, False, False, True, False, False])
    g = per_example_grads(_nan_loss, params, (x, bad))
    tx = dp_aggregate(0.0, 1.0, 6, KEY)
    out, state = tx.update(g, tx.init(params))
    assert isinstance(state, DPAggregateState)
    assert int(state.clip_state.num_nonfinite) == 2
    keep = ~np.asarray(bad)
    good = {k: v[keep] for k, v in g.items()}
    ref, _ = tx.update(good, tx.init(params))
    assert_close(_leaves(out), _leaves(ref), rtol=1e-15)


# --------------------------------------------------------------------------- virtual steps


def test_accumulation_equals_one_big_batch_and_compiles_once():
    params, batch = _setup(batch=8)
    g = per_example_grads(_loss, params, batch)
    first = jax.tree_util.tree_map(lambda a: a[:5], g)
    second = jax.tree_util.tree_map(lambda a: jnp.concatenate([a[5:], jnp.zeros_like(a[:2])]), g)
    mask2 = jnp.arange(5) < 3
    c, m = 0.8, 8
    acc = dp_accumulate(c, 0.0, m, KEY)
    traces = []

    @jax.jit
    def update(grads, state, mask, apply):
        traces.append(1)
        return acc.update(grads, state, params, mask=mask, apply_update=apply)

    state = acc.init(params)
    out1, state = update(first, state, jnp.ones(5, bool), False)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(out1))
    assert int(state.num_chunks) == 1
    out2, state = update(second, state, mask2, True)
    assert len(traces) == 1
    big, _ = dp_aggregate(0.0, c, m, KEY).update(g, dp_aggregate(0.0, c, m, KEY).init(params))
    assert_close(_leaves(out2), _leaves(big), rtol=1e-13)
    assert_close(_leaves(out2), [x / m for x in core.clip_and_sum(_leaves(g), c)], rtol=1e-13)
    assert int(state.last.num_examples) == 8 and int(state.running.num_examples) == 0
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(state.grad_sum))


def test_accumulation_adds_noise_once():
    sigma, c, m = 1.5, 0.6, 4
    grads = _zeros_grads(2, [50000])
    acc = dp_accumulate(c, sigma, m, KEY)
    update = jax.jit(acc.update)
    state = acc.init({"p0": jnp.zeros(50000)})
    out, state = update(grads, state, apply_update=False)
    assert float(jnp.max(jnp.abs(out["p0"]))) == 0.0
    out, state = update(grads, state, apply_update=True)
    _assert_noise_scale(_leaves(out), sigma * c / m)
    assert _ks_p(_leaves(out), math.sqrt(2) * sigma * c / m) < ALPHA  # not noised twice


def test_dp_multi_steps_with_adamw_matches_one_big_batch():
    params, batch = _setup(batch=8)
    g = per_example_grads(_loss, params, batch)
    c, m = 0.8, 8
    gated = dp_multi_steps(dp_accumulate(c, 0.0, m, KEY), optax.adamw(1e-2, weight_decay=0.1))
    plain = optax.chain(dp_aggregate(0.0, c, m, KEY), optax.adamw(1e-2, weight_decay=0.1))
    update = jax.jit(gated.update)
    state = gated.init(params)
    halves = [jax.tree_util.tree_map(lambda a, s=s: a[s], g) for s in (slice(0, 4), slice(4, 8))]
    u, state = update(halves[0], state, params, apply_update=False)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(u))
    assert int(optax.tree_utils.tree_get(state.inner_state, "count")) == 0
    u, state = update(halves[1], state, params, apply_update=True)
    u_ref, _ = plain.update(g, plain.init(params), params)
    assert_close(_leaves(u), _leaves(u_ref), rtol=1e-12)
    assert int(optax.tree_utils.tree_get(state.inner_state, "count")) == 1


def test_accumulate_sums_takes_clipped_sums_like_dp_accumulate():
    """The clipped-sum accumulator: ``(sum of chunk sums + noise) / m`` against dpcore,
    and exactly what the per-example ``dp_accumulate`` gives on the same chunks."""
    params, batch = _setup(batch=7)
    g = per_example_grads(_loss, params, batch)
    c, m, sigma = 0.6, 7, 0.8
    parts = [jax.tree_util.tree_map(lambda a, s=s: a[s], g) for s in (slice(0, 3), slice(3, 7))]
    sums = dp_accumulate_sums(c, sigma, m, KEY)
    per_example = dp_accumulate(c, sigma, m, KEY)
    s_state, p_state = sums.init(params), per_example.init(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise = treedef.unflatten([np.random.default_rng(2).normal(size=x.shape) for x in leaves])
    update_sums, update_pe = jax.jit(sums.update), jax.jit(per_example.update)
    for i, part in enumerate(parts):
        clipped, aux = clip_per_example(part, c)
        apply = i == 1
        out_s, s_state = update_sums(clipped, s_state, clip_aux=aux, apply_update=apply,
                                     noise=noise)
        out_p, p_state = update_pe(part, p_state, apply_update=apply, noise=noise)
        assert_close(_leaves(out_s), _leaves(out_p), rtol=1e-13)
    want = [(x + n) / m for x, n in
            zip(core.clip_and_sum(_leaves(g), c), jax.tree_util.tree_leaves(noise))]
    assert_close(_leaves(out_s), want, rtol=1e-13)
    assert int(s_state.last.num_examples) == 7 and int(s_state.num_chunks) == 0
    assert int(s_state.last.num_unclipped) == int(p_state.last.num_unclipped)


def test_key_free_transformations_need_host_noise():
    params, batch = _setup(batch=4)
    g = per_example_grads(_loss, params, batch)
    tx = dp_aggregate(1.0, 0.5, 4, None)
    state = tx.init(params)
    assert not any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                   for x in jax.tree_util.tree_leaves(state))
    with pytest.raises(ValueError, match="noise=None"):
        tx.update(g, state)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    out, _ = jax.jit(tx.update)(g, state, noise=zero)
    assert_close(_leaves(out), [x / 4 for x in core.clip_and_sum(_leaves(g), 0.5)], rtol=1e-13)
    adaptive = dp_aggregate_adaptive(1.0, 0.5, 4, None, unclipped_num_std=1.0)
    with pytest.raises(ValueError, match="count_noise=None"):
        adaptive.update(g, adaptive.init(params), noise=zero)


# --------------------------------------------------------------------------- hyperparams


def test_inject_hyperparams_changes_clipping_and_noise():
    params, batch = _setup(batch=5)
    g = per_example_grads(_loss, params, batch)
    m = 5
    tx = optax.inject_hyperparams(dp_sgd, static_args=("key", "expected_batch_size"))(
        learning_rate=1.0, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=m,
        key=KEY,
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    u, state = update(g, state, params)
    assert_close(_leaves(u), [-x / m for x in core.clip_and_sum(_leaves(g), 0.5)], rtol=1e-12)
    state.hyperparams["max_grad_norm"] = jnp.asarray(0.2)
    u, state = update(g, state, params)
    assert_close(_leaves(u), [-x / m for x in core.clip_and_sum(_leaves(g), 0.2)], rtol=1e-12)
    hp = current_hyperparams(state)
    assert float(hp["max_grad_norm"]) == 0.2 and float(hp["noise_multiplier"]) == 0.0
    # noise follows the injected sigma and C (pure noise on zero gradients)
    zeros = _zeros_grads(2, [40000])
    zparams = {"p0": jnp.zeros(40000)}
    state = tx.init(zparams)
    state.hyperparams["noise_multiplier"] = jnp.asarray(2.0)
    state.hyperparams["max_grad_norm"] = jnp.asarray(0.25)
    u, state = update(zeros, state, zparams)
    _assert_noise_scale(-np.asarray(u["p0"]), 2.0 * 0.25 / m)


def test_inject_hyperparams_schedule_for_noise_multiplier():
    m = 2
    schedule = optax.piecewise_constant_schedule(1.0, {1: 3.0})  # 1.0 then 3.0
    tx = optax.inject_hyperparams(dp_sgd, static_args=("key", "expected_batch_size"))(
        learning_rate=1.0, noise_multiplier=schedule, max_grad_norm=1.0, expected_batch_size=m,
        key=KEY,
    )
    zeros, zparams = _zeros_grads(2, [40000]), {"p0": jnp.zeros(40000)}
    update = jax.jit(tx.update)
    state = tx.init(zparams)
    seen = []
    for _ in range(2):
        u, state = update(zeros, state, zparams)
        seen.append(np.asarray(u["p0"]))
        assert float(current_hyperparams(state)["noise_multiplier"]) in (1.0, 3.0)
    _assert_noise_scale(seen[0], 1.0 / m)
    _assert_noise_scale(seen[1], 3.0 / m)


def test_chain_with_adamw_and_dp_adam():
    params, batch = _setup(batch=6)
    g = per_example_grads(_loss, params, batch)
    c, m, sigma = 0.5, 6, 0.7
    agg = dp_aggregate(sigma, c, m, KEY)
    noised, _ = agg.update(g, agg.init(params))
    tx = optax.chain(dp_aggregate(sigma, c, m, KEY), optax.adamw(1e-3, weight_decay=0.01))
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    adamw = optax.adamw(1e-3, weight_decay=0.01)
    u_ref, _ = adamw.update(noised, adamw.init(params), params)
    assert_close(_leaves(u), _leaves(u_ref), rtol=1e-12)
    dpa = dp_adam(1e-3, sigma, c, m, KEY)
    u2, _ = dpa.update(g, dpa.init(params), params)
    adam = optax.adam(1e-3)
    u2_ref, _ = adam.update(noised, adam.init(params), params)
    assert_close(_leaves(u2), _leaves(u2_ref), rtol=1e-12)


# --------------------------------------------------------------------------- adaptive


def test_adaptive_clip_update_matches_dpcore():
    rng = np.random.default_rng(0)
    for _ in range(200):
        batch = int(rng.integers(0, 40))
        count = int(rng.integers(0, batch + 1))
        args = dict(
            max_grad_norm=float(rng.uniform(0.01, 5.0)), unclipped_count=count,
            noise_on_count=float(rng.normal(0, 3)), expected_batch_size=int(rng.integers(1, 40)),
            target_unclipped_quantile=float(rng.uniform()), learning_rate=float(rng.uniform(0, 1)),
            min_clipbound=0.05, max_clipbound=4.0,
        )
        want = core.adaptive_clip_update(*args.values(), batch_size=batch)
        got, _ = adaptive_clip_update(jnp.asarray(args.pop("max_grad_norm"), jnp.float64),
                                      *args.values(), batch_size=batch)
        assert_close(got, want, rtol=1e-14)


def test_dp_aggregate_adaptive_step():
    params, batch = _setup(batch=8)
    g = per_example_grads(_loss, params, batch)
    sigma, c0, m, std_b = 0.8, 0.7, 8, 2.0
    tx = dp_aggregate_adaptive(sigma, c0, m, KEY, unclipped_num_std=std_b,
                               clipbound_learning_rate=0.3, target_unclipped_quantile=0.6)
    state = tx.init(params)
    assert isinstance(state, AdaptiveClipState)
    # shared-noise mode: zero gradient noise and a known count noise, against dpcore
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    out, state = jax.jit(tx.update)(g, state, noise=zero, count_noise=jnp.asarray(0.37))
    norms = core.per_example_norms(_leaves(g))
    count = core.count_unclipped(norms, c0)
    assert int(state.clip_state.num_unclipped) == count
    want_c = core.adaptive_clip_update(c0, count, 0.37, m, 0.6, 0.3, 1e-8, 1e8, batch_size=8)
    assert_close(state.max_grad_norm, want_c, rtol=1e-14)
    assert_close(_leaves(out), [x / m for x in core.clip_and_sum(_leaves(g), c0)], rtol=1e-12)
    # the next step clips with the new bound
    out, state2 = tx.update(g, state, noise=zero, count_noise=jnp.asarray(0.0))
    assert_close(_leaves(out), [x / m for x in core.clip_and_sum(_leaves(g), want_c)], rtol=1e-12)
    assert float(current_hyperparams(
        optax.inject_hyperparams(lambda noise_multiplier: tx)(noise_multiplier=sigma)
        .init(params)
    )["noise_multiplier"]) == pytest.approx(sigma)


def test_dp_aggregate_adaptive_noise_scales():
    sigma, c0, m, std_b = 1.0, 0.5, 10, 3.0
    z_grad = core.adaptive_noise_multipliers(sigma, std_b, m)
    assert z_grad > sigma
    zeros = _zeros_grads(m, [40000])
    tx = dp_aggregate_adaptive(sigma, c0, m, KEY, unclipped_num_std=std_b,
                               clipbound_learning_rate=0.0)
    out, _ = jax.jit(tx.update)(zeros, tx.init(zeros))
    _assert_noise_scale(_leaves(out), z_grad * c0 / m)

    # count noise: every example unclipped (zero norm), so the noised fraction is
    # b = (m - m/2 + noise) / m + 1/2 = 1 + noise / m, clamped at 1; recover the noise
    # where b < 1 (the lower half of the distribution) and KS-test the half-normal.
    @jax.jit
    def fractions(keys):
        def one(k):
            t = dp_aggregate_adaptive(sigma, c0, m, k, unclipped_num_std=std_b)
            return t.update(_zeros_grads(m, [1]), t.init(_zeros_grads(1, [1])))[1]
        return jax.vmap(one)(keys).noised_unclipped_fraction

    b = np.asarray(fractions(jax.random.split(jax.random.key(9), 20000)))
    noise = (b[b < 1.0] - 1.0) * m
    half = -noise
    assert stats.kstest(half / std_b, stats.halfnorm.cdf).pvalue > ALPHA
    assert stats.kstest(half / (0.9 * std_b), stats.halfnorm.cdf).pvalue < ALPHA
    assert stats.kstest(half / (1.1 * std_b), stats.halfnorm.cdf).pvalue < ALPHA


# --------------------------------------------------------------------------- validation


def test_validation_errors():
    with pytest.raises(ValueError, match="loss_reduction"):
        dp_aggregate(1.0, 1.0, 4, KEY, loss_reduction="avg")
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp_aggregate(-1.0, 1.0, 4, KEY)
    with pytest.raises(ValueError, match="max_grad_norm"):
        dp_sgd(0.1, 1.0, 0.0, 4, KEY)
    with pytest.raises(TypeError, match="expected_batch_size"):
        clip_and_aggregate(1.0, 4.5)
    with pytest.raises(ValueError, match="expected_batch_size"):
        clip_and_aggregate(1.0, 0)
    with pytest.raises(ValueError, match="clipping"):
        dp_accumulate(1.0, 1.0, 4, KEY, clipping="adaptive")
    with pytest.raises(ValueError, match="unclipped_num_std"):
        dp_aggregate_adaptive(1.0, 1.0, 4, KEY)  # default m/20 = 0.2 is too small
    with pytest.raises(ValueError, match="noise_multiplier"):
        current_hyperparams(dp_sgd(0.1, 1.0, 1.0, 4, KEY).init({"w": jnp.zeros(2)}))
