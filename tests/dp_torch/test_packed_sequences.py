"""Packed sequences: ``dp_torch.utils.packed_sequences`` and the DP recurrent layers on them.

Oracles: the lengths a ``PackedSequence`` was built from, ``torch.nn``'s recurrent layers
(same weights), and a loop of batch-size-1 backward passes for per-sample gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_sequence

from dp_torch.grad_sample import GradSampleModule
from dp_torch.layers import DPGRU, DPLSTM, DPRNN
from dp_torch.layers.dp_rnn import RNN_CELL_TYPES, DPGRUCell, DPLSTMCell, apply_permutation
from dp_torch.utils.packed_sequences import compute_seq_lengths, unpacked_indices
from dp_torch.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

DT = torch.float64
LENGTHS = [3, 5, 1, 4, 5]


def _sequences(features: int = 3) -> list[torch.Tensor]:
    return [torch.randn(n, features, dtype=DT) for n in LENGTHS]


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_compute_seq_lengths_recovers_the_sorted_lengths(enforce_sorted: bool) -> None:
    lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS
    packed = pack_sequence([torch.zeros(n, 2) for n in lengths], enforce_sorted=enforce_sorted)
    assert compute_seq_lengths(packed.batch_sizes) == sorted(LENGTHS, reverse=True)
    order = unpacked_indices(packed)
    assert [lengths[i] for i in order] == sorted(LENGTHS, reverse=True)


def test_compute_seq_lengths_edge_cases() -> None:
    assert compute_seq_lengths(torch.tensor([3])) == [1, 1, 1]
    with pytest.raises(ValueError, match="non-increasing"):
        compute_seq_lengths(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        compute_seq_lengths(torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="PackedSequence"):
        unpacked_indices(torch.zeros(2))


def test_apply_permutation() -> None:
    t = torch.arange(6).view(2, 3)
    assert apply_permutation(t, 1, None) is t
    assert torch.equal(apply_permutation(t, 1, torch.tensor([2, 0, 1])), t[:, [2, 0, 1]])
    assert set(RNN_CELL_TYPES) == {"RNN_TANH", "RNN_RELU", "GRU", "LSTM"}


class _LastOutput(nn.Module):
    """The recurrent layer's output sequence only (what the per-sample check scores)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


@pytest.mark.parametrize("layer", [DPLSTM, DPGRU, DPRNN])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_per_sample_gradients_on_packed_input_match_the_loop(layer, batch_first, enforce_sorted) -> None:
    torch.manual_seed(0)
    rnn = layer(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, dtype=DT)
    seqs = _sequences()
    if enforce_sorted:
        seqs = sorted(seqs, key=len, reverse=True)
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    for mode in ("hooks", "functorch"):
        assert check_per_sample_gradients_are_correct(
            packed, _LastOutput(rnn), batch_first=batch_first, grad_sample_mode=mode, atol=1e-9, rtol=1e-7
        )


def test_dplstm_on_packed_input_equals_torch_lstm() -> None:
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=DT)
    dp = DPLSTM(3, 4, num_layers=2, bidirectional=True, dtype=DT)
    dp.load_state_dict(ref.state_dict())
    packed = pack_sequence(_sequences(), enforce_sorted=False)
    out, (h, c) = GradSampleModule(dp)(packed)
    ref_out, (ref_h, ref_c) = ref(packed)
    assert torch.allclose(out.data, ref_out.data) and torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert torch.allclose(h, ref_h) and torch.allclose(c, ref_c)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_forward_layer_matches_one_torch_direction(reverse: bool, packed: bool) -> None:
    torch.manual_seed(1)
    ref = nn.LSTM(3, 4, bidirectional=True, dtype=DT)
    dp = DPLSTM(3, 4, bidirectional=True, dtype=DT)
    dp.load_state_dict(ref.state_dict())
    seqs = sorted(_sequences(), key=len, reverse=True)
    batch = len(seqs)
    h0 = torch.randn(2, batch, 4, dtype=DT)
    c0 = torch.randn(2, batch, 4, dtype=DT)
    d = int(reverse)
    if packed:
        x = pack_sequence(seqs)
        steps = x.data.split(x.batch_sizes.tolist())
        out, h, c = dp.forward_layer(steps, h0[d], c0[d], x.batch_sizes, dp.cells[d], batch,
                                     len(x.batch_sizes), True, reverse)
        ref_out, (ref_h, ref_c) = ref(x, (h0, c0))
        assert torch.allclose(torch.cat(out), ref_out.data[:, 4 * d:4 * (d + 1)])
    else:
        x = pad_sequence(seqs)  # [T, B, 3]; padding is part of every sequence here
        out, h, c = dp.forward_layer(x, h0[d], c0[d], None, dp.cells[d], batch, x.shape[0], False, reverse)
        ref_out, (ref_h, ref_c) = ref(x, (h0, c0))
        assert torch.allclose(out, ref_out[..., 4 * d:4 * (d + 1)])
    assert torch.allclose(h, ref_h[d]) and torch.allclose(c, ref_c[d])


