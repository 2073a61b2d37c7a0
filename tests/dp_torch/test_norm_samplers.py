"""Norm samplers (ghost clipping) and batch-gradient samplers of every layer, against the loop oracle.

For one layer and a batch, the oracle runs the layer on each example alone and
backpropagates ``sum(G_i * out_i)`` with fixed random backprops ``G``: that gives example
``i``'s gradient ``grad_i`` for backprops ``G_i``. Then, in float64:

* the norm sampler, called with ``G``, returns ``||grad_i||`` per parameter;
* the batch-gradient sampler, called with ``c_i G_i`` (random ``c``, as ghost clipping's
  clip factors), returns ``sum_i c_i grad_i``;
* the grad sampler (where this file adds one) returns ``grad_i``.

Layers with a cost choice (Gram form or materialised) run with each route forced, and
lopsided shapes check that the choice itself picks the obviously cheaper route. At the
end: the DP recurrent layers, ``DPMultiheadAttention`` and a PEFT LoRA model get their
norms from norm samplers (never a materialising fallback), and a recurrence's per-time-step
calls are merged into one sampler run in hooks mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import dp_torch.grad_sample.conv as conv
import dp_torch.grad_sample.grad_sample_module as gsm_module
import dp_torch.grad_sample.linear as linear
from dp_torch.grad_sample import GradSampleModule, _ghost_cost, _registry
from dp_torch.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from tests.dp_torch.test_grad_sample import conv_configs
from tests.tolerance import assert_close

RTOL = 1e-10
SAME_PADDING_WARNING = "ignore:Using padding='same' with even kernel lengths:UserWarning"  # torch's, harmless


# --------------------------------------------------------------------------- the oracle


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def loop_grads(layer: nn.Module, example_inputs: Callable[[int], list], backprops: torch.Tensor) -> list[dict]:
    """``[{param: grad_i}]``: the gradient of ``sum(backprops[i] * layer(example i))`` per example."""
    grads = []
    for i in range(backprops.shape[0]):
        out = layer(*example_inputs(i))
        found = torch.autograd.grad((out * backprops[i : i + 1]).sum(), _trainable(layer))
        grads.append(dict(zip(_trainable(layer), found)))
    return grads


def _sampler(registry: dict, layer: nn.Module) -> Callable:
    sampler = _registry.find_sampler(registry, layer)
    assert sampler is not None, f"no sampler registered for {type(layer).__name__}"
    return sampler


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual.detach().numpy(), expected.detach().numpy(), rtol=RTOL, atol=RTOL * scale)


def check_samplers(layer: nn.Module, inputs: list, example_inputs: Callable[[int], list],
                   grad_sampler: bool = False) -> None:
    """Norm and batch-gradient samplers (and optionally the grad sampler) equal the loop oracle."""
    gen = torch.Generator().manual_seed(7)
    out = layer(*inputs)
    backprops = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    per_example = loop_grads(layer, example_inputs, backprops)
    params = _trainable(layer)
    norms = _sampler(_registry.NORM_SAMPLERS, layer)(layer, list(inputs), backprops)
    assert set(norms) == set(params)
    for p in params:
        _close(norms[p], torch.stack([g[p].norm() for g in per_example]))
    factors = torch.rand(backprops.shape[0], generator=gen, dtype=backprops.dtype)
    scaled = backprops * factors.view(-1, *[1] * (backprops.dim() - 1))
    sums = _sampler(_registry.BATCH_GRAD_SAMPLERS, layer)(layer, list(inputs), scaled)
    assert set(sums) == set(params)
    for p in params:
        _close(sums[p], sum(c * g[p] for c, g in zip(factors, per_example)))
    if grad_sampler:
        samples = _sampler(_registry.GRAD_SAMPLERS, layer)(layer, list(inputs), backprops)
        for p in params:
            _close(samples[p], torch.stack([g[p] for g in per_example]))


def check_batched(layer: nn.Module, x: torch.Tensor, grad_sampler: bool = False) -> None:
    """:func:`check_samplers` for a layer whose one input is batch first."""
    check_samplers(layer, [x], lambda i: [x[i : i + 1]], grad_sampler)


@pytest.fixture(params=[_ghost_cost.GRAM, _ghost_cost.PER_EXAMPLE, None], ids=["gram", "per_example", "auto"])
def route(request, monkeypatch) -> str:
    """Force the norm samplers' route (``None``: their own cost choice)."""
    monkeypatch.setattr(_ghost_cost, "FORCE_ROUTE", request.param)
    return request.param


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("shape", [(5, 3), (4, 6, 3), (3, 2, 4, 3), (3, 100, 3)],
                         ids=["flat", "sequence", "two_axes", "long_sequence"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(route, shape, bias) -> None:
    _seeded()
    layer = nn.Linear(shape[-1], 4, bias=bias).double()
    check_batched(layer, torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 31, 32, 64, 95, 128, 300])
def test_gram_products_by_blocks_equal_the_full_gram_products(steps) -> None:
    gen = torch.Generator().manual_seed(steps)
    a = torch.randn(3, steps, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(3, steps, 4, generator=gen, dtype=torch.float64)
    full = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
    definition = torch.stack([(g[i].T @ a[i]).pow(2).sum() for i in range(3)])
    _close(linear.gram_products(a, g), full)
    _close(linear.gram_products(a, g), definition)


def test_linear_frozen_weight_gives_bias_only() -> None:
    _seeded()
    layer = nn.Linear(3, 4).double()
    layer.weight.requires_grad_(False)
    check_batched(layer, torch.randn(5, 2, 3, dtype=torch.float64))


# --------------------------------------------------------------------------- convolutions


CONV_CASES = {
    "1d": dict(nd=1, c_in=4, c_out=6, kernel=3, spatial=(9,)),
    "1d_stride_dilation": dict(nd=1, c_in=3, c_out=4, kernel=3, stride=2, dilation=2, padding=1, spatial=(11,)),
    "1d_circular": dict(nd=1, c_in=2, c_out=4, kernel=3, padding=2, padding_mode="circular", spatial=(7,)),
    "2d": dict(nd=2, c_in=3, c_out=4, kernel=3, padding=1, spatial=(6, 5)),
    "2d_groups_stride": dict(nd=2, c_in=4, c_out=6, kernel=(3, 2), stride=(2, 1), groups=2, spatial=(7, 6)),
    "2d_depthwise_reflect": dict(nd=2, c_in=3, c_out=6, kernel=3, groups=3, padding=1, padding_mode="reflect",
                                 spatial=(5, 5)),
    "2d_same_even_kernel": dict(nd=2, c_in=2, c_out=3, kernel=(2, 4), padding="same", spatial=(5, 6)),
    "2d_replicate_dilation": dict(nd=2, c_in=2, c_out=2, kernel=2, dilation=2, padding=(1, 2),
                                  padding_mode="replicate", spatial=(6, 5), bias=False),
    "3d": dict(nd=3, c_in=2, c_out=4, kernel=2, stride=(1, 2, 1), groups=2, padding=1, spatial=(4, 5, 3)),
    "2d_many_positions": dict(nd=2, c_in=2, c_out=3, kernel=3, padding=1, groups=1, spatial=(12, 11)),
}


def make_conv(nd: int, c_in: int, c_out: int, kernel, spatial: tuple, batch: int = 4, **kwargs):
    layer = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd](c_in, c_out, kernel, **kwargs).double()
    return layer, torch.randn(batch, c_in, *spatial, dtype=torch.float64)


#: (forced route, per-example formulation): the Gram route does not use the formulation.
CONV_ROUTES = [(_ghost_cost.GRAM, None), (_ghost_cost.PER_EXAMPLE, "grouped"), (_ghost_cost.PER_EXAMPLE, "unfold"),
               (None, None)]


@pytest.mark.filterwarnings(SAME_PADDING_WARNING)
@pytest.mark.parametrize("forced, formulation", CONV_ROUTES, ids=["gram", "grouped", "unfold", "auto"])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv(name, forced, formulation, monkeypatch) -> None:
    monkeypatch.setattr(_ghost_cost, "FORCE_ROUTE", forced)
    monkeypatch.setattr(conv, "FORMULATION", formulation)
    _seeded()
    check_batched(*make_conv(**CONV_CASES[name]))


@pytest.mark.slow
@pytest.mark.filterwarnings(SAME_PADDING_WARNING)
@settings(max_examples=60, deadline=None)
@given(cfg=conv_configs(), batch=st.integers(1, 4), route_index=st.integers(0, len(CONV_ROUTES) - 1))
def test_conv_sweep(cfg, batch, route_index) -> None:
    """Random convolutions (any dimension, stride, dilation, groups, padding and padding mode)."""
    forced, formulation = CONV_ROUTES[route_index]
    old = _ghost_cost.FORCE_ROUTE, conv.FORMULATION
    _ghost_cost.FORCE_ROUTE, conv.FORMULATION = forced, formulation
    try:
        _seeded(batch)
        kwargs = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode", "bias")}
        check_batched(*make_conv(cfg["nd"], cfg["c_in"], cfg["c_out"], cfg["kernel"], cfg["spatial"], batch,
                                 **kwargs))
    finally:
        _ghost_cost.FORCE_ROUTE, conv.FORMULATION = old


def test_conv_empty_batch() -> None:
    layer, x = make_conv(nd=2, c_in=2, c_out=3, kernel=3, spatial=(4, 4), batch=0)
    g = torch.zeros(layer(x).shape, dtype=torch.float64)
    norms = _sampler(_registry.NORM_SAMPLERS, layer)(layer, [x], g)
    assert all(n.shape == (0,) for n in norms.values())
    sums = _sampler(_registry.BATCH_GRAD_SAMPLERS, layer)(layer, [x], g)
    assert all(float(s.abs().sum()) == 0.0 and s.shape == p.shape for p, s in sums.items())


# --------------------------------------------------------------------------- normalisation layers


NORM_LAYERS = {
    "layer_norm": (lambda: nn.LayerNorm(4), (5, 3, 4)),
    "layer_norm_2d_no_bias": (lambda: nn.LayerNorm((3, 4), bias=False), (5, 2, 3, 4)),
    "group_norm": (lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3)),
    "group_norm_1d": (lambda: nn.GroupNorm(1, 3), (4, 3, 6)),
    "rms_norm": (lambda: nn.RMSNorm(4, eps=1e-6), (5, 3, 4)),
    "instance_norm_1d": (lambda: nn.InstanceNorm1d(3, affine=True), (4, 3, 6)),
    "instance_norm_2d": (lambda: nn.InstanceNorm2d(3, affine=True), (4, 3, 4, 3)),
    "instance_norm_3d": (lambda: nn.InstanceNorm3d(2, affine=True), (4, 2, 3, 3, 2)),
}


