"""The paired cases: a torch module, the matching flax module, a converter and data.

Every case fixes ONE canonical parameter order: the torch module's
``parameters()`` order (the order in which ``dp_torch.DPOptimizer`` draws noise).
Each torch parameter is mapped to one flax leaf by a :class:`ParamMap` entry: its
state-dict key, its path in the flax ``params`` collection, and a layout function
that acts on the *trailing* dimensions (so it converts a weight, a ``[B, ...]``
per-example gradient or a noise draw alike).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from dp_torch.layers import DPLSTM, DPMultiheadAttention

__all__ = [
    "CASES",
    "Case",
    "ParamMap",
    "conv_layout",
    "get_case",
    "identity_layout",
    "linear_layout",
]


# --------------------------------------------------------------------------- layouts


def identity_layout(a: np.ndarray) -> np.ndarray:
    """Biases, norms' scales, embedding tables: same layout in both frameworks."""
    return a


def linear_layout(a: np.ndarray) -> np.ndarray:
    """torch ``[out, in]`` -> flax kernel ``[in, out]`` (on the last two axes)."""
    return np.swapaxes(a, -1, -2)


def conv_layout(a: np.ndarray) -> np.ndarray:
    """torch conv weight ``[O, I, kh, kw]`` -> flax kernel ``[kh, kw, I, O]``."""
    nd = a.ndim
    lead = list(range(nd - 4))
    return np.transpose(a, lead + [nd - 2, nd - 1, nd - 3, nd - 4])


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """How one torch parameter becomes one flax leaf.

    Attributes:
        name: Name of the parameter in ``module.named_parameters()``.
        flax_path: Path of the leaf inside the flax ``params`` collection.
        layout: Maps the torch layout to the flax layout on the trailing axes.
        state_key: Key of the tensor holding it in ``module.state_dict()`` (default
            ``name``; differs for layers that rename their state, such as DPLSTM).
        rows: ``(start, stop)`` rows of that tensor when it packs several parameters
            (DPMultiheadAttention saves q, k, v as one ``in_proj_weight``).
    """

    name: str
    flax_path: tuple[str, ...]
    layout: Callable[[np.ndarray], np.ndarray]
    state_key: str | None = None
    rows: tuple[int, int] | None = None

    def from_state(self, state_dict: Mapping[str, Any]) -> np.ndarray:
        """This parameter's value (torch layout) read from a state dict."""
        value = state_dict[self.state_key or self.name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy().copy()
        value = np.asarray(value)
        return value if self.rows is None else value[self.rows[0]:self.rows[1]]


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: Sequence[str]) -> Any:
    """The leaf of a nested mapping at ``path``."""
    for key in path:
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------- case


