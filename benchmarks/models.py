"""The benchmark models (PyTorch), with the shapes of the published reference speed table.

Each architecture is described exactly so that a flax twin can be written from the
docstring alone. Conventions: ``Linear(a, b)`` is ``y = x W^T + b`` with a bias,
``Conv(a, b, k)`` is a 2-d convolution with ``a`` input and ``b`` output channels, a
``k x k`` kernel, stride 1, zero padding ``k // 2`` and a bias; tensors are NCHW in torch
(the flax twin uses NHWC). Only layers with per-sample gradient samplers in both Opacus and
dp_torch are used (``Linear``, ``Conv2d``, ``Embedding``, ``LayerNorm`` and the DP LSTM),
so every DP mode runs on the same graph; attention is written out with
``F.scaled_dot_product_attention`` instead of ``nn.MultiheadAttention``.

Models (``build_model(name)``; inputs from ``make_batch``; classes below give every detail):

* ``mlp`` (669,706 parameters): ``Linear(784,512)``, ReLU, ``Linear(512,512)``, ReLU,
  ``Linear(512,10)``; input ``float32 [B, 784]``; reference batch 1024.
* ``cnn`` (390,986): four ``Conv 3x3`` with 32, 64, 128, 256 channels, each followed by
  ReLU, a 2x2 max pool after the first three, mean over the remaining 4x4 positions,
  ``Linear(256,10)``; input ``float32 [B, 3, 32, 32]``; reference batch 512.
* ``lstm`` (1,419,778): ``Embedding(8000,128)``, one LSTM layer 128 -> 256 (batch first),
  final hidden state, ``Linear(256,2)``; input ``int64 [B, 64]``; reference batch 256.
* ``transformer`` (5,240,834): ``Embedding(8000,256)`` plus a learned position
  ``Embedding(128,256)``, 4 pre-LN blocks (d 256, 4 heads, MLP 1024, GELU), final
  ``LayerNorm(256)``, mean over positions, ``Linear(256,2)``; input ``int64 [B, 128]``;
  reference batch 64.
* ``transformer-768`` (34,596,866): the same with d 768, 12 heads, MLP 3072; reference
  batch 32.
* ``gpt2`` (5,240,320): ``transformers.GPT2LMHeadModel`` from a local ``GPT2Config``
  (4 layers, d 256, 4 heads, 128 positions, vocabulary 8000, dropout 0), random init;
  learned position embeddings, pre-LN blocks, tanh-approximated GELU, LM head tied to the
  token embedding. Input ``int64 [B, 128]``, labels the next token at every position
  (``int64 [B, 128]``), output logits ``[B, 128, 8000]``; reference batch 32. Needs
  ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks._specs import LANGUAGE_MODELS, MODEL_NAMES, SPECS, ModelSpec, check_name

__all__ = [
    "GPT2LM",
    "LANGUAGE_MODELS",
    "MODEL_NAMES",
    "ModelSpec",
    "SPECS",
    "CNN",
    "LSTMClassifier",
    "MLP",
    "TransformerBlock",
    "TransformerClassifier",
    "build_model",
    "count_parameters",
    "make_batch",
]


class MLP(nn.Module):
    """MLP 784 -> 512 -> 512 -> 10 with ReLU between the linear layers.

    Layers, in order: ``fc1 = Linear(784, 512)``, ReLU, ``fc2 = Linear(512, 512)``, ReLU,
    ``fc3 = Linear(512, 10)``. Input ``float32 [B, 784]``; output logits ``[B, 10]``.
    """

    def __init__(self) -> None:
        """Create the three linear layers."""
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` of shape ``[B, 784]``."""
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Four 3x3 convolutions on 32x32x3 images, then a linear classifier.

    ``conv1 = Conv(3, 32, 3)``, ReLU, max pool 2x2 (stride 2) -> 16x16;
    ``conv2 = Conv(32, 64, 3)``, ReLU, max pool -> 8x8;
    ``conv3 = Conv(64, 128, 3)``, ReLU, max pool -> 4x4;
    ``conv4 = Conv(128, 256, 3)``, ReLU, mean over the 4x4 positions -> ``[B, 256]``;
    ``fc = Linear(256, 10)``. Input ``float32 [B, 3, 32, 32]`` (NCHW); output ``[B, 10]``.
    No normalisation layers (batch norm is not DP; group norm would be the DP choice).
    """

    def __init__(self) -> None:
        """Create the four convolutions and the classifier."""
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 256, 3, padding=1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``x`` of shape ``[B, 3, 32, 32]``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        x = F.relu(self.conv4(x)).mean(dim=(2, 3))
        return self.fc(x)


class LSTMClassifier(nn.Module):
    """Embedding + single-layer LSTM text classifier.

    ``embedding = Embedding(8000, 128)``; ``lstm`` = one LSTM layer, input 128, hidden 256,
    batch first, zero initial state, gates in PyTorch's order (input, forget, cell,
    output) with both input and hidden biases; the final hidden state ``h_T`` ``[B, 256]``
    goes to ``fc = Linear(256, 2)``. Input ``int64 [B, 64]`` token ids; output ``[B, 2]``.

    The recurrent layer's class is a parameter: ``nn.LSTM`` for non-private training,
    ``dp_torch.layers.DPLSTM`` or ``opacus.layers.DPLSTM`` (same constructor and outputs,
    but built from linear layers that have per-sample gradient samplers) for DP.
    """

    def __init__(
        self,
        lstm_cls: Callable[..., nn.Module] = nn.LSTM,
        vocab: int = 8000,
        embed_dim: int = 128,
        hidden: int = 256,
        num_classes: int = 2,
    ) -> None:
        """Create the layers.

        Args:
            lstm_cls: ``nn.LSTM`` or a DP LSTM class with the same signature.
            vocab: Vocabulary size.
            embed_dim: Embedding width.
            hidden: LSTM hidden size.
            num_classes: Output classes.
        """
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed_dim)
        self.lstm = lstm_cls(embed_dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for token ids ``tokens`` of shape ``[B, T]``."""
        _, (h_n, _) = self.lstm(self.embedding(tokens))
        return self.fc(h_n[-1])


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block (no dropout, no mask).

    ``x = x + proj(attention(qkv(ln1(x))))`` and ``x = x + fc2(gelu(fc1(ln2(x))))`` with
    ``ln1, ln2 = LayerNorm(d)`` (eps 1e-5, with affine parameters), ``qkv = Linear(d, 3d)``
    whose output splits, in this order, into queries, keys and values, each reshaped to
    ``[B, heads, T, d / heads]``; softmax attention scaled by ``1 / sqrt(d / heads)``;
    heads merged back to ``[B, T, d]`` before ``proj = Linear(d, d)``;
    ``fc1 = Linear(d, 4d)``, exact (erf) GELU, ``fc2 = Linear(4d, d)``.
    """

    def __init__(self, d_model: int = 256, heads: int = 4) -> None:
        """Create the block.

        Args:
            d_model: Model width ``d``.
            heads: Attention heads (must divide ``d_model``).

        Raises:
            ValueError: If ``heads`` does not divide ``d_model``.
        """
        super().__init__()
        if d_model % heads:
            raise ValueError(
                f"heads must divide d_model, got heads={heads} and d_model={d_model}; "
                "pick a divisor."
            )
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.proj(mixed.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[B, T, d]``."""
        x = x + self._attention(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerClassifier(nn.Module):
    """Token classifier: embeddings, pre-LN transformer blocks, mean pooling, linear head.

    ``tokens = Embedding(8000, 256)`` plus ``positions = Embedding(128, 256)`` indexed by
    ``0..T-1`` (repeated for every example, so every parameter has a per-example input);
    4 :class:`TransformerBlock` (d 256, 4 heads, MLP 1024); ``ln = LayerNorm(256)``; mean
    over the ``T`` positions; ``head = Linear(256, 2)``. Input ``int64 [B, 128]``; output
    ``[B, 2]``. 5,240,834 parameters with the defaults.
    """

    def __init__(
        self,
        vocab: int = 8000,
        seq_len: int = 128,
        d_model: int = 256,
        layers: int = 4,
        heads: int = 4,
        num_classes: int = 2,
    ) -> None:
        """Create the layers.

        Args:
            vocab: Vocabulary size.
            seq_len: Longest sequence (size of the position table).
            d_model: Model width.
            layers: Number of blocks.
            heads: Attention heads per block.
            num_classes: Output classes.
        """
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for token ids ``tokens`` of shape ``[B, T]``."""
        batch, length = tokens.shape
        # A contiguous copy, not an expanded view: Opacus 1.6's ghost-clipping norm sampler
        # for embeddings calls .view() on the indices and fails on an expanded tensor.
        where = torch.arange(length, device=tokens.device).repeat(batch, 1)
        x = self.tokens(tokens) + self.positions(where)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(dim=1))


class GPT2LM(nn.Module):
    """``transformers.GPT2LMHeadModel`` returning its logits, with explicit position ids.

    The position ids are a contiguous ``[B, T]`` copy of ``0..T-1`` rather than the
    library's broadcast ``[1, T]`` row, so that the position embedding sees one row per
    example (Opacus' per-sample gradients need this; dp_torch handles either).
    """

    def __init__(self, vocab: int = 8000, positions: int = 128, width: int = 256,
                 layers: int = 4, heads: int = 4) -> None:
        """Create a randomly initialised GPT-2 (dropout 0).

        Args:
            vocab: Vocabulary size.
            positions: Size of the position table (longest sequence).
            width: Model width.
            layers: Number of blocks.
            heads: Attention heads per block.
        """
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width,
                            n_layer=layers, n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``tokens`` of shape ``[B, T]``."""
        batch, length = tokens.shape
        where = torch.arange(length, device=tokens.device).repeat(batch, 1)
        return self.gpt2(input_ids=tokens, position_ids=where).logits


def build_model(
    name: str, *, lstm_cls: Callable[..., nn.Module] = nn.LSTM, seq_len: Optional[int] = None
) -> nn.Module:
    """A freshly initialised benchmark model.

    Args:
        name: One of :data:`MODEL_NAMES`.
        lstm_cls: Recurrent layer class for ``"lstm"`` (ignored otherwise).
        seq_len: Sequence length for the ``"transformer"`` models (size of their position
            table); defaults to the reference 128. GPT-2's table always has 128 rows.

    Returns:
        The model (in training mode, float32, on the CPU).

    Raises:
        ValueError: If ``name`` is unknown.
    """
    if name == "mlp":
        return MLP()
    if name == "cnn":
        return CNN()
    if name == "lstm":
        return LSTMClassifier(lstm_cls=lstm_cls)
    spec = SPECS.get(name)
    if name == "gpt2":
        return GPT2LM(spec.vocab, spec.seq_len, spec.width, heads=spec.heads)
    if spec is not None and spec.width is not None:
        return TransformerClassifier(seq_len=seq_len or spec.seq_len, d_model=spec.width,
                                     heads=spec.heads)
    raise ValueError(f"name must be one of {list(MODEL_NAMES)}, got {name!r}.")


def make_batch(
    name: str,
    batch: int,
    *,
    seq_len: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic inputs and labels of the right shape and dtype for model ``name``.

    Args:
        name: One of :data:`MODEL_NAMES`.
        batch: Number of examples.
        seq_len: Sequence length for token models (default: the reference length).
        generator: Optional torch generator for reproducible data.

    Returns:
        ``(inputs, labels)`` on the CPU; a language model's labels are its inputs shifted
        left by one position (the last wraps around).

    Raises:
        ValueError: If ``name`` is unknown or ``batch`` / ``seq_len`` is not positive.
    """
    check_name(name)
    if batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}.")
    spec = SPECS[name]
    if name in LANGUAGE_MODELS:
        tokens = torch.randint(0, spec.vocab, (batch, seq_len or spec.seq_len), generator=generator)
        return tokens, tokens.roll(-1, 1)
    labels = torch.randint(0, spec.num_classes, (batch,), generator=generator)
    if name == "mlp":
        return torch.randn(batch, 784, generator=generator), labels
    if name == "cnn":
        return torch.randn(batch, 3, 32, 32, generator=generator), labels
    length = seq_len or spec.seq_len
    if length is None or length < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
    assert spec.vocab is not None
    return torch.randint(0, spec.vocab, (batch, length), generator=generator), labels


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

