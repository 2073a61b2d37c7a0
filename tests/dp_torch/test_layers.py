"""dp_torch.layers: DP recurrent layers, DP multi-head attention, FrozenBatchNorm.

Oracles: the ``torch.nn`` layer with the same weights (float64, 1e-10) for outputs; a loop of
batch-size-1 backward passes for per-sample gradients.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dp_torch.layers import (
    DPGRU,
    DPGRUCell,
    DPLSTM,
    DPLSTMCell,
    DPMultiheadAttention,
    DPRNN,
    DPRNNCell,
    FrozenBatchNorm,
    RNNLinear,
    SequenceBias,
)
from tests.tolerance import assert_close

DT = torch.float64
RTOL = 1e-10
ATOL = 1e-12

# kind -> (torch.nn class, DP class, extra constructor kwargs)
RNN_KINDS = {
    "lstm": (nn.LSTM, DPLSTM, {}),
    "gru": (nn.GRU, DPGRU, {}),
    "rnn_tanh": (nn.RNN, DPRNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, DPRNN, {"nonlinearity": "relu"}),
}


def _pair(kind: str, **kwargs):
    """A torch.nn recurrent layer and its DP twin holding the same weights (float64)."""
    ref_cls, dp_cls, extra = RNN_KINDS[kind]
    torch.manual_seed(0)
    ref = ref_cls(3, 4, dtype=DT, **extra, **kwargs)
    dp = dp_cls(3, 4, dtype=DT, **extra, **kwargs)
    dp.load_state_dict(ref.state_dict())
    return ref, dp


def _states(h):
    return list(h) if isinstance(h, tuple) else [h]


def _assert_states_close(actual, expected):
    actual = [t.detach() for t in _states(actual)]
    assert_close(actual, [t.detach() for t in _states(expected)], rtol=RTOL, atol=ATOL)


def _initial_state(kind: str, layers: int, batch: int, proj: int = 0):
    size = proj or 4
    h0 = torch.randn(layers, batch, size, dtype=DT)
    return (h0, torch.randn(layers, batch, 4, dtype=DT)) if kind == "lstm" else h0


# --------------------------------------------------------------------------- recurrent layers


@pytest.mark.parametrize("kind", sorted(RNN_KINDS))
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dp_rnn_equals_torch_rnn(kind, num_layers, bidirectional, batch_first):
    ref, dp = _pair(kind, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    torch.manual_seed(1)
    batch, steps = 3, 5
    x = torch.randn(batch, steps, 3, dtype=DT)
    x = x if batch_first else x.transpose(0, 1)
    hx = _initial_state(kind, num_layers * (2 if bidirectional else 1), batch)
    # tensor input, default and given initial state
    for args in [(x,), (x, hx)]:
        out_ref, h_ref = ref(*args)
        out_dp, h_dp = dp(*args)
        assert_close(out_dp.detach(), out_ref.detach(), rtol=RTOL, atol=ATOL)
        _assert_states_close(h_dp, h_ref)
    # PackedSequence of unequal lengths, unsorted, with an initial state
    packed = pack_padded_sequence(x, torch.tensor([3, 5, 1]), batch_first=batch_first, enforce_sorted=False)
    out_ref, h_ref = ref(packed, hx)
    out_dp, h_dp = dp(packed, hx)
    assert torch.equal(out_dp.batch_sizes, out_ref.batch_sizes)
    assert torch.equal(out_dp.sorted_indices, out_ref.sorted_indices)
    assert torch.equal(out_dp.unsorted_indices, out_ref.unsorted_indices)
    assert_close(out_dp.data.detach(), out_ref.data.detach(), rtol=RTOL, atol=ATOL)
    _assert_states_close(h_dp, h_ref)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dplstm_with_projection_equals_torch(bidirectional):
    ref, dp = _pair("lstm", num_layers=2, bidirectional=bidirectional, proj_size=2)
    assert list(dp.state_dict()) == list(ref.state_dict())
    x = torch.randn(6, 2, 3, dtype=DT)
    hx = _initial_state("lstm", 2 * (2 if bidirectional else 1), 2, proj=2)
    packed = pack_padded_sequence(x, torch.tensor([6, 4]))
    for args in [(x,), (x, hx), (packed, hx)]:
        out_ref, h_ref = ref(*args)
        out_dp, h_dp = dp(*args)
        data = (lambda o: o.data) if args[0] is packed else (lambda o: o)
        assert_close(data(out_dp).detach(), data(out_ref).detach(), rtol=RTOL, atol=ATOL)
        assert_close([t.detach() for t in h_dp], [t.detach() for t in h_ref], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dp_rnn_unbatched_input(kind):
    ref, dp = _pair(kind, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, dtype=DT)
    hx = _initial_state(kind, 4, 1)
    hx = tuple(t[:, 0] for t in hx) if isinstance(hx, tuple) else hx[:, 0]
    for args in [(x,), (x, hx)]:
        out_ref, h_ref = ref(*args)
        out_dp, h_dp = dp(*args)
        assert out_dp.shape == out_ref.shape == (5, 8)
        assert_close(out_dp.detach(), out_ref.detach(), rtol=RTOL, atol=ATOL)
        _assert_states_close(h_dp, h_ref)


def test_state_init_is_opacus_name_for_hx():
    _, dp = _pair("gru")
    x = torch.randn(4, 2, 3, dtype=DT)
    h0 = torch.randn(1, 2, 4, dtype=DT)
    assert torch.equal(dp(x, state_init=h0)[0], dp(x, h0)[0])
    with pytest.raises(ValueError, match="not both"):
        dp(x, h0, state_init=h0)


@pytest.mark.parametrize("kind", sorted(RNN_KINDS))
def test_dp_rnn_state_dict_uses_torch_names_both_ways(kind):
    ref, dp = _pair(kind, num_layers=2, bidirectional=True)
    assert list(dp.state_dict()) == list(ref.state_dict())
    # parameters live once, in nn.Linear submodules, under internal names
    assert all(isinstance(m, RNNLinear) for n, m in dp.named_modules() if n.endswith(("ih", "hh")))
    assert {n.split(".")[-2] for n, _ in dp.named_parameters()} == {"ih", "hh"}
    assert len(list(dp.parameters())) == len(list(ref.parameters()))
    # DP -> torch.nn
    ref_cls, _, extra = RNN_KINDS[kind]
    back = ref_cls(3, 4, num_layers=2, bidirectional=True, dtype=DT, **extra)
    back.load_state_dict(dp.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_dp_rnn_loads_internal_names_and_leaves_input_untouched():
    ref, dp = _pair("lstm", num_layers=1, bidirectional=True)
    internal = {name: p.detach().clone() * 2 for name, p in dp.named_parameters()}
    assert "l0_reverse.ih.weight" in internal  # Opacus' internal naming
    fresh = DPLSTM(3, 4, bidirectional=True, dtype=DT)
    snapshot = dict(internal)
    fresh.load_state_dict(internal)
    assert internal.keys() == snapshot.keys()
    for name, p in fresh.named_parameters():
        assert torch.equal(p, internal[name])
    public = ref.state_dict()
    keys = list(public)
    fresh.load_state_dict(public)
    assert list(public) == keys  # the caller's dict is not modified


def test_dp_rnn_rejects_both_names_for_one_tensor():
    ref, dp = _pair("gru")
    state = dict(ref.state_dict())
    state["l0.ih.weight"] = state["weight_ih_l0"].clone()
    match = "both 'l0.weight_ih' and 'l0.ih.weight', two names for the same tensor"
    with pytest.raises(RuntimeError, match=match):
        dp.load_state_dict(state)


def test_dp_rnn_dropout_between_layers_only():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=2, dropout=0.5, dtype=DT)
    dp = DPLSTM(3, 4, num_layers=2, dropout=0.5, dtype=DT)
    dp.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6, 3, dtype=DT)
    dp.train()
    out, (h_n, _) = dp(x)
    # torch.nn semantics: the last layer's output is not dropped, so it ends in h_n
    assert_close(out[-1].detach(), h_n[-1].detach(), rtol=0.0)
    # ... and the first layer's output is: training differs from eval, which equals torch.nn
    ref.eval()
    dp.eval()
    out_eval, _ = dp(x)
    assert not torch.allclose(out, out_eval)
    assert_close(out_eval.detach(), ref(x)[0].detach(), rtol=RTOL, atol=ATOL)


def test_dp_rnn_warns_on_dropout_with_one_layer():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        DPGRU(3, 4, dropout=0.2)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"bias": "relu"}, TypeError, "bias must be a bool"),
        ({"hidden_size": 0}, ValueError, "hidden_size must be a positive int"),
        ({"num_layers": 0}, ValueError, "num_layers must be a positive int"),
        ({"dropout": 1.5}, ValueError, "dropout must be a number in"),
        ({"proj_size": 4}, ValueError, "proj_size must be smaller than hidden_size"),
        ({"proj_size": -1}, ValueError, "proj_size must be an int >= 0"),
    ],
)
def test_dp_rnn_rejects_bad_arguments(kwargs, exc, match):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(exc, match=match):
        DPLSTM(**args)


def test_dp_rnn_rejects_projection_for_gru_and_bad_inputs():
    with pytest.raises(ValueError, match="proj_size=2 is only supported for LSTM"):
        DPGRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        DPRNN(3, 4, nonlinearity="sigmoid")
    dp = DPLSTM(3, 4)
    with pytest.raises(ValueError, match="input_size=3, got 5"):
        dp(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(1, 2, 4\)"):
        dp(torch.randn(6, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="hx must be a tuple"):
        dp(torch.randn(6, 2, 3), torch.zeros(1, 2, 4))


def _backward_node_names(output: torch.Tensor) -> list[str]:
    """Names of every node of ``output``'s backward graph (each node once)."""
    seen, stack, names = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", sorted(RNN_KINDS))
