"""Per-example gradients and clipping against a loop of single-example ``jax.grad`` calls.

Oracles: the gradient of each example alone (``jax.grad`` on a batch of one,
one call per example) and the numpy reference math of :mod:`dpcore.clipping`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dp_jax._grads import ClipAux, clip_per_example, clipped_grad, per_example_grads
from dpcore import clipping as core
from tests.dp_jax.toy_models import LINEN, NNX, padded_nan_batch
from tests.tolerance import assert_close

B = 5  # odd, so microbatches of 2 need padding
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


# --------------------------------------------------------------------------- cases


def _inputs(kind: str, dtype, key) -> jax.Array:
    shapes = {"dense": (B, 3), "conv": (B, 6, 6, 2), "layernorm": (B, 3), "groupnorm": (B, 5, 5, 2),
              "lstm": (B, 3, 2), "attention": (B, 3, 4)}
    if kind == "embed":
        return jax.random.randint(key, (B, 5), 0, 10)
    return jax.random.normal(key, shapes[kind], dtype)


def make_case(framework: str, kind: str, dtype):
    """``(loss_fn, params, batch)`` with ``loss_fn(params, example)`` for one example."""
    kx, ky, kp = jax.random.split(jax.random.key(7), 3)
    x = _inputs(kind, dtype, kx)
    y = jax.random.normal(ky, (B, 2), dtype)
    if framework == "linen":
        model = LINEN[kind](dtype=dtype)
        params = model.init(kp, x[:1])

        def apply(p, xi):
            return model.apply(p, xi)
    else:
        module = NNX[kind](dtype, nnx.Rngs(0))
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def apply(p, xi):
            return nnx.merge(graphdef, p, rest)(xi)

    def loss_fn(p, example):
        xi, yi = example
        out = apply(p, xi[None])[0]
        return jnp.sum((out - yi) ** 2)

    return loss_fn, params, (x, y)


def loop_grads(loss_fn, params, batch) -> list[list[np.ndarray]]:
    """Oracle: one ``jax.grad`` call per example; returns per-leaf stacked gradients."""
    grad = jax.jit(jax.grad(loss_fn))
    per = []
    for i in range(B):
        example = jax.tree_util.tree_map(lambda a: a[i], batch)
        per.append(jax.tree_util.tree_leaves(grad(params, example)))
    return [np.stack([per[i][j] for i in range(B)]) for j in range(len(per[0]))]


CASES = [(fw, kind) for fw in ("linen", "nnx") for kind in LINEN]


def _all_paths(loss_fn, c):
    """Every per-example path, compiled once: plain, microbatched, clipped (both)."""

    @jax.jit
    def run(params, batch):
        return (
            per_example_grads(loss_fn, params, batch),
            per_example_grads(loss_fn, params, batch, microbatch_size=2),
            clipped_grad(loss_fn, c)(params, batch),
            clipped_grad(loss_fn, c, microbatch_size=2)(params, batch),
        )

    return run


@pytest.mark.parametrize("framework,kind", CASES)
def test_per_example_and_clipped_match_loop_float64(framework, kind):
    loss_fn, params, batch = make_case(framework, kind, jnp.float64)
    want = loop_grads(loss_fn, params, batch)
    rtol = RTOL[jnp.float64]
    want_norms = core.per_example_norms(want)
    c = float(np.mean(np.sort(want_norms)[2:4]))  # strictly between norms: 3 unclipped, 2 not
    plain, micro, *clipped = _all_paths(loss_fn, c)(params, batch)
    assert_close(jax.tree_util.tree_leaves(plain), want, rtol=rtol, atol=1e-14)
    assert_close(jax.tree_util.tree_leaves(micro), want, rtol=rtol, atol=1e-14)
    ref = core.clip_and_sum(want, c)
    for summed, aux in clipped:
        assert_close(jax.tree_util.tree_leaves(summed), ref, rtol=rtol, atol=1e-14)
        assert_close(aux.norms, want_norms, rtol=rtol)
        assert int(aux.num_unclipped) == core.count_unclipped(want_norms, c)
        assert int(aux.num_examples) == B and int(aux.num_nonfinite) == 0


@pytest.mark.parametrize("framework,kind", [
    ("linen", "conv"), ("nnx", "attention"),
    pytest.param("nnx", "conv", marks=pytest.mark.slow),
    pytest.param("linen", "attention", marks=pytest.mark.slow),
    pytest.param("linen", "lstm", marks=pytest.mark.slow),
])
def test_float32_matches_loop(framework, kind):
    loss_fn, params, batch = make_case(framework, kind, jnp.float32)
    want = loop_grads(loss_fn, params, batch)
    assert all(w.dtype == np.float32 for w in want)
    c = float(np.mean(np.sort(core.per_example_norms(want))[2:4]))
    got, (clipped, _) = jax.jit(lambda p, b: (
        per_example_grads(loss_fn, p, b, microbatch_size=2), clipped_grad(loss_fn, c)(p, b)
    ))(params, batch)
    leaves = jax.tree_util.tree_leaves(got)
    assert all(g.dtype == jnp.float32 for g in leaves)
    scale = max(float(np.max(np.abs(w))) for w in want)
    assert_close(leaves, want, rtol=RTOL[jnp.float32], atol=1e-6 * scale)
    assert_close(jax.tree_util.tree_leaves(clipped), core.clip_and_sum(want, c),
                 rtol=RTOL[jnp.float32], atol=1e-6 * scale)


def test_per_layer_clipping_matches_dpcore():
    loss_fn, params, batch = make_case("linen", "layernorm", jnp.float64)
    want = loop_grads(loss_fn, params, batch)
    norms = [np.sqrt(np.sum(w.reshape(B, -1) ** 2, axis=1)) for w in want]
    bounds = [float(np.median(n)) for n in norms]
    ref = core.clip_and_sum_per_layer(want, bounds)
    tree_bounds = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), bounds)
    for spec, mb in ((bounds, 2), (tuple(bounds), None), (tree_bounds, None)):
        clipped, aux = jax.jit(clipped_grad(loss_fn, spec, clipping="per_layer",
                                            microbatch_size=mb))(params, batch)
        assert_close(jax.tree_util.tree_leaves(clipped), ref, rtol=1e-10, atol=1e-14)
        assert_close(jax.tree_util.tree_leaves(aux.layer_norms), norms, rtol=1e-10)
        assert_close(aux.norms, core.per_example_norms(want), rtol=1e-10)
        unclipped = np.logical_and.reduce([n <= c for n, c in zip(norms, bounds)])
        assert int(aux.num_unclipped) == int(unclipped.sum())


def _nan_loss(p, example):
    x, bad = example
    # A "bad" example takes log of a negative number: its gradient is NaN.
    z = jnp.where(bad, -1.0, 1.0) + 0.0 * x[0]
    return jnp.sum(p["w"] * x) ** 2 + jnp.log(z) * p["b"]


def test_nonfinite_examples_are_counted_and_dropped():
    params = {"w": jnp.arange(1.0, 4.0), "b": jnp.asarray(0.5)}
    x = jax.random.normal(jax.random.key(1), (6, 3))
    bad = jnp.array([False, True, False, False, True, False])
    grads = per_example_grads(_nan_loss, params, (x, bad))
    assert bool(jnp.all(jnp.isnan(grads["b"][1])))
    clipped, aux = clipped_grad(_nan_loss, 1.0)(params, (x, bad))
    assert int(aux.num_nonfinite) == 2
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(clipped))
    good = np.asarray(~bad)
    ref = core.clip_and_sum([np.asarray(grads["b"])[good], np.asarray(grads["w"])[good]], 1.0)
    assert_close([clipped["b"], clipped["w"]], ref, rtol=1e-12)
    # the dpcore oracle drops the same rows when given all of them
    ref_all = core.clip_and_sum([np.asarray(grads["b"]), np.asarray(grads["w"])], 1.0)
    assert_close([clipped["b"], clipped["w"]], ref_all, rtol=1e-12)
    # an inf gradient too
    g_inf = {"w": grads["w"].at[0, 0].set(jnp.inf), "b": jnp.nan_to_num(grads["b"])}
    out, aux2 = clip_per_example(g_inf, 1.0)
    assert int(aux2.num_nonfinite) == 1
    assert bool(jnp.all(jnp.isfinite(out["w"])))


def test_padded_rows_change_nothing_even_with_nan_inputs():
    params, (x, bad), (x_pad, bad_pad), mask = padded_nan_batch(2)
    for mb in (None, 3):
        fn = jax.jit(clipped_grad(_nan_loss, 2.0, microbatch_size=mb))
        ref, aux_ref = fn(params, (x, bad))
        got, aux = fn(params, (x_pad, bad_pad), mask)
        assert_close(got, ref, rtol=1e-15)
        assert int(aux.num_nonfinite) == 0 and int(aux.num_examples) == 5
        assert_close(aux.loss, aux_ref.loss, rtol=1e-15)
        assert_close(aux.norms[:5], aux_ref.norms, rtol=0.0)
    # clip_per_example: padded rows with NaN gradients contribute exactly zero
    g = per_example_grads(_nan_loss, params, (x_pad, bad_pad))
    out, aux = clip_per_example(g, 2.0, mask)
    out_ref, _ = clip_per_example(per_example_grads(_nan_loss, params, (x, bad)), 2.0)
    assert_close(out, out_ref, rtol=1e-15)
    assert int(aux.num_nonfinite) == 0


def test_huge_clip_is_identity_and_finite_clip_bounds_each_example():
    loss_fn, params, batch = make_case("linen", "dense", jnp.float64)
    want = loop_grads(loss_fn, params, batch)
    clipped, aux = clipped_grad(loss_fn, 1e12)(params, batch)
    assert_close(jax.tree_util.tree_leaves(clipped), [w.sum(0) for w in want], rtol=1e-12)
    assert int(aux.num_unclipped) == B
    c = 1e-3
    grads = per_example_grads(loss_fn, params, batch)
    clip = jax.jit(lambda g, mask: clip_per_example(g, c, mask))
    for i in range(B):
        one = np.arange(B) == i
        out, _ = clip(grads, jnp.asarray(one))
        norm = np.sqrt(sum(float(jnp.sum(leaf**2)) for leaf in jax.tree_util.tree_leaves(out)))
        assert norm <= c
        assert norm == pytest.approx(c * core.per_example_norms(want)[i]
                                     / (core.per_example_norms(want)[i] + 1e-6), rel=1e-12)


def test_loss_is_mean_over_masked_rows():
    loss_fn, params, batch = make_case("linen", "dense", jnp.float64)
    mask = jnp.array([True, False, True, True, False])
    _, aux = clipped_grad(loss_fn, 1.0, microbatch_size=2)(params, batch, mask)
    losses = [float(loss_fn(params, jax.tree_util.tree_map(lambda a: a[i], batch)))
              for i in range(B) if bool(mask[i])]
    assert_close(aux.loss, np.mean(losses), rtol=1e-12)
    assert isinstance(aux, ClipAux)


def test_validation_errors():
    loss_fn, params, batch = make_case("linen", "dense", jnp.float64)
    grads = per_example_grads(loss_fn, params, batch)
    with pytest.raises(ValueError, match="clipping"):
        clip_per_example(grads, 1.0, clipping="adaptive")
    with pytest.raises(ValueError, match="max_grad_norm"):
        clip_per_example(grads, -1.0)
    with pytest.raises(ValueError, match="per_layer"):
        clip_per_example(grads, [1.0, 2.0], clipping="per_layer")
    with pytest.raises(ValueError, match=r"max_grad_norm\[1\]"):
        clip_per_example(grads, [1.0, 0.0, 1.0, 1.0], clipping="per_layer")
    with pytest.raises(ValueError, match="mask"):
        clip_per_example(grads, 1.0, jnp.ones(3, bool))
    with pytest.raises(ValueError, match="microbatch_size"):
        clipped_grad(loss_fn, 1.0, microbatch_size=0)
    with pytest.raises(ValueError, match="flat"):
        clipped_grad(loss_fn, [1.0, 2.0])
    with pytest.raises(ValueError, match="leading"):
        per_example_grads(loss_fn, params, (jnp.ones((3, 3)), jnp.ones((2, 2))))