@pytest.mark.parametrize("name", sorted(NORM_LAYERS))
def test_normalisation_layer(name) -> None:
    _seeded()
    make, shape = NORM_LAYERS[name]
    layer = make().double()
    with torch.no_grad():  # non-trivial affine parameters
        for p in layer.parameters():
            p.normal_()
    check_batched(layer, torch.randn(shape, dtype=torch.float64))


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(padding_idx) -> None:
    _seeded()
    layer = nn.Embedding(7, 3, padding_idx=padding_idx).double()
    check_batched(layer, torch.randint(0, 4, (5, 6)))  # few ids: repeats and padding tokens


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_bag_2d(mode, padding_idx) -> None:
    _seeded()
    layer = nn.EmbeddingBag(6, 3, mode=mode, padding_idx=padding_idx).double()
    ids = torch.randint(0, 4, (5, 4))
    ids[0] = 1  # a bag of padding only, when padding_idx is 1
    check_batched(layer, ids)


def _bag_case(layer: nn.EmbeddingBag, with_weights: bool) -> tuple[list, Callable[[int], list]]:
    """1-d ids with offsets (bag 2 empty), optional per-sample weights, one example per bag."""
    ids = torch.tensor([0, 2, 2, 5, 1, 3, 3, 3, 4, 0])
    bounds = [0, 3, 5, 5, 9, 10]
    weights = torch.rand(ids.shape, dtype=torch.float64) if with_weights else None
    last = layer.include_last_offset
    offsets = torch.tensor(bounds if last else bounds[:-1])

    def example(i: int) -> list:
        sl = slice(bounds[i], bounds[i + 1])
        ex_offsets = torch.tensor([0, bounds[i + 1] - bounds[i]] if last else [0])
        return [ids[sl], ex_offsets] + ([weights[sl]] if with_weights else [])

    return [ids, offsets] + ([weights] if with_weights else []), example


