"""Ghost clipping against a loop of single-example ``jax.grad`` calls and ``clipped_grad``.

Oracles: the gradient of each example alone (one ``jax.grad`` call per example), clipped
and summed by the numpy reference of :mod:`dpcore.clipping`; and
:func:`dp_jax.clipped_grad` (vmap), whose whole :class:`ClipAux` must agree. Every case
also asserts which parameters took the ghost path (:func:`ghost_plan`), so a silent
fall-back to vmap cannot pass for ghost clipping.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import dp_jax
from dp_jax import _ghost_plan
from dp_jax._ghost import ghost_clipped_grad, ghost_plan
from dpcore import clipping as core
from tests.dp_jax.toy_models import (
    LinenBlock,
    LinenConvDense,
    LinenMLP,
    LinenShared,
    NnxMLP,
    NnxTokenEmbed,
)
from tests.tolerance import assert_close

F64, F32 = jnp.float64, jnp.float32
RTOL = {F64: 1e-10, F32: 1e-5}
B = 7
MASK = np.array([1, 1, 0, 1, 1, 1, 0], bool)  # rows 2 and 6 are padding (NaN / bad ids)
_NNX_LINEAR_CALL = nnx.Linear.__dict__["__call__"]


def _tokens(rng, high, length):
    """Ids with repeats, negative ids (wrap like jnp.take) and out-of-range padding rows."""
    ids = rng.integers(-high, high, size=(B, length)).astype(np.int32)
    ids[:, 1] = ids[:, 0]  # a repeated id in every row
    ids[2, :] = high + 3  # padding rows: out of range -> NaN embeddings (before nan_to_num)
    ids[6, 0] = -high - 1
    ids[0, -1] = high  # out of range in a real example: a NaN row that nan_to_num zeroes
    return ids


def _floats(rng, shape, dtype, pad=(np.nan, np.inf)):
    x = rng.standard_normal((B,) + shape).astype(np.dtype(dtype))
    x[2], x[6] = pad  # padding rows hold NaN / inf; they must change nothing
    return x


def make_case(name: str, dtype):
    """``(loss_fn, params, batch, expected ghost paths)``."""
    rng = np.random.default_rng(3)
    y = rng.standard_normal((B, 3)).astype(np.dtype(dtype))
    if name in ("nnx_mlp", "nnx_embed"):
        module = (NnxMLP if name == "nnx_mlp" else NnxTokenEmbed)(dtype, nnx.Rngs(0))
        graphdef, params, rest = dp_jax.nnx_split_params(module)
        loss_fn = dp_jax.nnx_loss(graphdef, rest, "mse")
        x = _floats(rng, (2, 3), dtype) if name == "nnx_mlp" else _tokens(rng, 7, 6)
    else:
        model = {"mlp": LinenMLP, "conv": LinenConvDense, "block": LinenBlock,
                 "shared": LinenShared}[name](dtype=dtype)
        x = {"mlp": lambda: _floats(rng, (4,), dtype),
             # Finite garbage: with a NaN output gradient in one example, the vmapped
             # convolution's kernel gradient (a grouped convolution, which XLA's CPU
             # backend computes densely with a block-diagonal filter) is NaN for EVERY
             # example, in clipped_grad as well; NaN padding is not safe for convolutions.
             "conv": lambda: _floats(rng, (5, 5, 2), dtype, pad=(1e3, -1e3)),
             "block": lambda: _tokens(rng, 12, 5),
             "shared": lambda: _floats(rng, (3, 4), dtype)}[name]()
        params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
        loss_fn = dp_jax.linen_loss(model, "mse")
    batch = {"x": x, "y": y}
    return loss_fn, params, batch, EXPECTED_GHOST[name]


EXPECTED_GHOST = {
    "mlp": {"['Dense_0']['bias']", "['Dense_0']['kernel']", "['Dense_1']['kernel']",
            "['Dense_2']['bias']", "['Dense_2']['kernel']"},
    "conv": {"['Dense_0']['bias']", "['Dense_0']['kernel']", "['Conv_0']['bias']",
             "['Conv_0']['kernel']"},
    "block": {"['Embed_0']['embedding']", "['Dense_0']['bias']", "['Dense_0']['kernel']",
              "['Dense_1']['bias']", "['Dense_1']['kernel']", "['Dense_2']['bias']",
              "['Dense_2']['kernel']"} | {
        f"['MultiHeadDotProductAttention_0']['{p}']['{leaf}']"
        for p in ("query", "key", "value", "out") for leaf in ("kernel", "bias")},
    "shared": {"['Dense_0']['bias']", "['Dense_0']['kernel']", "['Dense_1']['bias']",
               "['Dense_1']['kernel']"},
    "nnx_mlp": {f"['{m}']['{leaf}'].value" for m in ("first", "shared") for leaf in
                ("kernel", "bias")} | {"['out']['kernel'].value", "['norm']['scale'].value",
                                       "['norm']['bias'].value"},
    "nnx_embed": {"['embed']['embedding'].value", "['out']['bias'].value",
                  "['out']['kernel'].value"},
}
# Position embedding (5 rows, 5 positions: 25 > 64 * 5 is false -> it IS ghost) is checked
# by its own test.
EXPECTED_GHOST["block"] |= {"['Embed_1']['embedding']"}
# The block's LayerNorms (scale and bias) are ghost too.
EXPECTED_GHOST["block"] |= {f"['LayerNorm_{i}']['{leaf}']" for i in (0, 1)
                            for leaf in ("scale", "bias")}


# --------------------------------------------------------------------------- oracle


def loop_oracle(loss_fn, params, batch, rows):
    """Per-leaf stacked single-example gradients and the losses of ``rows``."""
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    per, losses = [], []
    for i in rows:
        example = jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), batch)
        loss, grad = value_and_grad(params, example)
        per.append(jax.tree_util.tree_leaves(grad))
        losses.append(float(loss))
    stacked = [np.stack([p[j] for p in per]) for j in range(len(per[0]))]
    return stacked, np.asarray(losses)


@functools.lru_cache(maxsize=None)
def float64_case(name: str):
    """``make_case(name, float64)`` and its loop oracle over the masked-in rows (cached)."""
    loss_fn, params, batch, expected = make_case(name, F64)
    want, losses = loop_oracle(loss_fn, params, batch, np.flatnonzero(MASK))
    return loss_fn, params, batch, expected, want, losses


def _scale(leaves) -> float:
    return max(float(np.max(np.abs(w))) for w in leaves)


def _check_plan(loss_fn, params, batch, expected):
    plan = ghost_plan(loss_fn, params, batch)
    assert set(plan.ghost) == expected, plan
    assert set(plan.ghost) | set(plan.fallback) == {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["mlp", "conv", "block", "shared", "nnx_mlp", "nnx_embed"])
def test_flat_matches_loop_and_clipped_grad_float64(name):
    loss_fn, params, batch, expected, want, losses = float64_case(name)
    _check_plan(loss_fn, params, batch, expected)
    rows = np.flatnonzero(MASK)
    norms = core.per_example_norms(want)
    c = float(np.mean(np.sort(norms)[1:3]))  # between norms: some clipped, some not
    run = jax.jit(lambda p, b, m: (ghost_clipped_grad(loss_fn, c)(p, b, m),
                                   dp_jax.clipped_grad(loss_fn, c)(p, b, m)))
    (got, aux), (vm, vm_aux) = run(params, batch, MASK)
    rtol, atol = RTOL[F64], 1e-13 * _scale(want)
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, c), rtol=rtol, atol=atol)
    assert_close(np.asarray(aux.norms)[rows], norms, rtol=rtol)
    assert int(aux.num_unclipped) == core.count_unclipped(norms, c) > 0
    assert int(aux.num_unclipped) < len(rows)
    assert (int(aux.num_examples), int(aux.num_nonfinite)) == (len(rows), 0)
    assert_close(aux.loss, np.mean(losses), rtol=rtol)
    # The whole ClipAux agrees with the vmap implementation.
    assert_close(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(vm), rtol=rtol,
                 atol=atol)
    assert_close(np.asarray(aux.norms)[rows], np.asarray(vm_aux.norms)[rows], rtol=rtol)
    for field in ("num_nonfinite", "num_unclipped", "num_examples"):
        assert int(getattr(aux, field)) == int(getattr(vm_aux, field))
    assert aux.layer_norms is None and aux.norms.dtype == vm_aux.norms.dtype


@pytest.mark.parametrize("name", ["nnx_mlp", pytest.param("block", marks=pytest.mark.slow)])
def test_float32_matches_loop(name):
    loss_fn, params, batch, expected = make_case(name, F32)
    _check_plan(loss_fn, params, batch, expected)
    rows = np.flatnonzero(MASK)
    want, _ = loop_oracle(loss_fn, params, batch, rows)
    assert all(w.dtype == np.float32 for w in want)
    norms = core.per_example_norms(want)
    c = float(np.median(norms))
    got, aux = ghost_clipped_grad(loss_fn, c)(params, batch, MASK)
    leaves = jax.tree_util.tree_leaves(got)
    assert all(g.dtype == jnp.float32 for g in leaves)
    assert_close(leaves, core.clip_and_sum(want, c), rtol=RTOL[F32], atol=1e-6 * _scale(want))
    assert_close(np.asarray(aux.norms)[rows], norms, rtol=RTOL[F32])


@pytest.mark.parametrize("name,as_tree", [("block", True), ("nnx_mlp", False)])
def test_per_layer_matches_dpcore(name, as_tree):
    loss_fn, params, batch, _, want, _ = float64_case(name)
    rows = np.flatnonzero(MASK)
    layer = [np.sqrt(np.sum(w.reshape(len(rows), -1) ** 2, axis=1)) for w in want]
    bounds = [float(np.median(n)) + 1e-3 for n in layer]
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), bounds)
    spec = tree if as_tree else bounds  # a pytree, or a list in leaf order
    run = jax.jit(lambda p, b, m: (
        ghost_clipped_grad(loss_fn, spec, clipping="per_layer")(p, b, m),
        dp_jax.clipped_grad(loss_fn, spec, clipping="per_layer")(p, b, m)))
    (got, aux), (vm, vm_aux) = run(params, batch, MASK)
    rtol = RTOL[F64]
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum_per_layer(want, bounds),
                 rtol=rtol, atol=1e-13 * _scale(want))
    got_layer = jax.tree_util.tree_leaves(aux.layer_norms)
    assert_close([np.asarray(g)[rows] for g in got_layer], layer, rtol=rtol,
                 atol=1e-13 * max(float(np.max(n)) for n in layer))
    assert_close(np.asarray(aux.norms)[rows], core.per_example_norms(want), rtol=rtol)
    unclipped = np.logical_and.reduce([n <= c for n, c in zip(layer, bounds)])
    assert int(aux.num_unclipped) == int(np.sum(unclipped))
    # The vmap implementation agrees.
    assert int(vm_aux.num_unclipped) == int(aux.num_unclipped)
    assert_close(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(vm), rtol=rtol,
                 atol=1e-13 * _scale(want))


@pytest.mark.parametrize("form", ["gram", "direct"])
def test_gram_and_direct_forms_match_loop(form, monkeypatch):
    # The automatic choice picks the direct form for long rows; force each in turn.
    monkeypatch.setattr(_ghost_plan, "_use_direct", lambda *args: form == "direct")
    loss_fn, params, batch, _, want, _ = float64_case("shared")
    rows = np.flatnonzero(MASK)
    c = float(np.median(core.per_example_norms(want)))
    got, aux = ghost_clipped_grad(loss_fn, c)(params, batch, MASK)
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, c), rtol=RTOL[F64],
                 atol=1e-13 * _scale(want))
    assert_close(np.asarray(aux.norms)[rows], core.per_example_norms(want), rtol=RTOL[F64])


def test_direct_form_is_chosen_only_when_cheaper():
    assert not _ghost_plan._use_direct(64, 1, 784, 512)  # no sequence: |a|^2 |g|^2
    assert not _ghost_plan._use_direct(64, 4, 256, 256)  # short rows: Gram
    assert _ghost_plan._use_direct(8, 128, 256, 768)  # long rows: per-example products
    assert not _ghost_plan._use_direct(10**4, 128, 4096, 4096)  # ... unless they would not fit


def test_nonfinite_masked_in_example_is_dropped_and_counted():
    loss_fn, params, batch, _, want, _ = float64_case("mlp")
    mask = np.ones(B, bool)  # the NaN and inf rows are now real examples
    got, aux = ghost_clipped_grad(loss_fn, 1.0)(params, batch, mask)
    assert int(aux.num_nonfinite) == 2 and int(aux.num_examples) == B
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, 1.0), rtol=RTOL[F64],
                 atol=1e-13 * _scale(want))


def test_no_mask_and_no_supported_layer_equal_clipped_grad():
    class ConvOnly(nn.Module):
        @nn.compact
        def __call__(self, x):  # a masked convolution and a bare parameter: not supported
            mask = np.tril(np.ones((3, 3, 2, 3)))
            x = nn.Conv(3, (3, 3), mask=mask, param_dtype=F64)(x)
            scale = self.param("scale", nn.initializers.ones, (3,), F64)
            return jnp.mean(jnp.tanh(x) * scale, axis=(1, 2)) + jnp.sum(scale)

    model = ConvOnly()
    x = np.random.default_rng(0).standard_normal((4, 5, 5, 2))
    batch = {"x": x, "y": np.zeros((4, 3))}
    params = model.init(jax.random.key(0), x[:1])["params"]
    loss_fn = dp_jax.linen_loss(model, "mse")
    plan = ghost_plan(loss_fn, params, batch)
    assert plan.ghost == () and plan.calls == 0 and len(plan.fallback) == 3
    assert set(plan.methods.values()) == {"vmap"}
    got, aux = ghost_clipped_grad(loss_fn, 0.1)(params, batch)
    want, want_aux = jax.jit(dp_jax.clipped_grad(loss_fn, 0.1))(params, batch)
    assert_close(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), rtol=1e-12)
    assert_close(aux.norms, want_aux.norms, rtol=1e-12)
    assert_close(aux.loss, want_aux.loss, rtol=1e-12)


# --------------------------------------------------------------------------- fall-back safety


class KernelRegulariser(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, param_dtype=F64)
        h = jnp.tanh(dense(x))
        penalty = 0.1 * jnp.sum(dense.variables["params"]["kernel"] ** 2)
        return nn.Dense(3, param_dtype=F64)(h) + penalty


class _Cell(nn.Module):
    @nn.compact
    def __call__(self, h, xt):
        return jnp.tanh(nn.Dense(3, param_dtype=F64)(jnp.concatenate([h, xt], -1))), None


class LiftedScanAndRemat(nn.Module):
    @nn.compact
    def __call__(self, x):  # [1, T, 2]
        scan = nn.scan(_Cell, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=1)
        h, _ = scan()(jnp.zeros((x.shape[0], 3), F64), x)
        h = nn.remat(nn.Dense)(3, param_dtype=F64)(h)
        return nn.Dense(3, param_dtype=F64)(h)


class TiedEmbedding(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(6, 3, param_dtype=F64)
        h = jnp.mean(embed(tokens), axis=1)
        return embed.attend(nn.Dense(3, param_dtype=F64)(h))[:, :3]


class NnxScan(nnx.Module):
    def __init__(self, rngs):
        self.cell = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)
        self.out = nnx.Linear(3, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):  # [1, T, 2]
        def body(h, xt):
            return jnp.tanh(self.cell(jnp.concatenate([h, xt], -1))), None

        h, _ = jax.lax.scan(body, jnp.zeros((x.shape[0], 3), F64), jnp.swapaxes(x, 0, 1))
        return self.out(h)


def _fallback_case(name):
    rng = np.random.default_rng(1)
    y = rng.standard_normal((5, 3))
    if name == "nnx_scan":
        x = rng.standard_normal((5, 4, 2))
        graphdef, params, rest = dp_jax.nnx_split_params(NnxScan(nnx.Rngs(0)))
        return dp_jax.nnx_loss(graphdef, rest, "mse"), params, {"x": x, "y": y}
    model = {"regulariser": KernelRegulariser, "lifted": LiftedScanAndRemat,
             "tied": TiedEmbedding}[name]()
    x = {"regulariser": lambda: rng.standard_normal((5, 4)),
         "lifted": lambda: rng.standard_normal((5, 4, 2)),
         "tied": lambda: rng.integers(0, 6, (5, 4))}[name]()
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    return dp_jax.linen_loss(model, "mse"), params, {"x": x, "y": y}


@pytest.mark.parametrize("name,ghost", [
    # The regularised kernel is read outside the layer: only it falls back (its bias is fine).
    ("regulariser", {"['Dense_0']['bias']", "['Dense_1']['bias']", "['Dense_1']['kernel']"}),
    # Layers inside nn.scan / nn.remat run in another trace: not intercepted, not ghost.
    ("lifted", {"['Dense_0']['bias']", "['Dense_0']['kernel']"}),
    # Embed.attend reads the table outside __call__: the table falls back.
    ("tied", {"['Dense_0']['bias']", "['Dense_0']['kernel']"}),
    # An nnx layer called inside jax.lax.scan falls back too.
    ("nnx_scan", {"['out']['bias'].value", "['out']['kernel'].value"}),
])
def test_parameters_read_elsewhere_fall_back_and_stay_exact(name, ghost):
    loss_fn, params, batch = _fallback_case(name)
    _check_plan(loss_fn, params, batch, ghost)
    if name in ("lifted", "nnx_scan"):  # the plan says why the scanned layers fall back
        assert any("inside a scan" in note for note in ghost_plan(loss_fn, params, batch).notes)
    want, _ = loop_oracle(loss_fn, params, batch, range(5))
    c = float(np.median(core.per_example_norms(want)))
    got, aux = ghost_clipped_grad(loss_fn, c)(params, batch)
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, c), rtol=RTOL[F64],
                 atol=1e-13 * _scale(want))
    assert_close(aux.norms, core.per_example_norms(want), rtol=RTOL[F64])


def test_embedding_rules():
    class Embeds(nn.Module):
        @nn.compact
        def __call__(self, tokens):  # [1, 16]
            small = nn.Embed(2, 3, param_dtype=F64, name="small")(tokens % 2)  # 16^2 > 64 * 2
            single = nn.Embed(1, 3, param_dtype=F64, name="single")(tokens[:, :8] * 0)
            big = nn.Embed(40, 3, param_dtype=F64, name="big")(tokens)
            return jnp.mean(small * big, axis=1) + jnp.mean(single, axis=1)

    model = Embeds()
    tokens = np.random.default_rng(2).integers(-40, 40, (5, 16))
    batch = {"x": tokens, "y": np.ones((5, 3))}
    params = model.init(jax.random.key(0), tokens[:1])["params"]
    loss_fn = dp_jax.linen_loss(model, "mse")
    # A table with few rows and many ids per example is cheaper per example.
    _check_plan(loss_fn, params, batch, {"['big']['embedding']", "['single']['embedding']"})
    want, _ = loop_oracle(loss_fn, params, batch, range(5))
    c = float(np.median(core.per_example_norms(want)))
    got, aux = ghost_clipped_grad(loss_fn, c)(params, batch)
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, c), rtol=RTOL[F64],
                 atol=1e-13 * _scale(want))


def test_mixed_dtypes_match_loop():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(4, param_dtype=F32)(x))  # float64 input, float32 kernel
            h = jnp.tanh(nn.Dense(4, dtype=F32, param_dtype=F64)(h))  # float32 compute
            return nn.Dense(3, param_dtype=F64)(h)

    model = Mixed()
    x = np.random.default_rng(4).standard_normal((5, 3))
    batch = {"x": x, "y": np.zeros((5, 3))}
    params = model.init(jax.random.key(0), x[:1])["params"]
    loss_fn = dp_jax.linen_loss(model, "mse")
    assert len(ghost_plan(loss_fn, params, batch).ghost) == 6
    want, _ = loop_oracle(loss_fn, params, batch, range(5))
    c = float(np.median(core.per_example_norms(want)))
    got, _ = ghost_clipped_grad(loss_fn, c)(params, batch)
    assert [g.dtype for g in jax.tree_util.tree_leaves(got)] == [
        w.dtype for w in jax.tree_util.tree_leaves(params)]
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, c), rtol=RTOL[F32],
                 atol=1e-6 * _scale(want))


# --------------------------------------------------------------------------- jit and errors


def test_one_trace_per_shape_and_traced_bound():
    loss_fn, params, batch, *_ = float64_case("mlp")
    grad_fn = ghost_clipped_grad(loss_fn, 1.0)
    traces = []

    @jax.jit
    def step(p, b, m, c):
        traces.append(1)
        return grad_fn(p, b, m, max_grad_norm=c)

    first, aux1 = step(params, batch, MASK, 0.3)
    second, aux2 = step(params, batch, MASK, 0.7)
    assert len(traces) == 1
    vmap_fn = jax.jit(lambda p, b, m, c: dp_jax.clipped_grad(loss_fn, 1.0)(p, b, m,
                                                                          max_grad_norm=c))
    for c, (got, aux) in ((0.3, (first, aux1)), (0.7, (second, aux2))):
        want, want_aux = vmap_fn(params, batch, MASK, c)
        assert_close(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                     rtol=RTOL[F64], atol=1e-14)
        assert int(aux.num_unclipped) == int(want_aux.num_unclipped)
    # The nnx classes are patched only while a loss is being traced.
    assert nnx.Linear.__dict__["__call__"] is _NNX_LINEAR_CALL


def test_invalid_arguments_are_refused():
    loss_fn, params, batch, _ = make_case("mlp", F64)
    with pytest.raises(ValueError, match="clipping must be"):
        ghost_clipped_grad(loss_fn, 1.0, clipping="adaptive")
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        ghost_clipped_grad(loss_fn, -1.0)
    with pytest.raises(ValueError, match="needs a single positive max_grad_norm"):
        ghost_clipped_grad(loss_fn, [1.0, 2.0])
    grad_fn = ghost_clipped_grad(loss_fn, 1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        grad_fn(params, batch, max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"mask must have shape \(7,\)"):
        grad_fn(params, batch, np.ones(3, bool))
    with pytest.raises(ValueError, match='clipping="per_layer" needs max_grad_norm'):
        ghost_clipped_grad(loss_fn, [1.0], clipping="per_layer")(params, batch)