def _xent_torch(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, ``[B]``."""
    return nn.functional.cross_entropy(logits, y, reduction="none")


def _xent_jax(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy of one example's logits ``[K]``."""
    return -jax.nn.log_softmax(logits)[y]


@dataclasses.dataclass(frozen=True)
class Case:
    """One paired torch/flax model with its data.

    Attributes:
        name: Short name (row label of the parity table).
        make_torch: ``make_torch() -> nn.Module`` (float32, seeded init).
        flax_module: The matching ``flax.linen`` module.
        params: The :class:`ParamMap` entries (any order; the canonical order is
            the torch module's ``parameters()`` order).
        make_data: ``make_data(n, rng) -> (x, y)`` in torch layout (numpy).
        float_input: Whether ``x`` is cast to the model dtype (False for token ids).
        to_flax_input: Maps a batch of ``x`` from torch to flax layout.
    """

    name: str
    make_torch: Callable[[], nn.Module]
    flax_module: fnn.Module
    params: tuple[ParamMap, ...]
    make_data: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    float_input: bool = True
    to_flax_input: Callable[[np.ndarray], np.ndarray] = identity_layout

    # ---------------------------------------------------------------- torch side

    def torch_model(self, dtype: str, seed: int = 0) -> nn.Module:
        """The torch module in ``dtype`` with a seeded initialisation."""
        torch.manual_seed(seed)
        return self.make_torch().to(getattr(torch, dtype))

    def ordered_maps(self, model: nn.Module) -> list[ParamMap]:
        """The :class:`ParamMap` entries in the canonical (torch ``parameters()``) order."""
        by_name = {m.name: m for m in self.params}
        out = [by_name[n] for n, p in model.named_parameters() if p.requires_grad]
        if len(out) != len(self.params):
            raise ValueError(f"case {self.name}: ParamMap does not cover the torch parameters.")
        return out

    def torch_batch(self, x: np.ndarray, y: np.ndarray, dtype: str) -> tuple:
        """``(x, y)`` as torch tensors (``x`` cast to ``dtype`` for float inputs)."""
        tx = torch.from_numpy(x.astype(dtype) if self.float_input else x)
        return tx, torch.from_numpy(y)

    # ---------------------------------------------------------------- flax side

    def convert(self, state_dict: Mapping[str, Any]) -> dict:
        """The converter: a torch state dict (tensors or arrays) -> flax variables."""
        params: dict = {}
        for m in self.params:
            _set_path(params, m.flax_path, np.ascontiguousarray(m.layout(m.from_state(state_dict))))
        return {"params": params}

    def to_flax(self, model: nn.Module, named: Sequence[np.ndarray]) -> dict:
        """Arrays in canonical order and torch layout (trailing axes) -> a flax tree."""
        tree: dict = {}
        for m, value in zip(self.ordered_maps(model), named):
            _set_path(tree, m.flax_path, np.ascontiguousarray(m.layout(np.asarray(value))))
        return {"params": tree}

    def jax_batch(self, x: np.ndarray, y: np.ndarray, dtype: str) -> dict:
        """``{"x", "y"}`` in flax layout (``x`` cast to ``dtype`` for float inputs)."""
        fx = self.to_flax_input(x.astype(dtype) if self.float_input else x)
        return {"x": np.ascontiguousarray(fx), "y": y}

    def jax_loss(self) -> Callable[[Any, Any], jax.Array]:
        """``loss(variables, example) -> scalar`` for one example (no batch axis)."""
        module = self.flax_module

        def loss(variables: Any, example: Any) -> jax.Array:
            logits = module.apply(variables, example["x"][None])[0]
            return _xent_jax(logits, example["y"])

        return loss

    def torch_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses ``[B]`` of the torch model."""
        return _xent_torch(model(x), y)


# --------------------------------------------------------------------------- MLP


class TorchMLP(nn.Module):
    """Linear - tanh - Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class FlaxMLP(fnn.Module):
    """Flax twin of :class:`TorchMLP`."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return fnn.Dense(3, name="fc2")(jnp.tanh(fnn.Dense(8, name="fc1")(x)))


def _dense(
    prefix: str, flax_name: str, path: tuple[str, ...] | None = None
) -> tuple[ParamMap, ParamMap]:
    path = (flax_name,) if path is None else path
    return (
        ParamMap(f"{prefix}.weight", path + ("kernel",), linear_layout),
        ParamMap(f"{prefix}.bias", path + ("bias",), identity_layout),
    )


def _features(n: int, rng: np.random.Generator, shape: tuple[int, ...], k: int = 3):
    return rng.standard_normal((n,) + shape), rng.integers(0, k, size=n).astype(np.int64)


MLP = Case(
    name="mlp",
    make_torch=TorchMLP,
    flax_module=FlaxMLP(),
    params=_dense("fc1", "fc1") + _dense("fc2", "fc2"),
    make_data=lambda n, rng: _features(n, rng, (6,)),
)


# --------------------------------------------------------------------------- CNN


class TorchCNN(nn.Module):
    """Conv(1->4, 3x3, pad 1) - GroupNorm(2, 4) - ReLU - MaxPool(2) - Linear(36 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.norm(self.conv(x))))
        return self.fc(h.flatten(1))


