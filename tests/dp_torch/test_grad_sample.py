"""Per-sample gradients of every supported layer equal a loop of batch-size-1 backward passes.

Shapes are drawn by hypothesis (derandomised, so CI is deterministic). ``batch_first=False``
is exercised on the layers that see ``[T, batch, ...]`` inputs (Linear, Embedding,
LayerNorm, RMSNorm, the torch.func fallback); convolutions, GroupNorm, InstanceNorm and
EmbeddingBag take the batch on dimension 0 by definition.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dp_torch.test_grad_sample_oracle import (
    Case,
    assert_grads_close,
    gsm_grad_samples,
    loop_per_example_grads,
)

SLOW_EXAMPLES = 100


def _property(fast: int, *marks, **strategies):
    """Build a quick hypothesis test (``fast`` examples) and a slow sweep of the same body.

    Returns:
        A decorator mapping the body to ``(quick_test, slow_sweep)``.
    """

    def decorate(body):
        tests = []
        for n in (fast, SLOW_EXAMPLES):
            test = settings(deadline=None, max_examples=n, derandomize=True)(given(**strategies)(body))
            for mark in marks:
                test = mark(test)
            tests.append(test)
        tests[1] = pytest.mark.slow(tests[1])
        return tuple(tests)

    return decorate
DTYPES = st.sampled_from([torch.float64, torch.float32])
REDUCTIONS = st.sampled_from(["mean", "sum"])


def _batched(x: torch.Tensor, batch_dim: int) -> callable:
    return lambda i: x.narrow(batch_dim, i, 1)


def _sequence_input(draw, batch: int, feature_shape: tuple, batch_first: bool, dtype, *, integer_high=None):
    """A tensor ``[B, *mid, *feature]`` (batch first) or ``[T, B, *mid, *feature]``."""
    mid = draw(st.lists(st.integers(1, 3), min_size=0 if batch_first else 1, max_size=2))
    shape = [batch, *mid] if batch_first else [mid[0], batch, *mid[1:]]
    shape += list(feature_shape)
    if integer_high is not None:
        return torch.randint(0, integer_high, shape)
    return torch.randn(shape, dtype=dtype)


def _check(case: Case, dtype, loss_reduction: str, **gsm_kwargs) -> None:
    expected, _ = loop_per_example_grads(case)
    actual, _ = gsm_grad_samples(case, loss_reduction, **gsm_kwargs)
    assert_grads_close(actual, expected, dtype)


def _single_layer_case(layer: nn.Module, x: torch.Tensor, batch: int, batch_dim: int) -> Case:
    return Case(layer, (x,), lambda i: (x.narrow(batch_dim, i, 1),), batch, batch_dim)


# --------------------------------------------------------------------------- Linear


def _linear(data, dtype, loss_reduction, batch_first, batch, d_in, d_out, bias) -> None:
    torch.manual_seed(batch * 31 + d_in)
    layer = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    x = _sequence_input(data.draw, batch, (d_in,), batch_first, dtype)
    _check(_single_layer_case(layer, x, batch, 0 if batch_first else 1), dtype, loss_reduction)


test_linear, test_linear_sweep = _property(
    12, data=st.data(), dtype=DTYPES, loss_reduction=REDUCTIONS, batch_first=st.booleans(),
    batch=st.integers(1, 5), d_in=st.integers(1, 5), d_out=st.integers(1, 5), bias=st.booleans()
)(_linear)


# --------------------------------------------------------------------------- Conv


@st.composite
def conv_configs(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2, "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    modes = ["zeros"] if padding in (0, "valid") else ["zeros", "reflect", "replicate", "circular"]
    padding_mode = draw(st.sampled_from(modes))
    reach = [dilation * (k - 1) + 1 for k in kernel]
    spatial = tuple(draw(st.integers(max(r, 3), r + 3)) for r in reach)
    return dict(nd=nd, c_in=c_in, c_out=c_out, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, groups=groups, padding_mode=padding_mode, spatial=spatial,
                bias=draw(st.booleans()))


@contextlib.contextmanager
def _conv_formulation(name: str):
    import dp_torch.grad_sample.conv as conv

    old, conv.FORMULATION = conv.FORMULATION, name
    try:
        yield
    finally:
        conv.FORMULATION = old


SAME_PADDING_WARNING = "ignore:Using padding='same' with even kernel lengths:UserWarning"  # torch's, harmless


def _conv(cfg, dtype, loss_reduction, batch) -> None:
    torch.manual_seed(batch)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[cfg["nd"]]
    layer = cls(cfg["c_in"], cfg["c_out"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
                padding_mode=cfg["padding_mode"]).to(dtype)
    x = torch.randn(batch, cfg["c_in"], *cfg["spatial"], dtype=dtype)
    for formulation in ("grouped", "unfold"):
        with _conv_formulation(formulation):
            _check(_single_layer_case(layer, x, batch, 0), dtype, loss_reduction)


test_conv, test_conv_sweep = _property(
    20, pytest.mark.filterwarnings(SAME_PADDING_WARNING),
    cfg=conv_configs(), dtype=DTYPES, loss_reduction=REDUCTIONS, batch=st.integers(1, 4),
)(_conv)


@pytest.mark.filterwarnings(SAME_PADDING_WARNING)
@pytest.mark.parametrize("nd, kernel, dilation, padding, padding_mode, stride", [
    (1, 2, 1, "same", "zeros", 1),      # asymmetric: total padding 1
    (2, (2, 3), 1, "same", "zeros", 1),
    (2, (4, 2), 1, "same", "reflect", 1),
    (3, (2, 1, 2), 1, "same", "zeros", 1),
    (2, 3, 2, "same", "circular", 1),
    (1, 3, 1, 2, "replicate", 2),
    (2, (3, 2), (1, 2), (1, 0), "zeros", (2, 1)),
    (3, 2, 1, "valid", "zeros", 2),
])
def test_conv_padding_variants(nd, kernel, dilation, padding, padding_mode, stride) -> None:
    torch.manual_seed(nd)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    layer = cls(2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=2,
                padding_mode=padding_mode).double()
    x = torch.randn(3, 2, *([6] * nd), dtype=torch.float64)
    for formulation in ("grouped", "unfold"):
        with _conv_formulation(formulation):
            _check(_single_layer_case(layer, x, 3, 0), torch.float64, "mean")


# --------------------------------------------------------------------------- Embedding


def _embedding(data, dtype, loss_reduction, batch_first, batch, vocab, dim, use_padding,
                   scale_grad_by_freq) -> None:
    torch.manual_seed(vocab * 7 + batch)
    padding_idx = data.draw(st.integers(-vocab, vocab - 1)) if use_padding else None
    layer = nn.Embedding(vocab, dim, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq).to(dtype)
    ids = _sequence_input(data.draw, batch, (), batch_first, dtype, integer_high=vocab)
    _check(_single_layer_case(layer, ids, batch, 0 if batch_first else 1), dtype, loss_reduction)


test_embedding, test_embedding_sweep = _property(
    12, data=st.data(), dtype=DTYPES, loss_reduction=REDUCTIONS, batch_first=st.booleans(),
    batch=st.integers(1, 5), vocab=st.integers(2, 7), dim=st.integers(1, 4),
    use_padding=st.booleans(), scale_grad_by_freq=st.booleans()
)(_embedding)


@st.composite
def bag_batches(draw, vocab: int):
    batch = draw(st.integers(1, 4))
    two_d = draw(st.booleans())
    if two_d:
        length = draw(st.integers(1, 4))
        return [draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length)) for _ in range(batch)], True
    return [draw(st.lists(st.integers(0, vocab - 1), min_size=0, max_size=4)) for _ in range(batch)], False


class _Bag(nn.Module):
    """EmbeddingBag called with offsets and per_sample_weights, by position or by keyword."""

    def __init__(self, bag: nn.EmbeddingBag, positional: bool):
        super().__init__()
        self.bag = bag
        self.positional = positional

    def forward(self, ids, offsets, weights):
        if self.positional:
            return self.bag(ids, offsets, weights)
        return self.bag(ids, offsets=offsets, per_sample_weights=weights)


def _embedding_bag(data, dtype, loss_reduction, vocab, dim, mode, use_padding, include_last_offset,
                   use_weights, positional) -> None:
    torch.manual_seed(vocab + dim)
    bags, two_d = data.draw(bag_batches(vocab))
    batch = len(bags)
    padding_idx = data.draw(st.integers(0, vocab - 1)) if use_padding else None
    use_weights = use_weights and mode == "sum"
    if two_d:
        layer = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=padding_idx).to(dtype)
        ids = torch.tensor(bags)
        weights = torch.randn(ids.shape, dtype=dtype) if use_weights else None
        model = _Bag(layer, positional)
        offsets = None
        case = Case(model, (ids, offsets, weights),
                    lambda i: (ids[i : i + 1], None, None if weights is None else weights[i : i + 1]), batch)
    else:
        layer = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=padding_idx,
                                include_last_offset=include_last_offset).to(dtype)
        ids = torch.tensor([t for bag in bags for t in bag], dtype=torch.long)
        starts = [0]
        for bag in bags:
            starts.append(starts[-1] + len(bag))
        offsets = torch.tensor(starts if include_last_offset else starts[:-1])
        weights = torch.randn(ids.shape, dtype=dtype) if use_weights else None

        def example(i: int) -> tuple:
            lo, hi = starts[i], starts[i + 1]
            off = torch.tensor([0, hi - lo] if include_last_offset else [0])
            return ids[lo:hi], off, None if weights is None else weights[lo:hi]

        case = Case(_Bag(layer, positional), (ids, offsets, weights), example, batch)
    _check(case, dtype, loss_reduction)


test_embedding_bag, test_embedding_bag_sweep = _property(
    25, data=st.data(), dtype=DTYPES, loss_reduction=REDUCTIONS, vocab=st.integers(2, 6), dim=st.integers(1, 3),
    mode=st.sampled_from(["sum", "mean"]), use_padding=st.booleans(), include_last_offset=st.booleans(),
    use_weights=st.booleans(), positional=st.booleans(),
)(_embedding_bag)


# --------------------------------------------------------------------------- normalisation layers


def _layer_norm(data, dtype, loss_reduction, batch_first, batch, normalized_shape, bias) -> None:
    if normalized_shape[-1] == 1:  # a single normalised element: x_hat is 0, the test degenerate
        normalized_shape[-1] = 2
    torch.manual_seed(batch)
    layer = nn.LayerNorm(normalized_shape, bias=bias).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = _sequence_input(data.draw, batch, tuple(normalized_shape), batch_first, dtype)
    _check(_single_layer_case(layer, x, batch, 0 if batch_first else 1), dtype, loss_reduction)


test_layer_norm, test_layer_norm_sweep = _property(
    12, data=st.data(), dtype=DTYPES, loss_reduction=REDUCTIONS, batch_first=st.booleans(), batch=st.integers(1, 4),
    normalized_shape=st.lists(st.integers(1, 4), min_size=1, max_size=2), bias=st.booleans()
)(_layer_norm)


def _rms_norm(data, dtype, loss_reduction, batch_first, batch, normalized_shape, eps) -> None:
    torch.manual_seed(batch)
    layer = nn.RMSNorm(normalized_shape, eps=eps).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
    x = _sequence_input(data.draw, batch, tuple(normalized_shape), batch_first, dtype)
    _check(_single_layer_case(layer, x, batch, 0 if batch_first else 1), dtype, loss_reduction)


test_rms_norm, test_rms_norm_sweep = _property(
    12, data=st.data(), dtype=DTYPES, loss_reduction=REDUCTIONS, batch_first=st.booleans(), batch=st.integers(1, 4),
    normalized_shape=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    eps=st.sampled_from([None, 1e-5, 0.1])
)(_rms_norm)


def _group_norm(dtype, loss_reduction, batch, groups, per_group, spatial) -> None:
    torch.manual_seed(batch)
    if per_group * (spatial[0] if spatial else 1) * (spatial[1] if len(spatial) > 1 else 1) == 1:
        per_group = 2  # a single element per group: x_hat is 0, the test degenerate
    channels = groups * per_group
    layer = nn.GroupNorm(groups, channels).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(batch, channels, *spatial, dtype=dtype)
    _check(_single_layer_case(layer, x, batch, 0), dtype, loss_reduction)


test_group_norm, test_group_norm_sweep = _property(
    12, dtype=DTYPES, loss_reduction=REDUCTIONS, batch=st.integers(1, 4), groups=st.integers(1, 3),
    per_group=st.integers(1, 3), spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2)
)(_group_norm)


def _instance_norm(dtype, loss_reduction, batch, nd, channels, data) -> None:
    torch.manual_seed(batch + nd)
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[nd]
    layer = cls(channels, affine=True).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    spatial = [data.draw(st.integers(2, 4)) for _ in range(nd)]
    x = torch.randn(batch, channels, *spatial, dtype=dtype)
    _check(_single_layer_case(layer, x, batch, 0), dtype, loss_reduction)


test_instance_norm, test_instance_norm_sweep = _property(
    12, dtype=DTYPES, loss_reduction=REDUCTIONS, batch=st.integers(1, 4), nd=st.sampled_from([1, 2, 3]),
    channels=st.integers(1, 3), data=st.data()
)(_instance_norm)


# --------------------------------------------------------------------------- torch.func fallback


class ScaledTanh(nn.Module):
    """A layer with no registered sampler: ``tanh(x * scale) @ weight + sin(offset)``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d_in))
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.offset = nn.Parameter(torch.randn(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale) @ self.weight + torch.sin(self.offset)


def _functorch_fallback(data, dtype, loss_reduction, batch_first, batch, d_in, d_out) -> None:
    torch.manual_seed(batch + d_in)
    layer = ScaledTanh(d_in, d_out).to(dtype)
    x = _sequence_input(data.draw, batch, (d_in,), batch_first, dtype)
    _check(_single_layer_case(layer, x, batch, 0 if batch_first else 1), dtype, loss_reduction)


test_functorch_fallback, test_functorch_fallback_sweep = _property(
    12, data=st.data(), dtype=DTYPES, loss_reduction=REDUCTIONS, batch_first=st.booleans(), batch=st.integers(1, 4),
    d_in=st.integers(1, 4), d_out=st.integers(1, 3)
)(_functorch_fallback)


@pytest.mark.parametrize("layer_factory", [
    lambda: nn.Linear(3, 2),
    lambda: nn.Sequential(nn.Conv2d(2, 3, 2, padding=1, groups=1), nn.Flatten(), nn.LazyLinear(2)),
    lambda: nn.LayerNorm(3),
    lambda: nn.Embedding(5, 3),
])
def test_force_functorch_matches_oracle(layer_factory) -> None:
    torch.manual_seed(0)
    model = layer_factory().double()
    if isinstance(model, nn.Embedding):
        x = torch.randint(0, 5, (3, 4))
    elif isinstance(model, nn.Sequential):
        x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
        model(x)  # materialise the lazy layer
    else:
        x = torch.randn(3, 2, 3, dtype=torch.float64)
    case = _single_layer_case(model, x, 3, 0)
    _check(case, torch.float64, "mean", force_functorch=True)


class _MaskedInner(nn.Module):
    """No sampler: takes a batched input, an unbatched positional tensor and a batched keyword mask."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x, pos, mask=None):
        return torch.tanh(x * self.scale + pos) * mask.unsqueeze(-1)


class _MaskedOuter(nn.Module):
    def __init__(self, steps: int):
        super().__init__()
        self.inner = _MaskedInner()
        self.pos = torch.randn(steps, 3, dtype=torch.float64)  # a constant, not a buffer

    def forward(self, x, mask):
        return self.inner(x, self.pos, mask=mask)


def test_fallback_splits_batched_keyword_inputs_only() -> None:
    """``pos`` [T, d] (T != batch) is passed whole, ``mask`` [B, T] by keyword is split.

    (A tensor whose batch dimension happens to equal the batch size is taken as batched: a
    documented ambiguity of the fallback.)
    """
    torch.manual_seed(2)
    batch, steps = 3, 2
    x = torch.randn(batch, steps, 3, dtype=torch.float64)
    mask = (torch.rand(batch, steps) > 0.3).double()
    case = Case(_MaskedOuter(steps), (x, mask), lambda i: (x[i : i + 1], mask[i : i + 1]), batch)
    _check(case, torch.float64, "mean")


def test_fallback_loop_path_for_data_dependent_forward() -> None:
    """A forward that vmap cannot trace (data-dependent branch) goes through the loop."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x):
            rows = [r * self.w if bool(r.sum() > 0) else r * self.w.pow(2) for r in x]
            return torch.stack(rows)

    torch.manual_seed(1)
    x = torch.randn(4, 3, dtype=torch.float64)
    _check(_single_layer_case(Branchy(), x, 4, 0), torch.float64, "sum")


# --------------------------------------------------------------------------- structure


class TwiceLinear(nn.Module):
    """One Linear applied twice (shared) plus a head."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Tied(nn.Module):
    """Two Linear layers sharing one weight Parameter, and an embedding tied to an output layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.emb = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(torch.tanh(self.b(torch.tanh(self.a(h)))))


class RNNLinear(nn.Linear):
    """Stand-in for the DP recurrent layers' building block (resolved by name, batch always first)."""


class TinyRNN(nn.Module):
    """An Elman recurrence over [T, B, d] (or packed-style decreasing batch sizes)."""

    def __init__(self, d_in: int = 3, hidden: int = 4):
        super().__init__()
        self.ih = RNNLinear(d_in, hidden)
        self.hh = RNNLinear(hidden, hidden)
        self.hidden = hidden

    def forward(self, x, lengths=None):
        steps, batch = x.shape[0], x.shape[1]
        if lengths is not None:
            self.ih.max_batch_len = batch
            self.hh.max_batch_len = batch
        h = x.new_zeros(batch, self.hidden)
        outs = []
        for t in range(steps):
            b_t = batch if lengths is None else int((lengths > t).sum())
            h_new = torch.tanh(self.ih(x[t, :b_t]) + self.hh(h[:b_t]))
            h = torch.cat([h_new, h[b_t:]]) if b_t < batch else h_new
            outs.append(torch.cat([h_new, h_new.new_zeros(batch - b_t, self.hidden)]))
        return torch.stack(outs)  # [T, B, hidden]


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_layer_called_twice(loss_reduction) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    _check(_single_layer_case(TwiceLinear().double(), x, 4, 0), torch.float64, loss_reduction)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_tied_parameters(loss_reduction) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 6, (3, 5))
    case = _single_layer_case(Tied().double(), ids, 3, 0)
    expected, _ = loop_per_example_grads(case)
    actual, gsm = gsm_grad_samples(case, loss_reduction)
    assert "b.weight" not in actual and "out.weight" not in actual  # one entry per Parameter
    assert_grads_close(actual, expected, torch.float64)


