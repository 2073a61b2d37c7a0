"""The dp_jax model zoo: one DP-SGD step of small real flax models against the definition.

Models (:mod:`tests.dp_jax.zoo_models`): a GPT-2-shaped nnx transformer whose attention
and MLP projections are ``nnx.LoRALinear`` (trained LoRA-only, as PEFT users do, and fully),
a linen CNN with GroupNorm, an nnx language model with a tied embedding/unembedding and a
linen LSTM classifier (``nn.RNN`` over ``nn.LSTMCell``).

Oracle: the definition, from a loop of single-example ``jax.grad`` calls of a loss written
without dp_jax: per-example gradient, its L2 norm over all trainable leaves, clip factor
``min(1, C / (norm + 1e-6))``, sum (in float64). ``C`` is the median per-example norm, so
half of the examples are clipped. The check is the relative error over all trainable
leaves, ``||got - want|| / ||want||``, for ``vmap`` and ``ghost`` clipping, in float64 and
float32 (``jax_enable_x64`` is set once for the whole JAX test suite by ``conftest.py``;
float32 models use float32 parameters and inputs, which the tests assert).

Users' code is what runs: :func:`dp_jax.clipped_grad`, :func:`dp_jax.ghost_clipped_grad`,
and the :class:`dp_jax.PrivacyEngine` step with noise 0. In ghost mode the tests also
assert which parameters took the ghost path (:func:`dp_jax.ghost_plan`), so a fall-back to
vmap cannot pass for ghost clipping (LoRA factors, normalisation layers and the LSTM's
cell included), and a parameter ghost clipping cannot handle exactly (the tied table)
must fall back. A bfloat16 model
checks the precision rule of docs/design.md (float32 norms, factors and clipped sums);
:mod:`tests.dp_jax.test_mixed_precision` runs whole bfloat16 DP steps.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dp_jax
from tests.dp_jax import zoo_models
from tests.dp_jax.zoo_models import BATCH, BUILDERS

RTOL = {"float64": 1e-9, "float32": 1e-5}
GRAD_FNS = {"vmap": dp_jax.clipped_grad, "ghost": dp_jax.ghost_clipped_grad}


def _paths(prefix: str, names: tuple[str, ...], leaves: tuple[str, ...]) -> set[str]:
    return {f"{prefix}['{n}']['{leaf}']" for n in names for leaf in leaves}


_LORA_LAYERS = ("query", "key", "value", "proj", "up", "down")
_LORA_FACTORS = {f"['block']['{n}']['lora']['{f}'].value" for n in _LORA_LAYERS
                 for f in ("lora_a", "lora_b")}
_LN = ("ln_attn", "ln_mlp")
EXPECTED_GHOST = {
    # The LoRA factors: x @ a, then (x @ a) @ b, two dense maps.
    "gpt_lora": _LORA_FACTORS,
    # Everything: base projections, LoRA factors, LayerNorms, head and both embeddings.
    "gpt_full": {p + ".value" for p in _paths("['block']", _LORA_LAYERS, ("kernel", "bias"))}
    | {p + ".value" for p in _paths("['block']", _LN, ("scale", "bias"))}
    | {"['ln_f']['scale'].value", "['ln_f']['bias'].value"} | _LORA_FACTORS
    | {"['head']['kernel'].value", "['head']['bias'].value",
       "['wte']['embedding'].value", "['wpe']['embedding'].value"},
    # Convolutions, GroupNorms and the dense head.
    "cnn": _paths("", ("Dense_0", "Dense_1", "Conv_0", "Conv_1"), ("kernel", "bias"))
    | _paths("", ("GroupNorm_0", "GroupNorm_1"), ("scale", "bias")),
    # The tied table is also read by Embed.attend: it must fall back.
    "tied": {"['mix']['kernel'].value", "['mix']['bias'].value", "['wpe']['embedding'].value",
             "['norm']['scale'].value", "['norm']['bias'].value"},
    # The RNN is unrolled: the cell's eight dense layers are ghost over the steps.
    "lstm": _paths("['LSTMCell_0']", ("ii", "if", "ig", "io"), ("kernel",))
    | _paths("['LSTMCell_0']", ("hi", "hf", "hg", "ho"), ("kernel", "bias"))
    | {"['embed']['embedding']"} | _paths("", ("norm",), ("scale", "bias"))
    | _paths("", ("head",), ("kernel", "bias")),
}


class Reference(NamedTuple):
    """A zoo case and its clipped sum by the definition."""

    case: zoo_models.ZooCase
    norms: np.ndarray  # [B] per-example L2 norms over all trainable leaves
    bound: float  # the median of ``norms``
    clipped: list[np.ndarray]  # the clipped sum, leaf by leaf, float64


def _example(batch: dict[str, np.ndarray], i: int) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v[i]) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def reference(name: str, dtype: str) -> Reference:
    """The definition from a loop of single-example ``jax.grad`` calls (cached)."""
    case = BUILDERS[name](jnp.dtype(dtype))
    grad = jax.jit(jax.grad(case.oracle_loss))
    per_example = []
    for i in range(BATCH):
        leaves = jax.tree_util.tree_leaves(grad(case.params, _example(case.batch, i)))
        assert all(g.dtype == jnp.dtype(dtype) for g in leaves)
        per_example.append([np.asarray(g, np.float64) for g in leaves])
    norms = np.array([np.sqrt(sum(np.sum(g**2) for g in grads)) for grads in per_example])
    bound = float(np.median(norms))
    factors = np.minimum(1.0, bound / (norms + 1e-6))
    clipped = [sum(f * grads[j] for f, grads in zip(factors, per_example))
               for j in range(len(per_example[0]))]
    return Reference(case, norms, bound, clipped)


def rel_error(got: Any, want: list[np.ndarray]) -> float:
    """``||got - want|| / ||want||`` over all leaves together."""
    leaves = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(got)]
    assert [g.shape for g in leaves] == [w.shape for w in want]
    diff = sum(np.sum((g - w) ** 2) for g, w in zip(leaves, want))
    return float(np.sqrt(diff / sum(np.sum(w**2) for w in want)))


def _assert_plan(name: str, case: zoo_models.ZooCase) -> None:
    plan = dp_jax.ghost_plan(case.loss_fn, case.params, case.batch)
    assert set(plan.ghost) == EXPECTED_GHOST[name], plan
    assert plan.notes == ()
    assert len(plan.ghost) + len(plan.fallback) == len(jax.tree_util.tree_leaves(case.params))


def _cases() -> list:
    """Every model, mode and dtype; the LSTM's vmap and float32 runs are slow."""
    out = []
    for name in BUILDERS:
        for mode in GRAD_FNS:
            for dtype in RTOL:
                slow = name == "lstm" and (mode, dtype) != ("ghost", "float64")
                marks = [pytest.mark.slow] if slow else []
                out.append(pytest.param(name, mode, dtype, marks=marks))
    return out