@pytest.mark.parametrize("mode, with_weights", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_offsets(mode, with_weights, include_last_offset) -> None:
    _seeded()
    layer = nn.EmbeddingBag(6, 3, mode=mode, padding_idx=3, include_last_offset=include_last_offset).double()
    inputs, example = _bag_case(layer, with_weights)
    check_samplers(layer, inputs, example)


def test_embedding_bag_max_is_refused() -> None:
    layer = nn.EmbeddingBag(5, 2, mode="max").double()
    ids = torch.randint(0, 5, (3, 2))
    with pytest.raises(NotImplementedError, match="mode='max'"):
        _sampler(_registry.NORM_SAMPLERS, layer)(layer, [ids], torch.ones(3, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- transformers' Conv1D


@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4)], ids=["flat", "sequence"])
def test_transformers_conv1d(route, shape) -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    _seeded()
    layer = Conv1D(5, shape[-1]).double()
    with torch.no_grad():
        layer.bias.normal_()
    check_batched(layer, torch.randn(shape, dtype=torch.float64), grad_sampler=True)


# --------------------------------------------------------------------------- the cost choice


class _Spy:
    """Wraps a module function and counts its calls."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls = 0
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("steps, width, expected", [(2, 256, "gram"), (256, 2, "per_example")])
def test_linear_cost_choice_on_lopsided_shapes(monkeypatch, steps, width, expected) -> None:
    """Two long positions of a wide layer: Gram form; many positions of a 2x2 layer: materialise."""
    gram = _Spy(monkeypatch, linear, "_gram_norms_squared")
    materialise = _Spy(monkeypatch, linear, "per_example_outer_sums")
    _seeded()
    check_batched(nn.Linear(width, width).double(), torch.randn(3, steps, width, dtype=torch.float64))
    assert (gram.calls, materialise.calls) == ((1, 0) if expected == "gram" else (0, 1))


@pytest.mark.parametrize("case, expected", [
    (dict(nd=2, c_in=64, c_out=64, kernel=3, spatial=(3, 3)), "gram"),           # 1 position, 36864 weights
    (dict(nd=2, c_in=8, c_out=8, kernel=3, padding=1, spatial=(24, 24)), "per_example"),  # 576 positions
    (dict(nd=1, c_in=1, c_out=1, kernel=1, spatial=(500,)), "per_example"),       # 1 weight
    (dict(nd=1, c_in=32, c_out=32, kernel=5, groups=2, spatial=(6,)), "gram"),     # 2 positions
])
def test_conv_cost_choice_on_lopsided_shapes(monkeypatch, case, expected) -> None:
    gram = _Spy(monkeypatch, conv, "_gram_weight_norms")
    materialise = _Spy(monkeypatch, conv, "_per_example_weight_grad")
    _seeded()
    layer, x = make_conv(**case)
    norms = _sampler(_registry.NORM_SAMPLERS, layer)(layer, [x], torch.randn(layer(x).shape, dtype=torch.float64))
    assert layer.weight in norms
    assert (gram.calls, materialise.calls) == ((1, 0) if expected == "gram" else (0, 1))


def test_conv_gram_route_counts_the_unfold() -> None:
    """Few positions but a huge kernel window per position and few outputs: the unfolded input
    (and its Gram) would cost more than the small per-example gradient."""
    layer, x = make_conv(nd=2, c_in=1, c_out=1, kernel=1, spatial=(2, 2), batch=2)
    g = torch.ones(layer(x).shape, dtype=torch.float64)
    assert conv.conv_norm_route(layer, g) == _ghost_cost.PER_EXAMPLE


# --------------------------------------------------------------------------- composite layers in the engines


class _Head(nn.Module):
    """A recurrent layer or attention returning its output tensor only."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x, x, x) if isinstance(self.inner, DPMultiheadAttention) else self.inner(x)
        return out[0]