def test_iterate_layers_and_initialize_cells() -> None:
    rnn = DPGRU(3, 4, num_layers=2, bidirectional=True)
    walked = [(layer, [(d, args) for d, args in dirs]) for layer, dirs in rnn.iterate_layers("abcd", range(4))]
    assert walked == [(0, [(0, ("a", 0)), (1, ("b", 1))]), (1, [(0, ("c", 2)), (1, ("d", 3))])]
    old = rnn.l1_reverse.hh.weight
    cells = rnn.initialize_cells()
    assert cells == rnn.cells and len(cells) == 4 and rnn.l1_reverse.hh.weight is not old
    assert list(rnn.state_dict()) == list(nn.GRU(3, 4, num_layers=2, bidirectional=True).state_dict())


@pytest.mark.parametrize("cell_type", [DPGRUCell, DPLSTMCell])
def test_cell_batch_size_t_uses_the_first_rows_of_the_state(cell_type) -> None:
    torch.manual_seed(2)
    cell = cell_type(3, 4, True)
    x = torch.randn(2, 3)
    h = torch.randn(5, 4)
    hx = (h, torch.randn(5, 4)) if cell.has_cell_state else h
    sliced = (hx[0][:2], hx[1][:2]) if cell.has_cell_state else h[:2]
    out, ref = cell(x, hx, batch_size_t=2), cell(x, sliced)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch_size_t must be the number of rows of input"):
        cell(x, hx, batch_size_t=3)


def test_cell_driven_step_by_step_over_a_sorted_packed_batch() -> None:
    """Opacus' packed protocol: fewer rows per step, max_batch_len set on the cell."""
    torch.manual_seed(3)
    cell = DPLSTMCell(3, 4, True, dtype=DT)
    seqs = sorted(_sequences(), key=len, reverse=True)
    packed = pack_sequence(seqs)
    steps = packed.data.split(packed.batch_sizes.tolist())

    class Stepper(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, x):  # x: [B, T, 3] padded, only used for its steps
            self.cell.set_max_batch_length(x.shape[0])
            h = c = x.new_zeros(x.shape[0], 4)
            total = x.new_zeros(())
            for t, n in enumerate(packed.batch_sizes.tolist()):
                h_t, c_t = self.cell(x[:n, t], (h, c), batch_size_t=n)
                h, c = torch.cat([h_t, h[n:]]), torch.cat([c_t, c[n:]])
                total = total + h_t.abs().sum()
            return total

    reference = []
    for seq in seqs:  # each sequence alone, on an unwrapped copy of the cell
        alone = copy.deepcopy(cell)
        h = c = torch.zeros(1, 4, dtype=DT)
        loss = torch.zeros((), dtype=DT)
        for t in range(len(seq)):
            h, c = alone(seq[t:t + 1], (h, c))
            loss = loss + h.abs().sum()
        reference.append(torch.autograd.grad(loss, [alone.ih.weight, alone.hh.weight, alone.hh.bias]))
    gsm = GradSampleModule(Stepper(), loss_reduction="sum")
    gsm(pad_sequence(seqs, batch_first=True)).backward()
    for i, (g_ih, g_hh, g_bias) in enumerate(reference):
        assert torch.allclose(cell.ih.weight.grad_sample[i], g_ih)
        assert torch.allclose(cell.hh.weight.grad_sample[i], g_hh)
        assert torch.allclose(cell.hh.bias.grad_sample[i], g_bias)
    assert steps[0].shape[0] == len(seqs)


def test_set_max_batch_length_validates() -> None:
    with pytest.raises(ValueError, match="max_batch_length must be an int >= 0"):
        DPGRUCell(3, 4, True).set_max_batch_length(-1)


def test_pack_padded_with_batch_first_false_round_trip() -> None:
    """A loader-style [T, B, D] padded batch, packed unsorted, gives the same per-sample check."""
    torch.manual_seed(4)
    seqs = _sequences()
    padded = pad_sequence(seqs)  # [T, B, 3]
    packed = pack_padded_sequence(padded, torch.tensor(LENGTHS), enforce_sorted=False)
    assert check_per_sample_gradients_are_correct(packed, _LastOutput(DPLSTM(3, 2, dtype=DT)), batch_first=False)