@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrence_accumulates_over_time_steps(batch_first) -> None:
    """RNNLinear sees [B, d] per step whatever batch_first is; T calls are summed."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 3, dtype=torch.float64)  # [T, B, d]

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = TinyRNN()

        def forward(self, inp):
            seq = inp if not batch_first else inp.transpose(0, 1)
            out = self.rnn(seq)
            return out if not batch_first else out.transpose(0, 1)

    inp = x if not batch_first else x.transpose(0, 1).contiguous()
    bd = 0 if batch_first else 1
    case = Case(Wrapper().double(), (inp,), lambda i: (inp.narrow(bd, i, 1),), 3, bd)
    _check(case, torch.float64, "mean")


class PaddedRNN(nn.Module):
    """Runs a packed-style recurrence and zero-pads its output to ``steps`` time steps."""

    def __init__(self, rnn: nn.Module, steps: int):
        super().__init__()
        self.rnn = rnn
        self.steps = steps

    def forward(self, inp: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        out = self.rnn(inp, lens)
        missing = self.steps - out.shape[0]
        return torch.cat([out, out.new_zeros(missing, *out.shape[1:])]) if missing else out


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_packed_style_decreasing_batch_sizes(loss_reduction) -> None:
    """Time steps with fewer examples (packed sequences) use max_batch_len set by the layer."""
    torch.manual_seed(0)
    lengths = torch.tensor([4, 3, 1])
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    model = TinyRNN().double()

    def example(i: int) -> tuple:
        return x[: int(lengths[i]), i : i + 1], lengths[i : i + 1]

    case = Case(PaddedRNN(model, 4), (x, lengths), example, 3, batch_dim=1)
    expected, _ = loop_per_example_grads(case)
    from dp_torch.grad_sample import GradSampleModule
    import copy

    gsm = GradSampleModule(copy.deepcopy(case.model), batch_first=False, loss_reduction=loss_reduction)
    out = gsm(x, lengths)
    from tests.dp_torch.test_grad_sample_oracle import batch_loss, trainable_named

    batch_loss(case, out, loss_reduction).backward()
    actual = {n: p.grad_sample for n, p in trainable_named(gsm).items()}
    assert_grads_close(actual, expected, torch.float64)


def test_frozen_parameters_get_no_grad_sample() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    x = torch.randn(3, 3, dtype=torch.float64)
    case = _single_layer_case(model, x, 3, 0)
    expected, _ = loop_per_example_grads(case)
    actual, gsm = gsm_grad_samples(case, "mean")
    assert sorted(actual) == ["0.bias"]
    assert_grads_close(actual, expected, torch.float64)
    for p in (gsm._module[0].weight, gsm._module[2].weight, gsm._module[2].bias):
        assert getattr(p, "grad_sample", None) is None


class Composite(nn.Module):
    """conv -> groupnorm -> relu(inplace) -> conv -> instancenorm -> linear -> layernorm -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 2, stride=2, groups=2, bias=False)  # a bias before InstanceNorm has gradient 0
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.fc = nn.Linear(16, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu_(self.gn(self.conv1(x)))
        h = self.inorm(self.conv2(h)).flatten(1)
        return self.head(torch.tanh(self.ln(self.fc(h))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_composite_model(dtype, loss_reduction) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 2, 4, 4, dtype=dtype)
    _check(_single_layer_case(Composite().to(dtype), x, 4, 0), dtype, loss_reduction)


# --------------------------------------------------------------------------- merged calls


@pytest.mark.parametrize("packed", [False, True])
def test_repeated_calls_merged_into_one_sampler_run(packed, monkeypatch) -> None:
    """A layer called at every time step runs its sampler once per pass; grads match the loop,
    and a second backward pass accumulates into a list."""
    from dp_torch.grad_sample import GradSampleModule, _registry
    from tests.dp_torch.test_grad_sample_oracle import batch_loss, trainable_named
    import copy

    torch.manual_seed(0)
    steps, batch = 16, 3
    lengths = torch.tensor([16, 9, 2]) if packed else None
    x = torch.randn(steps, batch, 3, dtype=torch.float64)
    model = TinyRNN().double()
    model.hh.bias.requires_grad_(False)

    class Padded(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, inp, lens=None):
            out = self.rnn(inp, lens)
            pad = steps - out.shape[0]
            return torch.cat([out, out.new_zeros(pad, *out.shape[1:])]) if pad else out

    def example(i: int) -> tuple:
        n = steps if lengths is None else int(lengths[i])
        return (x[:n, i : i + 1], None if lengths is None else lengths[i : i + 1])

    case = Case(Padded(model), (x, lengths), example, batch, batch_dim=1)
    expected, _ = loop_per_example_grads(case)
    calls = []
    sampler = _registry.GRAD_SAMPLERS[nn.Linear]
    monkeypatch.setitem(_registry.GRAD_SAMPLERS, nn.Linear,
                        lambda *a: calls.append(a[2].shape) or sampler(*a))
    gsm = GradSampleModule(copy.deepcopy(case.model), batch_first=False, loss_reduction="sum")
    for _ in range(2):
        batch_loss(case, gsm(x, lengths), "sum").backward()
    assert calls == [(batch, steps, 4), (batch, steps, 4)] * 2  # hh then ih, one run each, per pass
    actual = trainable_named(gsm)
    assert "rnn.hh.bias" not in expected and getattr(gsm._module.rnn.hh.bias, "grad_sample", None) is None
    for name, p in actual.items():
        assert isinstance(p.grad_sample, list) and len(p.grad_sample) == 2
        for gs in p.grad_sample:
            assert_grads_close({name: gs}, {name: expected[name]}, torch.float64)


def test_accumulation_adds_in_place_only_to_owned_buffers() -> None:
    """The first contribution (which may alias autograd's buffer) is never modified; the
    buffer made by the first addition is reused in place afterwards."""
    from dp_torch.grad_sample import create_or_accumulate_grad_sample
    from tests.tolerance import assert_close

    p = nn.Parameter(torch.zeros(2))
    first, second, third = torch.ones(3, 2), torch.full((3, 2), 2.0), torch.full((2, 2), 4.0)
    create_or_accumulate_grad_sample(param=p, grad_sample=first, max_batch_len=3)
    assert p._current_grad_sample is first
    create_or_accumulate_grad_sample(param=p, grad_sample=second, max_batch_len=3)
    buffer = p._current_grad_sample
    assert torch.equal(first, torch.ones(3, 2)) and torch.equal(second, torch.full((3, 2), 2.0))
    create_or_accumulate_grad_sample(param=p, grad_sample=third, max_batch_len=3)
    assert p._current_grad_sample is buffer
    assert_close(buffer, torch.tensor([[7.0, 7.0], [7.0, 7.0], [3.0, 3.0]]), rtol=0.0)