@pytest.mark.parametrize("name,mode,dtype", _cases())
def test_clipped_sum_matches_definition(name, mode, dtype):
    ref = reference(name, dtype)
    case = ref.case
    if mode == "ghost":
        _assert_plan(name, case)
    got, aux = jax.jit(GRAD_FNS[mode](case.loss_fn, ref.bound))(case.params, case.batch)
    assert all(g.dtype == jnp.dtype(dtype) for g in jax.tree_util.tree_leaves(got))
    assert rel_error(got, ref.clipped) <= RTOL[dtype]
    np.testing.assert_allclose(np.asarray(aux.norms), ref.norms, rtol=RTOL[dtype])
    assert int(aux.num_unclipped) == int(np.sum(ref.norms <= ref.bound)) == BATCH // 2
    assert (int(aux.num_examples), int(aux.num_nonfinite)) == (BATCH, 0)


@pytest.mark.parametrize("mode", list(GRAD_FNS))
@pytest.mark.parametrize("name", ["tied", pytest.param("gpt_full", marks=pytest.mark.slow),
                                  pytest.param("cnn", marks=pytest.mark.slow)])
def test_engine_step_with_zero_noise_takes_the_clipped_sum(name, mode):
    ref = reference(name, "float64")
    case = ref.case
    lr = 1e3  # the update dominates the parameters: their difference keeps its precision
    private = dp_jax.PrivacyEngine().make_private(
        loss_fn=case.loss_fn, params=case.params, optimizer=optax.sgd(lr), data=case.batch,
        noise_multiplier=0.0, max_grad_norm=ref.bound, sample_rate=0.5, loss_reduction="sum",
        grad_sample_mode=mode, seed=0)
    state, metrics = private.step(private.state, case.batch, np.ones(BATCH, bool), True)
    assert bool(metrics["applied"]) and int(state.step) == 1
    update = jax.tree_util.tree_map(lambda old, new: (old - new) / lr, case.params, state.params)
    assert rel_error(update, ref.clipped) <= RTOL["float64"]


@pytest.mark.parametrize("mode,rtol", [("vmap", 1e-5), ("ghost", 1e-3)])
def test_bfloat16_model_is_clipped_with_float32_norms(mode, rtol):
    # docs/design.md, precision: norms and clip factors are float32 or wider whatever the
    # model's dtype. Norms summed in bfloat16 were off by up to 1% here, and so were the
    # clip factors: a clipped example could exceed the bound. vmap clips the bfloat16
    # per-example gradients (rtol: float32 rounding); ghost forms A^T G in float32 from
    # bfloat16 A and G, which the rounded per-example gradients differ from slightly.
    case = BUILDERS["tied"](jnp.bfloat16)
    per_example = jax.jit(functools.partial(dp_jax.per_example_grads, case.loss_fn))(
        case.params, case.batch)
    leaves = [np.asarray(g, np.float64).reshape(BATCH, -1)
              for g in jax.tree_util.tree_leaves(per_example)]
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree_util.tree_leaves(per_example))
    norms = np.sqrt(sum(np.sum(g**2, axis=1) for g in leaves))
    bound = float(np.median(norms))
    got, aux = jax.jit(GRAD_FNS[mode](case.loss_fn, bound))(case.params, case.batch)
    assert aux.norms.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(aux.norms, np.float64), norms, rtol=rtol)
    assert int(aux.num_unclipped) == BATCH // 2
    factors = np.minimum(1.0, bound / (norms + 1e-6))
    want = [np.tensordot(factors, g, axes=1) for g in leaves]
    got_leaves = jax.tree_util.tree_leaves(got)
    assert all(g.dtype == jnp.float32 for g in got_leaves)  # never rounded to bfloat16
    assert rel_error([g.reshape(-1) for g in got_leaves], want) <= 2**-8