def test_dp_rnn_backward_graph_has_no_per_step_node_of_sequence_size(kind):
    """The input projection is split into time steps once (one ``UnbindBackward`` per layer and
    direction); indexing one step at a time would record a node per step whose backward pass
    fills a gradient of the whole sequence (quadratic in the sequence length)."""
    _, dp = _pair(kind, num_layers=2, bidirectional=True)
    out, _ = dp(torch.randn(7, 2, 3, dtype=DT))
    names = _backward_node_names(out)
    assert names.count("UnbindBackward0") == 4
    assert not {"SelectBackward0", "WhereBackward0", "FlipBackward0", "GatherBackward0"} & set(names)


@pytest.mark.parametrize("kind", sorted(RNN_KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dp_rnn_full_length_packed_batch_is_the_tensor_path(kind, bidirectional):
    """A packed batch whose sequences all have the full length takes the unmasked path: same
    output and final state as the padded tensor, bit for bit."""
    _, dp = _pair(kind, bidirectional=bidirectional)
    x = torch.randn(5, 3, 3, dtype=DT)
    out, state = dp(x)
    packed_out, packed_state = dp(pack_padded_sequence(x, torch.tensor([5, 5, 5])))
    assert torch.equal(pad_packed_sequence(packed_out)[0], out)
    for got, want in zip(_states(packed_state), _states(state)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_dp_rnn_gradcheck_and_double_backward(kind):
    """First and second derivatives of a bidirectional, variable-length run (float64
    finite differences), with respect to the input, the initial state and the weights."""
    _, dp = _pair(kind, bidirectional=True)
    weights = list(dp.parameters())
    x = torch.randn(3, 2, 3, dtype=DT, requires_grad=True)
    h0 = _initial_state(kind, 2, 2)
    h0 = tuple(t.requires_grad_() for t in h0) if isinstance(h0, tuple) else h0.requires_grad_()

    def run(x, *tensors):
        state = tuple(tensors[:2]) if kind == "lstm" else tensors[0]
        out, _ = dp(pack_padded_sequence(x, torch.tensor([3, 1]), enforce_sorted=False), state)
        return out.data

    tensors = (x, *_states(h0))
    assert torch.autograd.gradcheck(run, tensors, fast_mode=True)  # random projections
    assert torch.autograd.gradgradcheck(run, tensors, fast_mode=True)
    grads = torch.autograd.grad(run(*tensors).pow(2).sum(), weights, create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), weights, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in second)


@pytest.mark.parametrize(
    "ref_cls, dp_cls, extra",
    [
        (nn.LSTMCell, DPLSTMCell, {}),
        (nn.GRUCell, DPGRUCell, {}),
        (nn.RNNCell, DPRNNCell, {"nonlinearity": "relu"}),
    ],
)
def test_dp_cells_equal_torch_cells(ref_cls, dp_cls, extra):
    torch.manual_seed(0)
    ref = ref_cls(3, 4, dtype=DT, **extra)
    dp = dp_cls(3, 4, dtype=DT, **extra)
    dp.load_state_dict(ref.state_dict())
    assert list(dp.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, dtype=DT)
    h = torch.randn(2, 4, dtype=DT)
    hx = (h, torch.randn(2, 4, dtype=DT)) if ref_cls is nn.LSTMCell else h
    for args in [(x,), (x, hx), (x[0],)]:
        out_ref, out_dp = ref(*args), dp(*args)
        _assert_states_close(out_dp, out_ref)


# --------------------------------------------------------------------------- multi-head attention

MHA_CONFIGS = [
    {},
    {"bias": False},
    {"add_bias_kv": True},
    {"add_zero_attn": True},
    {"kdim": 5, "vdim": 3},
    {"add_bias_kv": True, "add_zero_attn": True, "kdim": 5, "vdim": 3},
]
E, HEADS, B, L, S = 8, 2, 3, 4, 5


def _mha_pair(batch_first: bool, **kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dtype=DT, **kwargs)
    if ref.bias_k is not None:  # nn.MultiheadAttention draws them; make the test independent of that
        nn.init.normal_(ref.bias_k)
        nn.init.normal_(ref.bias_v)
    if ref.in_proj_bias is not None:
        nn.init.normal_(ref.in_proj_bias)
    dp = DPMultiheadAttention(E, HEADS, batch_first=batch_first, dtype=DT, **kwargs)
    dp.load_state_dict(ref.state_dict())
    return ref, dp


def _mha_inputs(batch_first: bool, kdim: int = E, vdim: int = E):
    torch.manual_seed(2)
    q, k, v = (torch.randn(B, n, d, dtype=DT) for n, d in ((L, E), (S, kdim), (S, vdim)))
    return tuple(t if batch_first else t.transpose(0, 1) for t in (q, k, v))


def _masks():
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, 0] = True
    bool_attn = torch.zeros(B * HEADS, L, S, dtype=torch.bool)
    bool_attn[1::2, :, 1] = True
    return [
        {},
        {"key_padding_mask": padding},
        {"key_padding_mask": padding.to(DT) * -3.0},
        {"attn_mask": torch.randn(L, S, dtype=DT)},
        {"attn_mask": bool_attn, "key_padding_mask": padding, "average_attn_weights": False},
        {"attn_mask": torch.randn(L, S, dtype=DT), "need_weights": False},
    ]


@pytest.mark.parametrize("config", MHA_CONFIGS, ids=lambda c: ",".join(c) or "default")
@pytest.mark.parametrize("batch_first", [False, True])
def test_dp_mha_equals_torch_mha(config, batch_first):
    ref, dp = _mha_pair(batch_first, **config)
    q, k, v = _mha_inputs(batch_first, config.get("kdim", E), config.get("vdim", E))
    for masks in _masks():
        out_ref, w_ref = ref(q, k, v, **masks)
        out_dp, w_dp = dp(q, k, v, **masks)
        assert_close(out_dp.detach(), out_ref.detach(), rtol=RTOL, atol=ATOL)
        if w_ref is None:
            assert w_dp is None
        else:
            assert_close(w_dp.detach(), w_ref.detach(), rtol=RTOL, atol=ATOL)


def test_dp_mha_self_attention_causal_and_unbatched():
    ref, dp = _mha_pair(True, add_zero_attn=True)
    ref.eval()
    dp.eval()
    x = torch.randn(B, L, E, dtype=DT)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=DT)
    for kwargs in [{"need_weights": False}, {"need_weights": True}]:
        out_ref, _ = ref(x, x, x, attn_mask=causal, is_causal=True, **kwargs)
        out_dp, _ = dp(x, x, x, attn_mask=causal, is_causal=True, **kwargs)
        assert_close(out_dp.detach(), out_ref.detach(), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="is_causal=True .* needs attn_mask"):
        dp(x, x, x, is_causal=True)
    for average in (True, False):
        out_ref, w_ref = ref(x[0], x[0], x[0], key_padding_mask=torch.tensor([False] * (L - 1) + [True]),
                             average_attn_weights=average)
        out_dp, w_dp = dp(x[0], x[0], x[0], key_padding_mask=torch.tensor([False] * (L - 1) + [True]),
                          average_attn_weights=average)
        assert out_dp.shape == (L, E)
        expected = [out_ref.detach(), w_ref.detach()]
        assert_close([out_dp.detach(), w_dp.detach()], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("config", [{}, {"kdim": 5, "vdim": 3, "add_bias_kv": True}, {"bias": False}])
def test_dp_mha_state_dict_round_trip(config):
    ref, dp = _mha_pair(False, **config)
    state = ref.state_dict()
    keys = list(state)
    assert list(dp.state_dict()) == keys
    fresh = DPMultiheadAttention(E, HEADS, dtype=DT, **config)
    fresh.load_state_dict(state)
    assert list(state) == keys  # not modified (Opacus deletes the keys it converts)
    back = nn.MultiheadAttention(E, HEADS, dtype=DT, **config)
    back.load_state_dict(fresh.state_dict())
    for key, value in state.items():
        assert torch.equal(back.state_dict()[key], value)
    # internal names load too
    internal = {n: p.detach() for n, p in dp.named_parameters()}
    fresh.load_state_dict(internal)
    assert all(torch.equal(p, internal[n]) for n, p in fresh.named_parameters())


def test_dp_mha_load_errors():
    _, dp = _mha_pair(False)
    state = dict(dp.state_dict())
    state["qlinear.weight"] = state["in_proj_weight"][:E]
    with pytest.raises(RuntimeError, match="both 'in_proj_weight' and 'qlinear.weight'"):
        dp.load_state_dict(state)
    with pytest.raises(RuntimeError, match="Unexpected key.*bias_k"):
        dp.load_state_dict({**dp.state_dict(), "bias_k": torch.zeros(1, 1, E, dtype=DT)})


def test_dp_mha_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        DPMultiheadAttention(6, 4)
    with pytest.raises(ValueError, match="dropout must be a number"):
        DPMultiheadAttention(6, 2, dropout=2.0)
    dp = DPMultiheadAttention(E, HEADS)
    q = torch.randn(L, B, E)
    with pytest.raises(ValueError, match="key must have 8 features"):
        dp(q, torch.randn(S, B, 3), torch.randn(S, B, E))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        dp(q, q, q, key_padding_mask=torch.zeros(B, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        dp(q, q, q, attn_mask=torch.zeros(L, S))
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating-point"):
        dp(q, q, q, attn_mask=torch.zeros(L, L, dtype=torch.long))


def test_dp_mha_dropout_only_in_training():
    torch.manual_seed(0)
    dp = DPMultiheadAttention(E, HEADS, dropout=0.5, dtype=DT)
    ref = nn.MultiheadAttention(E, HEADS, dropout=0.5, dtype=DT)
    dp.load_state_dict(ref.state_dict())
    q, k, v = _mha_inputs(False)
    out_train, weights_train = dp(q, k, v)
    assert (weights_train == 0).any()
    dp.eval()
    ref.eval()
    assert_close(dp(q, k, v)[0].detach(), ref(q, k, v)[0].detach(), rtol=RTOL, atol=ATOL)


def test_dp_mha_in_transformer_layer_equals_torch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=DT)
    dp_layer = copy.deepcopy(layer)
    dp_attn = DPMultiheadAttention(E, HEADS, batch_first=True, dtype=DT)
    dp_attn.load_state_dict(layer.self_attn.state_dict())
    dp_layer.self_attn = dp_attn
    x = torch.randn(B, L, E, dtype=DT)
    padding = torch.tensor([[False] * L, [False] * (L - 1) + [True], [False] * L])
    for training in (True, False):
        layer.train(training)
        dp_layer.train(training)
        with warnings.catch_warnings():
            # torch's encoder fast path may warn about nested tensors in eval mode
            warnings.simplefilter("ignore")
            expected = layer(x, src_key_padding_mask=padding)
        got = dp_layer(x, src_key_padding_mask=padding)
        keep = ~padding  # torch's eval fast path zeroes padded positions
        assert_close(got[keep].detach(), expected[keep].detach(), rtol=1e-9, atol=1e-12)


def test_sequence_bias_layouts_and_state_dict():
    bias = SequenceBias(4, batch_first=True)
    x = torch.randn(2, 3, 4)
    out = bias(x)
    assert out.shape == (2, 4, 4)
    assert torch.equal(out[:, :3], x)
    assert torch.equal(out[1, 3], bias.bias.detach())
    assert list(bias.state_dict()) == ["bias"] and bias.state_dict()["bias"].shape == (4,)
    seq_first = SequenceBias(4)
    seq_first.load_state_dict(bias.state_dict())
    out2 = seq_first(x.transpose(0, 1))
    assert out2.shape == (4, 2, 4) and torch.equal(out2[3, 0], bias.bias.detach())


# --------------------------------------------------------------------------- FrozenBatchNorm


@pytest.mark.parametrize(
    "bn_cls, shape", [(nn.BatchNorm1d, (4, 3)), (nn.BatchNorm1d, (4, 3, 5)), (nn.BatchNorm2d, (4, 3, 2, 2))]
)
def test_frozen_batch_norm_equals_batch_norm_in_eval(bn_cls, shape):
    torch.manual_seed(0)
    bn = bn_cls(3, eps=1e-3, dtype=DT)
    for _ in range(3):
        bn(torch.randn(*shape, dtype=DT) * 2 + 1)  # populate running statistics
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    frozen = FrozenBatchNorm.from_batch_norm(bn)
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert not any(p.requires_grad for p in frozen.parameters())
    bn.eval()
    x = torch.randn(*shape, dtype=DT)
    before = frozen.running_mean.clone()
    for mode in (True, False):
        frozen.train(mode)
        assert_close(frozen(x), bn(x).detach(), rtol=RTOL, atol=ATOL)
    assert torch.equal(frozen.running_mean, before)
    # each example is normalised on its own: one row does not depend on the others
    assert_close(frozen(x[:1]), frozen(x)[:1], rtol=0.0)


def test_frozen_batch_norm_needs_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FrozenBatchNorm.from_batch_norm(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"input must have shape \[batch, 3"):
        FrozenBatchNorm(3)(torch.randn(2, 4))


# --------------------------------------------------------------------------- per-sample gradients


def _gsm_class():
    from dp_torch.grad_sample import GradSampleModule

    return GradSampleModule


def _oracle(model: nn.Module, examples, loss_fn):
    """Per-example gradients from a loop of batch-size-1 backward passes."""
    grads: dict[str, list] = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for example in examples:
        model.zero_grad()
        loss_fn(model, example).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def _grad_samples(model: nn.Module, batch, loss_fn, *, batch_first: bool):
    gsm = _gsm_class()(model, batch_first=batch_first, loss_reduction="sum")
    loss_fn(gsm, batch).backward()
    return {n: p.grad_sample.detach() for n, p in model.named_parameters() if p.requires_grad}


class _PackedHead(nn.Module):
    """Recurrent layer on a PackedSequence; loss uses the outputs and the final states."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        width = rnn.hidden_size * rnn.num_directions
        self.head = nn.Linear(width, 2, dtype=DT)

    def forward(self, packed):
        out, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        last = h[-self.rnn.num_directions:].permute(1, 0, 2).reshape(h.shape[1], -1)
        padded, _ = pad_packed_sequence(out, batch_first=True)
        return self.head(last).pow(2).sum() + padded.pow(2).sum() * 0.5


def _packed_loss(model, batch):
    x, lengths = batch
    return model(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))


@pytest.mark.parametrize("dp_cls", [DPLSTM, DPGRU, DPRNN])
def test_dp_rnn_per_sample_gradients_packed(dp_cls):
    torch.manual_seed(0)
    model = _PackedHead(dp_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=DT))
    x = torch.randn(4, 5, 3, dtype=DT)
    lengths = torch.tensor([2, 5, 1, 4])  # unsorted: rows must stay in batch order
    expected = _oracle(model, [(x[i:i + 1, : lengths[i]], lengths[i:i + 1]) for i in range(4)], _packed_loss)
    got = _grad_samples(copy.deepcopy(model), (x, lengths), _packed_loss, batch_first=True)
    assert_close(got, expected, rtol=RTOL, atol=ATOL)


class _TimeFirstHead(nn.Module):
    """Time-first recurrent layer followed by a time-first Linear (engine batch_first=False)."""

    def __init__(self):
        super().__init__()
        self.rnn = DPLSTM(3, 4, bidirectional=True, proj_size=2, dtype=DT)
        self.head = nn.Linear(4, 2, dtype=DT)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.head(out).pow(2).sum() + c.pow(2).sum()


def test_dplstm_per_sample_gradients_time_first_engine():
    torch.manual_seed(0)
    model = _TimeFirstHead()
    x = torch.randn(5, 3, 3, dtype=DT)  # [T, B, D]
    loss = lambda m, batch: m(batch)  # noqa: E731
    expected = _oracle(model, [x[:, i:i + 1] for i in range(3)], loss)
    got = _grad_samples(copy.deepcopy(model), x, loss, batch_first=False)
    assert_close(got, expected, rtol=RTOL, atol=ATOL)


def _mha_loss(model, batch):
    q, k, v, padding = batch
    out, weights = model(q, k, v, key_padding_mask=padding)
    return out.pow(2).sum() + weights.pow(2).sum()


@pytest.mark.parametrize("batch_first", [True, False])
def test_dp_mha_per_sample_gradients(batch_first):
    torch.manual_seed(0)
    model = DPMultiheadAttention(
        E, HEADS, add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=3, batch_first=batch_first, dtype=DT
    )
    q, k, v = _mha_inputs(batch_first, 5, 3)
    padding = _masks()[1]["key_padding_mask"]
    bd = 0 if batch_first else 1
    examples = [
        (*(t.narrow(bd, i, 1) for t in (q, k, v)), padding[i:i + 1]) for i in range(B)
    ]
    expected = _oracle(model, examples, _mha_loss)
    got = _grad_samples(copy.deepcopy(model), (q, k, v, padding), _mha_loss, batch_first=batch_first)
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert_close(got, expected, rtol=RTOL, atol=ATOL)
