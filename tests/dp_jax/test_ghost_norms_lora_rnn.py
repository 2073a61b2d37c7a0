"""Ghost clipping of normalisation layers, LoRA factors and unrolled RNNs, in float64.

Oracle: a Python loop of single-example ``jax.grad`` calls, clipped and summed by the
numpy reference of :mod:`dpcore.clipping` (``jax_enable_x64`` is on for the JAX suite).
The plan must name the method of every parameter, so a fall-back to vmap cannot pass for
ghost clipping; the cell kernels of the RNNs are run with each form forced (LoRA factors
and dense layers over several rows too). Calls the ghost path leaves to vmap (a long
sequence, a cell it does not unroll) must be named in :attr:`dp_jax.GhostPlan.notes`.
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
from dp_jax import _ghost_rnn
from dp_jax._ghost import ghost_clipped_grad, ghost_plan
from dpcore import clipping as core
from tests.dp_jax.test_ghost import loop_oracle
from tests.dp_jax.test_ghost_layers import _all_paths, _force
from tests.tolerance import assert_close

F64 = jnp.float64
RTOL = 1e-10
B = 4
T = 2
MASK = np.array([1, 0, 1, 1], bool)


class LinenNormsLSTM(nn.Module):
    """The linen normalisation layers, an LSTM over the positions, a dense head.

    The cell is ``OptimizedLSTMCell`` (one product of its concatenated kernels per
    step, run gate by gate by the ghost path); the zoo has ``LSTMCell``.
    """

    @nn.compact
    def __call__(self, x):  # [1, T, 4]
        kw = {"param_dtype": F64}
        h = nn.RMSNorm(name="rms", **kw)(jnp.tanh(nn.LayerNorm(name="ln", **kw)(x)))
        h = nn.GroupNorm(num_groups=2, name="gn", **kw)(h)
        h = nn.RNN(nn.OptimizedLSTMCell(3, param_dtype=F64), name="rnn")(h)
        return nn.Dense(3, name="head", **kw)(jnp.mean(h, axis=1))


class NnxLoRAGRU(nnx.Module):
    """LoRALinear, the nnx normalisation layers, a standalone LoRA and a GRU."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        kw = {"param_dtype": F64, "rngs": rngs}
        self.inp = nnx.LoRALinear(4, 6, lora_rank=2, lora_param_dtype=F64, **kw)
        self.ln = nnx.LayerNorm(6, **kw)
        self.rms = nnx.RMSNorm(6, **kw)
        self.gn = nnx.GroupNorm(6, num_groups=2, **kw)
        self.lora = nnx.LoRA(6, 2, 5, **kw)
        self.rnn = nnx.RNN(nnx.GRUCell(5, 4, **kw), rngs=False)
        self.head = nnx.Linear(4, 3, **kw)

    def __call__(self, x):  # [1, T, 4]
        h = self.gn(self.rms(jnp.tanh(self.ln(self.inp(x)))))
        h = self.rnn(jnp.tanh(self.lora(h)), initial_carry=jnp.zeros((x.shape[0], 4), F64))
        return self.head(jnp.mean(h, axis=1))


def _nnx_params(module: nnx.Module, seed: int):
    """``nnx_split_params`` with every parameter random (LoRA's zero ``B`` included)."""
    graphdef, params, rest = dp_jax.nnx_split_params(module)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(0.7 * rng.standard_normal(p.shape)),
                                    params)
    return graphdef, params, rest