#: Sizes such that every projection's per-example gradient is larger than its call's tensors
#: (ghost mode keeps smaller ones materialised, by design).
COMPOSITES = {
    "dp_lstm": lambda: DPLSTM(16, 8, num_layers=2, batch_first=True),
    "dp_gru_bidirectional": lambda: DPGRU(16, 8, batch_first=True, bidirectional=True),
    "dp_rnn": lambda: DPRNN(16, 8, batch_first=True),
    "dp_multihead_attention": lambda: DPMultiheadAttention(16, 2, batch_first=True, add_bias_kv=True),
}


def _composite(name: str) -> tuple[nn.Module, torch.Tensor]:
    _seeded()
    return _Head(COMPOSITES[name]()).double(), torch.randn(4, 5, 16, dtype=torch.float64)


def _forbid_fallback(monkeypatch) -> None:
    """Make the ``torch.func`` fallback (a layer without a sampler) fail the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a layer used the torch.func fallback")

    monkeypatch.setattr(gsm_module, "ft_compute_per_sample_gradient", boom)


def _spy_norm_sampler(monkeypatch, cls: type) -> list:
    """The layers the norm sampler of ``cls`` is called for, in order."""
    seen = []
    real = _registry.NORM_SAMPLERS[cls]
    monkeypatch.setitem(_registry.NORM_SAMPLERS, cls, lambda *a: seen.append(a[0]) or real(*a))
    return seen


def _expected_step(per_example: list[dict], params: list, bound: float) -> tuple[torch.Tensor, list]:
    """Per-example norms and the clipped sum ``sum_i min(1, C / (norm_i + 1e-6)) grad_i``."""
    norms = torch.stack([torch.sqrt(sum(g[p].pow(2).sum() for p in params)) for g in per_example])
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    return norms, [sum(c * g[p] for c, g in zip(factors, per_example)) for p in params]


def _ghost_step(model: nn.Module, x: torch.Tensor, backprops: torch.Tensor, bound: float) -> tuple:
    """Per-example norms and ``p.grad`` (the clipped sum) of one ghost-clipping backward pass."""
    from dp_torch.grad_sample import GradSampleModuleFastGradientClipping
    from dp_torch.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    class Criterion(nn.Module):
        reduction = "sum"

        def forward(self, out: torch.Tensor) -> torch.Tensor:
            losses = (out * backprops).reshape(out.shape[0], -1).sum(dim=1)
            return losses if self.reduction == "none" else losses.sum()

    class Opt:
        loss_reduction = "sum"

    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=bound)
    DPLossFastGradientClipping(gsm, Opt(), Criterion(), "sum")(gsm(x)).backward()
    return gsm.per_sample_gradient_norms, [p.grad for p in _trainable(model)]


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_layers_get_ghost_norms(monkeypatch, name) -> None:
    """Every layer of the DP recurrent layers and attention has a norm sampler, the projections
    (and every merged recurrence) run it, nothing uses the ``torch.func`` fallback, and the
    norms and the clipped sum are the loop's."""
    model, x = _composite(name)
    for layer in model.modules():
        if any(p.requires_grad for p in layer.parameters(recurse=False)):
            assert _registry.find_sampler(_registry.NORM_SAMPLERS, layer) is not None, type(layer).__name__
    backprops = torch.randn(model(x).shape, dtype=torch.float64)
    per_example = loop_grads(model, lambda i: [x[i : i + 1]], backprops)
    bound = float(torch.stack([sum(g.pow(2).sum() for g in d.values()) for d in per_example]).sqrt().median())
    norms, clipped = _expected_step(per_example, _trainable(model), bound)
    ghost_model = copy.deepcopy(model)
    seen = _spy_norm_sampler(monkeypatch, nn.Linear)
    _forbid_fallback(monkeypatch)
    got_norms, got_grads = _ghost_step(ghost_model, x, backprops, bound)
    _close(got_norms, norms)
    for got, want in zip(got_grads, clipped):
        _close(got, want)
    inner = ghost_model.inner
    if isinstance(inner, DPMultiheadAttention):
        expected_layers = [inner.qlinear, inner.klinear, inner.vlinear, inner.out_proj]
    else:
        expected_layers = [m for m in ghost_model.modules() if isinstance(m, nn.Linear)]
    assert {id(m) for m in expected_layers} <= {id(m) for m in seen}


