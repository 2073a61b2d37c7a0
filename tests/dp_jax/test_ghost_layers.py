"""Ghost clipping of flax convolutions against the per-example definition, in float64.

Oracle: a Python loop of single-example ``jax.grad`` calls, clipped and summed by the
numpy reference of :mod:`dpcore.clipping` (``jax_enable_x64`` is on for the JAX suite,
see ``conftest.py``). Each model is run with the automatic choice between the Gram
form and the per-example form, and with each form forced, and the plan must name the
method of every parameter (:attr:`dp_jax.GhostPlan.methods`) so that a fall-back to
vmap cannot pass for ghost clipping.
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
from tests.dp_jax.test_ghost import loop_oracle
from tests.tolerance import assert_close

F64 = jnp.float64
RTOL = 1e-10
B = 5
MASK = np.array([1, 1, 0, 1, 1], bool)


class LinenConvs(nn.Module):
    """Strides, dilations, groups and every padding mode flax's ``Conv`` has, 1-d and 2-d."""

    @nn.compact
    def __call__(self, x):  # [1, 6, 6, 4]
        kw = {"param_dtype": F64}
        h = nn.Conv(4, (3, 3), strides=2, kernel_dilation=(1, 2), feature_group_count=2,
                    name="grouped", **kw)(x)
        h = h + nn.Conv(4, (2, 3), padding="CIRCULAR", use_bias=False, strides=(2, 2),
                        name="circular", **kw)(x)
        h = jnp.tanh(h) + nn.Conv(4, (3, 3), padding="REFLECT", strides=2, name="reflect",
                                  **kw)(x)
        h = nn.Conv(3, (2, 2), padding=((1, 0), (2, 1)), input_dilation=2, name="explicit",
                    **kw)(jnp.tanh(h))
        seq = jnp.reshape(h, (h.shape[0], -1, 3))  # a 1-d signal over the positions
        s = nn.Conv(2, (3,), padding="CAUSAL", kernel_dilation=2, name="causal", **kw)(seq)
        return nn.Dense(3, name="head", **kw)(jnp.mean(jnp.tanh(s), axis=1))


class NnxConvs(nnx.Module):
    """The same for ``flax.nnx.Conv``, with a convolution applied twice (shared kernel)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        kw = {"param_dtype": F64, "rngs": rngs}
        self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, padding="VALID", **kw)
        self.shared = nnx.Conv(4, 4, (1, 2), strides=(1, 2), kernel_dilation=1, **kw)
        self.causal = nnx.Conv(4, 3, (2,), padding="CAUSAL", **kw)

    def __call__(self, x):  # [1, 6, 6, 4]
        h = jnp.tanh(self.depthwise(x))  # [1, 4, 4, 4]
        h = jnp.tanh(self.shared(self.shared(h)))  # [1, 4, 1, 4]
        return jnp.mean(self.causal(jnp.reshape(h, (1, 4, 4))), axis=1)


@functools.lru_cache(maxsize=None)
def conv_case(name: str):
    """``(loss_fn, params, batch, per-example grads of the masked-in rows)``, cached."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, 6, 6, 4))
    x[2] = 1e3  # a padding row: finite garbage that must change nothing
    y = rng.standard_normal((B, 3))
    if name == "nnx":
        graphdef, params, rest = dp_jax.nnx_split_params(NnxConvs(nnx.Rngs(0)))
        loss_fn = dp_jax.nnx_loss(graphdef, rest, "mse")
    else:
        model = LinenConvs()
        params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
        loss_fn = dp_jax.linen_loss(model, "mse")
    batch = {"x": x, "y": y}
    want, _ = loop_oracle(loss_fn, params, batch, np.flatnonzero(MASK))
    return loss_fn, params, batch, want


def _all_paths(params) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _force(monkeypatch, form: str) -> None:
    if form != "auto":
        monkeypatch.setattr(_ghost_plan, "_use_direct", lambda *args: form == "per_example")


# The quick loop keeps the automatic choice on linen (its head takes the Gram form, its
# causal convolution the per-example form); the forced forms and nnx are slow.
@pytest.mark.parametrize("name,form", [
    ("linen", "auto"),
    pytest.param("linen", "gram", marks=pytest.mark.slow),
    pytest.param("linen", "per_example", marks=pytest.mark.slow),
    pytest.param("nnx", "auto", marks=pytest.mark.slow),
    pytest.param("nnx", "gram", marks=pytest.mark.slow),
    pytest.param("nnx", "per_example", marks=pytest.mark.slow)])
def test_convolutions_match_loop_float64(name, form, monkeypatch):
    _force(monkeypatch, form)
    loss_fn, params, batch, want = conv_case(name)
    plan = ghost_plan(loss_fn, params, batch)
    assert plan.fallback == () and set(plan.ghost) == set(_all_paths(params)), plan
    kernels = {p: m for p, m in plan.methods.items() if "kernel" in p}
    if form != "auto":
        assert set(kernels.values()) == {form}, plan.methods
    assert {m for p, m in plan.methods.items() if "bias" in p} == {"per_example"}
    rows = np.flatnonzero(MASK)
    norms = core.per_example_norms(want)
    c = float(np.median(norms))
    got, aux = ghost_clipped_grad(loss_fn, c)(params, batch, MASK)
    scale = max(float(np.max(np.abs(w))) for w in want)
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, c), rtol=RTOL,
                 atol=1e-13 * scale)
    assert_close(np.asarray(aux.norms)[rows], norms, rtol=RTOL)
    assert int(aux.num_unclipped) == core.count_unclipped(norms, c)


def test_automatic_choice_follows_the_cost():
    # Many positions, few channels: per-example products; few positions: Gram.
    assert _ghost_plan._use_direct(64, 1024, 27, 32)
    assert not _ghost_plan._use_direct(64, 16, 2304, 512)
    # Groups split the storage, not the comparison.
    assert _ghost_plan._use_direct(64, 256, 9, 1, groups=32)
    assert not _ghost_plan._use_direct(2**20, 256, 9, 8, groups=64)  # would not fit
    loss_fn, params, batch, _ = conv_case("linen")
    methods = ghost_plan(loss_fn, params, batch).methods
    assert methods["['head']['kernel']"] == "gram"  # no positions: |a|^2 |g|^2
    assert methods["['causal']['kernel']"] == "per_example"  # 9 positions, 3 x 3 window


@pytest.mark.slow
def test_per_layer_clipping_of_convolutions():
    loss_fn, params, batch, want = conv_case("nnx")
    rows = np.flatnonzero(MASK)
    layer = [np.sqrt(np.sum(w.reshape(len(rows), -1) ** 2, axis=1)) for w in want]
    bounds = [float(np.median(n)) for n in layer]
    got, aux = ghost_clipped_grad(loss_fn, bounds, clipping="per_layer")(params, batch, MASK)
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum_per_layer(want, bounds),
                 rtol=RTOL, atol=1e-13)
    assert_close([np.asarray(n)[rows] for n in jax.tree_util.tree_leaves(aux.layer_norms)],
                 layer, rtol=RTOL)