class FlaxCNN(fnn.Module):
    """Flax twin of :class:`TorchCNN` (NHWC; flattened in torch's C, H, W order)."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = fnn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)
        h = fnn.GroupNorm(num_groups=2, epsilon=1e-5, use_fast_variance=False, name="norm")(h)
        h = fnn.max_pool(jax.nn.relu(h), (2, 2), strides=(2, 2))
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
        return fnn.Dense(3, name="fc")(h)


CNN = Case(
    name="cnn",
    make_torch=TorchCNN,
    flax_module=FlaxCNN(),
    params=(
        ParamMap("conv.weight", ("conv", "kernel"), conv_layout),
        ParamMap("conv.bias", ("conv", "bias"), identity_layout),
        ParamMap("norm.weight", ("norm", "scale"), identity_layout),
        ParamMap("norm.bias", ("norm", "bias"), identity_layout),
    ) + _dense("fc", "fc"),
    make_data=lambda n, rng: _features(n, rng, (1, 6, 6)),
    to_flax_input=lambda x: np.transpose(x, (0, 2, 3, 1)),
)


# --------------------------------------------------------------------------- embedding + LSTM


_VOCAB, _EMB, _HID, _SEQ = 12, 5, 6, 5


class TorchLSTMText(nn.Module):
    """Embedding - DPLSTM - Linear on the last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(_VOCAB, _EMB)
        self.lstm = DPLSTM(_EMB, _HID, batch_first=True)
        self.fc = nn.Linear(_HID, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(tokens))
        return self.fc(out[:, -1])


class FlaxLSTMCell(fnn.Module):
    """An LSTM with torch's gate order (i, f, g, o) and separate input/recurrent biases."""

    hidden: int

    @fnn.compact
    def __call__(self, xs: jax.Array) -> jax.Array:
        ih = fnn.Dense(4 * self.hidden, name="ih")
        hh = fnn.Dense(4 * self.hidden, name="hh")
        batch = xs.shape[0]
        h = jnp.zeros((batch, self.hidden), xs.dtype)
        c = jnp.zeros((batch, self.hidden), xs.dtype)
        outs = []
        for t in range(xs.shape[1]):
            i, f, g, o = jnp.split(ih(xs[:, t]) + hh(h), 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            outs.append(h)
        return jnp.stack(outs, axis=1)


class FlaxLSTMText(fnn.Module):
    """Flax twin of :class:`TorchLSTMText`."""

    @fnn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        e = fnn.Embed(_VOCAB, _EMB, name="emb")(tokens)
        out = FlaxLSTMCell(_HID, name="lstm")(e)
        return fnn.Dense(3, name="fc")(out[:, -1])


def _tokens(n: int, rng: np.random.Generator, length: int, vocab: int):
    return (
        rng.integers(0, vocab, size=(n, length)).astype(np.int64),
        rng.integers(0, 3, size=n).astype(np.int64),
    )


LSTM = Case(
    name="lstm",
    make_torch=TorchLSTMText,
    flax_module=FlaxLSTMText(),
    params=(
        ParamMap("emb.weight", ("emb", "embedding"), identity_layout),
        ParamMap("lstm.l0.ih.weight", ("lstm", "ih", "kernel"), linear_layout,
                 "lstm.weight_ih_l0"),
        ParamMap("lstm.l0.ih.bias", ("lstm", "ih", "bias"), identity_layout, "lstm.bias_ih_l0"),
        ParamMap("lstm.l0.hh.weight", ("lstm", "hh", "kernel"), linear_layout,
                 "lstm.weight_hh_l0"),
        ParamMap("lstm.l0.hh.bias", ("lstm", "hh", "bias"), identity_layout, "lstm.bias_hh_l0"),
    ) + _dense("fc", "fc"),
    make_data=lambda n, rng: _tokens(n, rng, _SEQ, _VOCAB),
    float_input=False,
)


# --------------------------------------------------------------------------- transformer block


_E, _HEADS, _T, _FF = 8, 2, 4, 16


class TorchBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm, DPMultiheadAttention, MLP) and a mean-pool head."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(_E)
        self.attn = DPMultiheadAttention(_E, _HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(_E)
        self.ff1 = nn.Linear(_E, _FF)
        self.ff2 = nn.Linear(_FF, _E)
        self.head = nn.Linear(_E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))
        return self.head(x.mean(dim=1))


