"""Recurrent layers built from ``nn.Linear`` submodules: drop-in twins of ``nn.RNN/GRU/LSTM``.

``torch.nn``'s recurrent layers run as one fused kernel, which a hook-based per-sample-gradient
engine cannot look into. The layers here compute the same function with one
:class:`RNNLinear` (an ``nn.Linear``) for the input projection and one for the recurrent
projection of every (layer, direction), plus plain tensor ops. The input projection is applied
once to the whole sequence, the recurrent one at every time step; a per-sample-gradient engine
sums an ``RNNLinear``'s per-step contributions per example.

Invariants that make per-sample gradients correct:

* every call of an ``RNNLinear`` sees the *whole* batch, batch dimension first, rows in the
  caller's batch order (also for ``PackedSequence`` input: the layer unpacks to a padded batch
  in the original order and freezes the state of a sequence after its last element with
  ``torch.where``, so padded steps contribute exactly zero to every gradient; when every
  sequence has the full length, no masking op is recorded at all). A
  per-sample-gradient engine must therefore treat ``RNNLinear`` as batch-first whatever its
  ``batch_first`` setting, as Opacus does.

Where these layers differ from Opacus' and why: ``docs/opacus_differences.md``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence, pad_sequence

from dp_torch.utils.packed_sequences import compute_seq_lengths

from .param_rename import RenameParamsMixin

__all__ = [
    "RNN_CELL_TYPES",
    "RNNLinear",
    "DPRNNCellBase",
    "DPRNNCell",
    "DPGRUCell",
    "DPLSTMCell",
    "DPRNNBase",
    "DPRNN",
    "DPGRU",
    "DPLSTM",
    "apply_permutation",
]

_State = tuple[Tensor, ...]


def apply_permutation(tensor: Tensor, dim: int, permutation: Optional[Tensor]) -> Tensor:
    """Reorder ``tensor`` along ``dim`` by ``permutation`` (``tensor`` itself when it is ``None``).

    Args:
        tensor: The tensor.
        dim: The dimension to reorder.
        permutation: Index tensor: entry ``i`` of the result is entry ``permutation[i]``
            of ``tensor``; ``None`` leaves the order unchanged.
    """
    if permutation is None:
        return tensor
    return tensor.index_select(dim, permutation.to(tensor.device))


class RNNLinear(nn.Linear):
    """An ``nn.Linear`` used inside the DP recurrent layers.

    It computes exactly what ``nn.Linear`` computes. Its type tells a per-sample-gradient engine
    two things: the module is called several times per forward pass (its per-sample gradients
    are summed over the calls), and its input always has the batch dimension first, whatever
    the engine's ``batch_first`` setting.
    """


def _linear(in_features: int, out_features: int, bias: bool, factory: dict) -> RNNLinear:
    return RNNLinear(in_features, out_features, bias=bias, **factory)


class DPRNNCellBase(RenameParamsMixin, nn.Module):
    """Base of the DP recurrent cells: an input and a recurrent :class:`RNNLinear`.

    The state dict uses the names of the matching ``torch.nn`` cell (``weight_ih``,
    ``weight_hh``, ``bias_ih``, ``bias_hh``; ``weight_hr`` for a projected LSTM cell).

    Attributes:
        ih: Input projection, ``input_size -> num_chunks * hidden_size``.
        hh: Recurrent projection, ``state_size -> num_chunks * hidden_size``.
    """

    has_cell_state: bool = False
    num_chunks: int = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        num_chunks: Optional[int] = None,
        *,
        proj_size: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Build the projections.

        Args:
            input_size: Features of ``x``.
            hidden_size: Features of the hidden (and cell) state.
            bias: Whether the projections have biases.
            num_chunks: Gates per projection (Opacus' argument); ``None`` keeps the class's
                ``num_chunks`` (1 Elman, 3 GRU, 4 LSTM).
            proj_size: LSTM only: features of the projected ``h`` (0: no projection).
            device: Where the parameters live.
            dtype: Parameter dtype.
        """
        super().__init__()
        _check_positive_int("input_size", input_size)
        _check_positive_int("hidden_size", hidden_size)
        _check_bool("bias", bias)
        if num_chunks is not None:
            _check_positive_int("num_chunks", num_chunks)
            self.num_chunks = num_chunks
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        state_size = proj_size if proj_size > 0 else hidden_size
        self.ih = _linear(input_size, self.num_chunks * hidden_size, bias, factory)
        self.hh = _linear(state_size, self.num_chunks * hidden_size, bias, factory)
        names = {"ih.weight": "weight_ih", "hh.weight": "weight_hh"}
        if bias:
            names.update({"ih.bias": "bias_ih", "hh.bias": "bias_hh"})
        if proj_size > 0:
            self.hr = _linear(hidden_size, proj_size, False, factory)
            names["hr.weight"] = "weight_hr"
        self.set_rename_map(names)
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        """Size of the hidden state ``h`` (``proj_size`` if projected, else ``hidden_size``)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def reset_parameters(self) -> None:
        """Draws every weight from ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``, as torch.nn."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def set_max_batch_length(self, max_batch_length: int) -> None:
        """Tell a per-sample-gradient engine the full batch size of the next forward pass.

        Needed only when the cell is driven step by step with fewer rows than the batch
        (``batch_size_t`` of a sorted packed batch): those calls' per-sample gradients fill
        the first rows of a ``max_batch_length``-row buffer. :class:`DPRNNBase` sets it on
        every forward pass.

        Args:
            max_batch_length: The batch size ``B`` (0 for an empty batch).
        """
        if isinstance(max_batch_length, bool) or not isinstance(max_batch_length, int) or max_batch_length < 0:
            raise ValueError(
                f"max_batch_length must be an int >= 0 (the batch size), got {max_batch_length!r}."
            )
        for linear in self.children():
            linear.max_batch_len = max_batch_length

    def step(self, gates_x: Tensor, state: _State) -> _State:
        """One time step given the already projected input ``ih(x_t)``.

        Args:
            gates_x: ``ih(x_t)``, shape ``[B, num_chunks * hidden_size]``.
            state: ``(h,)`` or ``(h, c)``, each ``[B, *]``.

        Returns:
            The new state, same structure.
        """
        raise NotImplementedError

    def initial_state(self, batch_size: int, like: Tensor) -> _State:
        """Zero state for ``batch_size`` rows, dtype and device of ``like``."""
        h = like.new_zeros(batch_size, self.state_size)
        if self.has_cell_state:
            return (h, like.new_zeros(batch_size, self.hidden_size))
        return (h,)

    def forward(
        self,
        input: Tensor,
        hx: Optional[Union[Tensor, tuple[Tensor, Tensor]]] = None,
        batch_size_t: Optional[int] = None,
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Same inputs and outputs as the matching ``torch.nn`` cell (``nn.RNNCell`` ...).

        Args:
            input: ``[B, input_size]`` or unbatched ``[input_size]``.
            hx: Initial state (``h`` or ``(h, c)``), zeros if ``None``.
            batch_size_t: Opacus' packed-step argument: only the first ``batch_size_t`` rows
                of ``hx`` are used (``input`` has that many rows).

        Returns:
            ``h'`` or ``(h', c')``.
        """
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input must have shape [batch, {self.input_size}] or [{self.input_size}], got "
                f"{tuple(input.shape)}; pass one time step of features of size input_size"
            )
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if hx is None:
            state = self.initial_state(x.shape[0], x)
        else:
            parts = hx if isinstance(hx, tuple) else (hx,)
            state = tuple(p.unsqueeze(0) if unbatched else p for p in parts)
            if batch_size_t is not None:
                _check_batch_size_t(batch_size_t, x.shape[0])
                state = tuple(p[:batch_size_t] for p in state)
        new = self.step(self.ih(x), state)
        if unbatched:
            new = tuple(t.squeeze(0) for t in new)
        return new if self.has_cell_state else new[0]


class DPRNNCell(DPRNNCellBase):
    """Elman cell ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``; DP twin of ``nn.RNNCell``.

    Args:
        input_size: Features of ``x``.
        hidden_size: Features of ``h``.
        bias: Whether the projections have biases.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        device: Where the parameters live.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}"
            )
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def step(self, gates_x: Tensor, state: _State) -> _State:
        """One Elman step (see :meth:`DPRNNCellBase.step`)."""
        pre = gates_x + self.hh(state[0])
        return (torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre),)