@functools.lru_cache(maxsize=None)
def case(name: str):
    """``(loss_fn, params, batch, per-example grads of the masked-in rows)``, cached."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((B, T, 4))
    x[1] = 1e3  # a padding row: finite garbage that must change nothing
    batch = {"x": x, "y": rng.standard_normal((B, 3))}
    if name == "nnx":
        graphdef, params, rest = _nnx_params(NnxLoRAGRU(nnx.Rngs(0)), 1)
        loss_fn = dp_jax.nnx_loss(graphdef, rest, "mse")
    else:
        model = LinenNormsLSTM()
        params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
        loss_fn = dp_jax.linen_loss(model, "mse")
    want, _ = loop_oracle(loss_fn, params, batch, np.flatnonzero(MASK))
    return loss_fn, params, batch, want


def _is_norm(path: str) -> bool:
    return any(f"['{n}']" in path for n in ("ln", "rms", "gn"))


@pytest.mark.parametrize("name,form", [
    ("linen", "gram"), ("nnx", "per_example"),
    pytest.param("linen", "auto", marks=pytest.mark.slow),
    pytest.param("linen", "per_example", marks=pytest.mark.slow),
    pytest.param("nnx", "auto", marks=pytest.mark.slow),
    pytest.param("nnx", "gram", marks=pytest.mark.slow)])
def test_norms_lora_and_rnn_cells_match_loop_float64(name, form, monkeypatch):
    _force(monkeypatch, form)
    loss_fn, params, batch, want = case(name)
    plan = ghost_plan(loss_fn, params, batch)
    assert plan.fallback == () and set(plan.ghost) == set(_all_paths(params)), plan
    assert plan.notes == ()
    # Normalisation layers and biases: per-example [B, C] vectors whatever the form.
    assert {m for p, m in plan.methods.items() if _is_norm(p) or "bias" in p} == {"per_example"}
    # Kernels over several rows (the cells' over the steps, the LoRA factors over the
    # positions) take the forced form.
    several = {m for p, m in plan.methods.items()
               if ("kernel" in p or "lora_" in p) and "head" not in p}
    assert several == ({form} if form != "auto" else {"per_example"}), plan.methods
    rows = np.flatnonzero(MASK)
    norms = core.per_example_norms(want)
    c = float(np.median(norms)) * (1 + 1e-6)  # the median of 3 norms is one: just above it
    got, aux = ghost_clipped_grad(loss_fn, c)(params, batch, MASK)
    scale = max(float(np.max(np.abs(w))) for w in want)
    assert_close(jax.tree_util.tree_leaves(got), core.clip_and_sum(want, c), rtol=RTOL,
                 atol=1e-13 * scale)
    assert_close(np.asarray(aux.norms)[rows], norms, rtol=RTOL)
    assert int(aux.num_unclipped) == core.count_unclipped(norms, c)


class SubclassedCell(nn.LSTMCell):
    """A user's cell: the ghost path cannot know what it reads, so it does not unroll it."""


class LinenRecurrent(nn.Module):
    """An RNN the ghost path does not unroll (``cell``), then a dense head."""

    cell: str

    @nn.compact
    def __call__(self, x):
        cell = {"subclassed": SubclassedCell, "lstm": nn.LSTMCell}[self.cell]
        h = nn.RNN(cell(2, param_dtype=F64), name="rnn")(x)
        return nn.Dense(3, name="head", param_dtype=F64)(h[:, -1])


@pytest.mark.parametrize("cell,steps,why", [
    ("lstm", _ghost_rnn.MAX_STEPS + 1, f"{_ghost_rnn.MAX_STEPS + 1} steps > "),
    ("subclassed", 2, "cell SubclassedCell"),
])
def test_rnns_not_unrolled_fall_back_and_the_plan_says_why(cell, steps, why):
    model = LinenRecurrent(cell)
    x = jax.ShapeDtypeStruct((B, steps, 2), F64)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, steps, 2), F64))
    batch = {"x": x, "y": jax.ShapeDtypeStruct((B, 3), F64)}
    plan = ghost_plan(dp_jax.linen_loss(model, "mse"), shapes["params"], batch)
    assert set(plan.ghost) == {"['head']['kernel']", "['head']['bias']"}, plan
    assert all(m == "vmap" for p, m in plan.methods.items() if "rnn" in p)
    assert len(plan.notes) == 1 and why in plan.notes[0] and "'rnn'" in plan.notes[0], plan.notes