class FlaxAttention(fnn.Module):
    """Multi-head self-attention with DPMultiheadAttention's q/k/v/out projections."""

    embed: int
    heads: int

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        d = self.embed // self.heads

        def split(z: jax.Array) -> jax.Array:
            return z.reshape(b, t, self.heads, d).transpose(0, 2, 1, 3)

        q = split(fnn.Dense(self.embed, name="q")(x))
        k = split(fnn.Dense(self.embed, name="k")(x))
        v = split(fnn.Dense(self.embed, name="v")(x))
        scores = jnp.matmul(q * np.sqrt(1.0 / d), jnp.swapaxes(k, -2, -1))
        out = jnp.matmul(jax.nn.softmax(scores, axis=-1), v)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, self.embed)
        return fnn.Dense(self.embed, name="out")(out)


class FlaxBlock(fnn.Module):
    """Flax twin of :class:`TorchBlock`."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def ln(name: str) -> fnn.LayerNorm:
            return fnn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)

        x = x + FlaxAttention(_E, _HEADS, name="attn")(ln("ln1")(x))
        h = jax.nn.gelu(fnn.Dense(_FF, name="ff1")(ln("ln2")(x)), approximate=False)
        x = x + fnn.Dense(_E, name="ff2")(h)
        return fnn.Dense(3, name="head")(x.mean(axis=1))


def _ln(prefix: str) -> tuple[ParamMap, ParamMap]:
    return (
        ParamMap(f"{prefix}.weight", (prefix, "scale"), identity_layout),
        ParamMap(f"{prefix}.bias", (prefix, "bias"), identity_layout),
    )


def _attn_maps() -> tuple[ParamMap, ...]:
    out: tuple[ParamMap, ...] = ()
    for i, (torch_name, flax_name) in enumerate((("qlinear", "q"), ("klinear", "k"),
                                                 ("vlinear", "v"))):
        rows = (i * _E, (i + 1) * _E)
        out += (
            ParamMap(f"attn.{torch_name}.weight", ("attn", flax_name, "kernel"), linear_layout,
                     "attn.in_proj_weight", rows),
            ParamMap(f"attn.{torch_name}.bias", ("attn", flax_name, "bias"), identity_layout,
                     "attn.in_proj_bias", rows),
        )
    return out + _dense("attn.out_proj", "out", ("attn", "out"))


TRANSFORMER = Case(
    name="transformer",
    make_torch=TorchBlock,
    flax_module=FlaxBlock(),
    params=_ln("ln1") + _attn_maps() + _ln("ln2") + _dense("ff1", "ff1") + _dense("ff2", "ff2")
    + _dense("head", "head"),
    make_data=lambda n, rng: _features(n, rng, (_T, _E)),
)


# --------------------------------------------------------------------------- embedding bag


_BAG_VOCAB, _BAG_DIM, _BAG_LEN = 15, 6, 4


class TorchBag(nn.Module):
    """EmbeddingBag(mean) over fixed-length bags - Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(_BAG_VOCAB, _BAG_DIM, mode="mean")
        self.fc = nn.Linear(_BAG_DIM, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bag(tokens))


class FlaxBag(fnn.Module):
    """Flax twin of :class:`TorchBag`: embed, mean over the bag."""

    @fnn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        e = fnn.Embed(_BAG_VOCAB, _BAG_DIM, name="bag")(tokens).mean(axis=1)
        return fnn.Dense(3, name="fc")(e)


EMBEDDING_BAG = Case(
    name="embedding_bag",
    make_torch=TorchBag,
    flax_module=FlaxBag(),
    params=(ParamMap("bag.weight", ("bag", "embedding"), identity_layout),) + _dense("fc", "fc"),
    make_data=lambda n, rng: _tokens(n, rng, _BAG_LEN, _BAG_VOCAB),
    float_input=False,
)


#: All cases, in table order.
CASES: tuple[Case, ...] = (MLP, CNN, LSTM, TRANSFORMER, EMBEDDING_BAG)


def get_case(name: str) -> Case:
    """The case called ``name``.

    Raises:
        ValueError: If there is none.
    """
    for case in CASES:
        if case.name == name:
            return case
    raise ValueError(f"unknown case {name!r}; choose from {[c.name for c in CASES]}.")