class DPGRUCell(DPRNNCellBase):
    """Gated recurrent unit cell (gates r, z, n in torch.nn's order); DP twin of ``nn.GRUCell``.

    Args:
        input_size: Features of ``x``.
        hidden_size: Features of ``h``.
        bias: Whether the projections have biases.
        device: Where the parameters live.
        dtype: Parameter dtype.
    """

    num_chunks = 3

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)

    def step(self, gates_x: Tensor, state: _State) -> _State:
        """One GRU step (see :meth:`DPRNNCellBase.step`)."""
        h = state[0]
        x_r, x_z, x_n = gates_x.chunk(3, dim=1)
        h_r, h_z, h_n = self.hh(h).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)


class DPLSTMCell(DPRNNCellBase):
    """Long short-term memory cell (gates i, f, g, o); DP twin of ``nn.LSTMCell``.

    Args:
        input_size: Features of ``x``.
        hidden_size: Features of the cell state ``c``.
        bias: Whether the projections have biases.
        proj_size: If > 0, ``h = W_hr (o * tanh(c))`` has ``proj_size`` features (as in
            ``nn.LSTM``; ``nn.LSTMCell`` has no projection).
        device: Where the parameters live.
        dtype: Parameter dtype.
    """

    has_cell_state = True
    num_chunks = 4

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        proj_size: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            input_size, hidden_size, bias, proj_size=proj_size, device=device, dtype=dtype
        )

    def step(self, gates_x: Tensor, state: _State) -> _State:
        """One LSTM step (see :meth:`DPRNNCellBase.step`)."""
        h, c = state
        i, f, g, o = (gates_x + self.hh(h)).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if self.proj_size > 0:
            h_new = self.hr(h_new)
        return (h_new, c_new)