@pytest.mark.parametrize("name", ["dp_lstm", "dp_gru_bidirectional"])
def test_recurrence_runs_one_sampler_per_layer_in_hooks_mode(monkeypatch, name) -> None:
    """The per-time-step calls of each ``RNNLinear`` are merged: one grad-sampler run per layer."""
    model, x = _composite(name)
    runs = []
    real = _registry.GRAD_SAMPLERS[nn.Linear]
    monkeypatch.setitem(_registry.GRAD_SAMPLERS, nn.Linear, lambda *a: runs.append(a[0]) or real(*a))
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    gsm(x).pow(2).sum().backward()
    linears = [m for m in gsm.modules() if isinstance(m, nn.Linear)]
    assert sorted(map(id, runs)) == sorted(map(id, linears))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_gets_ghost_norms_and_its_step_is_the_definition(monkeypatch) -> None:
    """An MLP with PEFT LoRA adapters: the trainable ``lora_A`` / ``lora_B`` layers are plain
    ``nn.Linear`` and run the Linear norm sampler, nothing uses the ``torch.func`` fallback,
    and one DP step equals the loop-of-single-examples definition (the zoo's check)."""
    pytest.importorskip("peft")
    from tests.zoo.test_torch_zoo import _check
    from tests.zoo.torch_models import build

    model = build("mlp_lora", torch.float64).model
    lora_layers = [n for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert len(lora_layers) == 4
    for layer in model.modules():
        if any(p.requires_grad for p in layer.parameters(recurse=False)):
            assert type(layer) is nn.Linear, type(layer).__name__
    seen = _spy_norm_sampler(monkeypatch, nn.Linear)
    _forbid_fallback(monkeypatch)
    _check("mlp_lora", "ghost", torch.float64)
    assert len({id(m) for m in seen}) == 4