#: ``mode`` of :class:`DPRNNBase` -> (cell class, extra cell arguments).
RNN_CELL_TYPES = {
    "RNN_TANH": (DPRNNCell, {"nonlinearity": "tanh"}),
    "RNN_RELU": (DPRNNCell, {"nonlinearity": "relu"}),
    "GRU": (DPGRUCell, {}),
    "LSTM": (DPLSTMCell, {}),
}


def _check_batch_size_t(batch_size_t: object, rows: int) -> None:
    if isinstance(batch_size_t, bool) or not isinstance(batch_size_t, int) or batch_size_t != rows:
        raise ValueError(
            f"batch_size_t must be the number of rows of input ({rows}), got {batch_size_t!r}; it "
            "selects the first batch_size_t rows of hx for a step of a sorted packed batch."
        )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(
            f"{name} must be a bool, got {value!r}; note that the DP recurrent layers take "
            "their arguments in Opacus' order (nonlinearity is a keyword argument)"
        )


def _reverse_time(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverses each sequence of ``x`` ``[B, T, ...]`` within its own length (an involution)."""
    if lengths is None:
        return x.flip(1)
    steps = torch.arange(x.shape[1], device=x.device)
    lens = lengths.unsqueeze(1)
    index = torch.where(steps < lens, lens - 1 - steps, steps)
    index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand_as(x)
    return x.gather(1, index)


class DPRNNBase(RenameParamsMixin, nn.Module):
    """Multi-layer, optionally bidirectional recurrent network over an abstract DP cell.

    DP twin of ``torch.nn.RNNBase``: same arguments (in Opacus' order), same forward contract
    (tensor or ``PackedSequence`` input, optional initial state, same output shapes), same
    state-dict names.

    Args:
        mode: ``"RNN_TANH"``, ``"RNN_RELU"``, ``"GRU"``, ``"LSTM"`` or a
            :class:`DPRNNCellBase` subclass.
        input_size: Features of the input.
        hidden_size: Features of the hidden state.
        num_layers: Stacked recurrent layers.
        bias: Whether the projections have biases.
        batch_first: Input and output are ``[B, T, *]`` instead of ``[T, B, *]`` (not the
            states, as in torch.nn).
        dropout: Dropout probability on the outputs of every layer but the last.
        bidirectional: Run a second, reversed pass per layer.
        proj_size: LSTM only: project ``h`` to this many features.
        cell_params: Extra keyword arguments for the cell constructor.
        device: Where the parameters live.
        dtype: Parameter dtype.

    Raises:
        ValueError, TypeError: On an invalid argument (message names it).
    """

    def __init__(
        self,
        mode: Union[str, type[DPRNNCellBase]],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        cell_params: Optional[dict] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        cell_type, params = self._resolve_mode(mode)
        params.update(cell_params or {})
        self._check_arguments(
            cell_type, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, proj_size,
        )
        self.mode = mode if isinstance(mode, str) else cell_type.__name__
        self.cell_type = cell_type
        self.cell_params = params
        self.has_cell_state = cell_type.has_cell_state
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.num_directions = 2 if bidirectional else 1
        self.initialize_cells(device=device, dtype=dtype)

    @staticmethod
    def _resolve_mode(mode: Union[str, type]) -> tuple[type, dict]:
        if isinstance(mode, str):
            if mode not in RNN_CELL_TYPES:
                raise ValueError(
                    f"mode must be one of {sorted(RNN_CELL_TYPES)} or a cell class, got {mode!r}"
                )
            cell_type, params = RNN_CELL_TYPES[mode]
            return cell_type, dict(params)
        if isinstance(mode, type) and issubclass(mode, DPRNNCellBase):
            return mode, {}
        raise TypeError(f"mode must be a string or a DPRNNCellBase subclass, got {mode!r}")

    @staticmethod
    def _check_arguments(
        cell_type: type, input_size: int, hidden_size: int, num_layers: int, bias: bool,
        batch_first: bool, dropout: float, bidirectional: bool, proj_size: int,
    ) -> None:
        _check_positive_int("input_size", input_size)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("num_layers", num_layers)
        _check_bool("bias", bias)
        _check_bool("batch_first", batch_first)
        _check_bool("bidirectional", bidirectional)
        is_number = isinstance(dropout, numbers.Number) and not isinstance(dropout, bool)
        if not is_number or not 0 <= dropout <= 1:
            raise ValueError(
                f"dropout must be a number in [0, 1] (the probability of zeroing an element), "
                f"got {dropout!r}"
            )
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(
                f"proj_size must be an int >= 0 (0 disables projections), got {proj_size!r}"
            )
        if proj_size > 0 and not issubclass(cell_type, DPLSTMCell):
            raise ValueError(
                f"proj_size={proj_size} is only supported for LSTM, not {cell_type.__name__}; "
                "use proj_size=0"
            )
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size={hidden_size}, got {proj_size}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                UserWarning,
                stacklevel=4,
            )

    def initialize_cells(
        self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> list[DPRNNCellBase]:
        """(Re)create one fresh cell per (layer, direction) and the state-dict name map.

        Cells are named ``l{layer}`` and ``l{layer}_reverse``, as ``torch.nn``'s parameters.

        Args:
            device: Where the parameters live.
            dtype: Parameter dtype.

        Returns:
            The cells, in the order of :attr:`cells`.
        """
        factory = {"device": device, "dtype": dtype}
        extra = {"proj_size": self.proj_size} if self.proj_size > 0 else {}
        names: dict[str, str] = {}
        self.cell_names: list[str] = []
        for layer, directions in self.iterate_layers():
            layer_in = self.input_size if layer == 0 else self._state_size * self.num_directions
            for direction, _ in directions:
                name = f"l{layer}" + ("_reverse" if direction == 1 else "")
                cell = self.cell_type(
                    layer_in, self.hidden_size, self.bias, **self.cell_params, **extra, **factory
                )
                setattr(self, name, cell)
                self.cell_names.append(name)
                for key in cell.old_to_new.values():
                    names[f"{name}.{key}"] = f"{key}_{name}"
        self.set_rename_map(names)
        return self.cells

    def iterate_layers(self, *args: Sequence) -> Iterator[tuple[int, Iterator[tuple[int, tuple]]]]:
        """Walk the (layer, direction) pairs, picking each pair's entry of every argument.

        Each argument is indexed like the cells and the ``[L*D, ...]`` state tensors
        (``layer * num_directions + direction``).

        Args:
            *args: Sequences of length ``num_layers * num_directions``.

        Yields:
            ``(layer, directions)`` where ``directions`` yields
            ``(direction, (args[0][i], args[1][i], ...))``.

        Example:
            >>> for layer, directions in rnn.iterate_layers(rnn.cells, h_0):
            ...     for direction, (cell, h) in directions:
            ...         ...
        """
        for layer in range(self.num_layers):
            first = layer * self.num_directions
            yield layer, (
                (direction, tuple(arg[first + direction] for arg in args))
                for direction in range(self.num_directions)
            )

    @property
    def cells(self) -> list[DPRNNCellBase]:
        """The cells in torch.nn's order: layer 0 forward, layer 0 reverse, layer 1 ..."""
        return [getattr(self, name) for name in self.cell_names]

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``torch.nn``'s cuDNN layers."""

    def reset_parameters(self) -> None:
        """Re-initialises every cell as torch.nn does."""
        for cell in self.cells:
            cell.reset_parameters()

    @property
    def _state_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def forward(
        self,
        input: Union[Tensor, PackedSequence],
        hx: Optional[Union[Tensor, tuple[Tensor, Tensor]]] = None,
        *,
        state_init: Optional[Union[Tensor, tuple[Tensor, Tensor]]] = None,
    ) -> tuple[Union[Tensor, PackedSequence], Union[Tensor, tuple[Tensor, Tensor]]]:
        """Runs the network; inputs and outputs as ``torch.nn.RNN/GRU/LSTM``.

        Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` if ``batch_first``),
                unbatched ``[T, input_size]``, or a ``PackedSequence``.
            hx: Initial state: ``h_0`` ``[L*D, B, H_out]`` (``(h_0, c_0)`` for an LSTM, ``c_0``
                ``[L*D, B, H]``), batch in the caller's order; zeros if ``None``.
            state_init: Opacus' name for ``hx``; give one of the two. (Opacus' second
                positional parameter is ``state_init``; here it is ``torch.nn``'s ``hx``, so
                positional calls behave the same either way.)

        Returns:
            ``(output, h_n)`` or ``(output, (h_n, c_n))``; ``output`` is a ``PackedSequence``
            if ``input`` is one, else ``[T, B, D*H_out]`` (``[B, T, D*H_out]`` if
            ``batch_first``).
        """
        if hx is not None and state_init is not None:
            raise ValueError("pass the initial state as hx or as state_init, not both")
        hx = state_init if hx is None else hx
        x, lengths, unbatched = self._to_padded(input)
        states = self._initial_states(hx, x, unbatched)
        for cell in self.cells:
            cell.set_max_batch_length(x.shape[0])
        layer_input = x
        finals: list[_State] = []
        for layer, directions in self.iterate_layers(self.cells, *states):
            outputs = []
            for direction, (cell, *state) in directions:
                out, final = self._run_direction(cell, layer_input, tuple(state), lengths, direction == 1)
                outputs.append(out)
                finals.append(final)
            layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        output = self._from_padded(layer_input, input, unbatched)
        h_n = torch.stack([f[0] for f in finals])
        if unbatched:
            h_n = h_n.squeeze(1)
        if not self.has_cell_state:
            return output, h_n
        c_n = torch.stack([f[1] for f in finals])
        return output, (h_n, c_n.squeeze(1) if unbatched else c_n)

    def _to_padded(self, input: Union[Tensor, PackedSequence]) -> tuple[Tensor, Optional[Tensor], bool]:
        """-> (batch-first padded input in the caller's batch order, lengths or None, unbatched)."""
        if isinstance(input, PackedSequence):
            x, lengths = pad_packed_sequence(input, batch_first=True)
            self._check_features(x)
            return x, lengths.to(x.device), False
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(
                f"input must be a 3-D tensor (2-D if unbatched) or a PackedSequence, got {shape}"
            )
        self._check_features(input)
        if input.dim() == 2:
            return input.unsqueeze(0), None, True
        return (input if self.batch_first else input.transpose(0, 1)), None, False

    def _check_features(self, x: Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input.size(-1) must be equal to input_size={self.input_size}, got {x.shape[-1]}"
            )

    def _from_padded(self, out: Tensor, input: Union[Tensor, PackedSequence], unbatched: bool):
        if isinstance(input, PackedSequence):
            rows = out if input.sorted_indices is None else out.index_select(0, input.sorted_indices)
            data = torch.cat([rows[:n, t] for t, n in enumerate(input.batch_sizes.tolist())])
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        if unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def _initial_states(self, hx, x: Tensor, unbatched: bool) -> tuple[Tensor, ...]:
        """Initial states as ``[L*D, B, *]`` tensors (``(h,)`` or ``(h, c)``)."""
        batch = x.shape[0]
        layers = self.num_layers * self.num_directions
        sizes = [self._state_size] + ([self.hidden_size] if self.has_cell_state else [])
        if hx is None:
            return tuple(x.new_zeros(layers, batch, size) for size in sizes)
        parts = hx if isinstance(hx, (tuple, list)) else (hx,)
        names = ["h_0", "c_0"][: len(sizes)]
        if len(parts) != len(sizes) or not all(isinstance(p, Tensor) for p in parts):
            raise ValueError(
                f"hx must be {'a tuple (h_0, c_0)' if self.has_cell_state else 'a tensor h_0'} "
                f"for {type(self).__name__}, got {type(hx).__name__} of length {len(parts)}"
            )
        result = []
        for name, part, size in zip(names, parts, sizes):
            part = part.unsqueeze(1) if unbatched and part.dim() == 2 else part
            expected = (layers, batch, size)
            if tuple(part.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(part.shape)}")
            result.append(part)
        return tuple(result)

    def forward_layer(
        self,
        x: Union[Tensor, Sequence[Tensor]],
        h_0: Tensor,
        c_0: Optional[Tensor],
        batch_sizes: Optional[Tensor],
        cell: DPRNNCellBase,
        max_batch_size: int,
        seq_length: int,
        is_packed: bool,
        reverse_layer: bool,
    ) -> tuple[Union[Tensor, list[Tensor]], Tensor, Optional[Tensor]]:
        """One layer in one direction, with Opacus' time-major contract (no dropout).

        Args:
            x: ``[T, B, D]``, or for ``is_packed`` the ``T`` per-step tensors ``[b_t, D]`` of a
                sorted packed batch (``PackedSequence.data.split(batch_sizes)``).
            h_0: Initial hidden state ``[B, H_out]`` (sorted order when packed).
            c_0: Initial cell state ``[B, H]`` for an LSTM cell, else ``None``.
            batch_sizes: ``PackedSequence.batch_sizes`` when packed (else ignored).
            cell: The cell to run.
            max_batch_size: ``B``.
            seq_length: ``T``.
            is_packed: Whether ``x`` is the per-step list of a packed batch.
            reverse_layer: Run from the end of each sequence to its start.

        Returns:
            ``(outputs, h_last, c_last)``: ``outputs`` is ``[T, B, H_out]`` (a list of
            ``[b_t, H_out]`` when packed), in forward time order also for a reversed layer;
            ``h_last`` and ``c_last`` (``None`` without a cell state) are each sequence's
            final state, ``[B, *]``.
        """
        lengths = None
        if is_packed:
            steps = list(x)[:seq_length]
            padded = pad_sequence(steps, batch_first=True)  # [T, B, D]
            lengths = torch.tensor(compute_seq_lengths(batch_sizes), device=h_0.device)
        else:
            padded = x[:seq_length]
        padded = padded.transpose(0, 1)  # [B, T, D]
        if padded.shape[0] != max_batch_size:
            raise ValueError(
                f"max_batch_size={max_batch_size} but the input holds {padded.shape[0]} sequences."
            )
        state: _State = (h_0,)
        if cell.has_cell_state:
            state = (h_0, c_0 if c_0 is not None else h_0.new_zeros(h_0.shape[0], cell.hidden_size))
        cell.set_max_batch_length(max_batch_size)
        out, final = self._run_direction(cell, padded, state, lengths, reverse_layer)
        if is_packed:
            outputs: Union[Tensor, list[Tensor]] = [
                out[:n, t] for t, n in enumerate(batch_sizes.tolist()[:seq_length])
            ]
        else:
            outputs = out.transpose(0, 1)
        return outputs, final[0], final[1] if len(final) > 1 else None

    @staticmethod
    def _run_direction(
        cell: DPRNNCellBase, x: Tensor, state: _State, lengths: Optional[Tensor], reverse: bool
    ) -> tuple[Tensor, _State]:
        """One layer, one direction over batch-first ``x``; -> (outputs ``[B, T, H_out]``, final)."""
        steps = x.shape[1]
        shortest = int(lengths.min()) if lengths is not None else steps
        if shortest == steps:
            lengths = None  # every sequence has full length: the fast path, no masking
        gates = cell.ih(x)
        if reverse and lengths is not None:
            gates = _reverse_time(gates, lengths)
        backwards = reverse and lengths is None
        # unbind: one backward node for all steps; gates[:, t] would add a node per step whose
        # backward writes into a zero-filled gradient of the whole sequence (quadratic in T)
        per_step = gates.unbind(1)
        outputs = []
        for t in range(steps - 1, -1, -1) if backwards else range(steps):
            new = cell.step(per_step[t], state)
            if t >= shortest:  # some sequences may have ended: keep their final state
                alive = (t < lengths).unsqueeze(1)
                new = tuple(torch.where(alive, n, s) for n, s in zip(new, state))
            state = new
            outputs.append(state[0])
        if backwards:
            outputs.reverse()
        out = torch.stack(outputs, dim=1)
        if reverse and lengths is not None:
            out = _reverse_time(out, lengths)
        return out, state


class DPRNN(DPRNNBase):
    """Multi-layer Elman RNN; DP twin of ``torch.nn.RNN``.

    Arguments follow Opacus' order: ``(input_size, hidden_size, num_layers, bias, batch_first,
    dropout, bidirectional, proj_size, nonlinearity)``; ``torch.nn.RNN`` takes
    ``nonlinearity`` fourth, so pass it by keyword. ``proj_size`` must be 0.
    See :class:`DPRNNBase` for the forward contract.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        nonlinearity: str = "tanh",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
            num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device=device, dtype=dtype,
        )
        self.nonlinearity = nonlinearity


class _FixedModeRNN(DPRNNBase):
    """A :class:`DPRNNBase` whose cell type is fixed by the subclass (``_MODE``)."""

    _MODE = ""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            self._MODE, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, proj_size, device=device, dtype=dtype,
        )


class DPGRU(_FixedModeRNN):
    """Multi-layer gated recurrent unit network; DP twin of ``torch.nn.GRU``.

    Same arguments as ``torch.nn.GRU`` (``proj_size`` must be 0). See :class:`DPRNNBase`.
    """

    _MODE = "GRU"


class DPLSTM(_FixedModeRNN):
    """Multi-layer long short-term memory network; DP twin of ``torch.nn.LSTM``.

    Same arguments as ``torch.nn.LSTM``, ``proj_size`` included. See :class:`DPRNNBase`.
    """

    _MODE = "LSTM"
