"""The benchmark models in ``flax.linen``: twins of :mod:`benchmarks.models`.

Same layers, same parameter shapes and counts as the PyTorch models, with JAX's
conventions: images are NHWC (``[B, 32, 32, 3]``) instead of NCHW, dense kernels are
``[in, out]`` (the transpose of ``torch.nn.Linear.weight``), convolution kernels are
``[k, k, in, out]``. Initialisations follow flax's defaults (the LSTM's follow PyTorch's
uniform rule); they do not affect the step time. Every model takes a compute ``dtype``
(``jnp.bfloat16`` for the bf16 benchmark; parameters stay float32 and are cast where
used). Nothing here imports torch.

Models (``build_model(name)``; parameters from ``init_params``, inputs from
``make_batch``):

* ``mlp`` (669,706 parameters): ``Dense 512``, ReLU, ``Dense 512``, ReLU, ``Dense 10``;
  input ``float32 [B, 784]``.
* ``cnn`` (390,986): four 3x3 ``Conv`` (stride 1, ``SAME`` padding = PyTorch's padding 1)
  with 32, 64, 128, 256 channels, each followed by ReLU, a 2x2 max pool after the first
  three, mean over the remaining 4x4 positions, ``Dense 10``; input ``float32
  [B, 32, 32, 3]``.
* ``lstm`` (1,419,778): ``Embed(8000, 128)``, one LSTM layer 128 -> 256 (zero initial
  state, PyTorch's gate order input, forget, cell, output, separate input and hidden
  biases), final hidden state, ``Dense 2``; input ``int32 [B, 64]``.
* ``transformer`` (5,240,834 with sequence length 128): ``Embed(8000, 256)`` plus a
  learned position ``Embed(T_max, 256)``, 4 pre-LN blocks (d 256, 4 heads, MLP 1024,
  exact GELU, LayerNorm epsilon 1e-5), final ``LayerNorm``, mean over positions,
  ``Dense 2``; input ``int32 [B, T]``.
* ``transformer-768`` (34,596,866): the same with d 768, 12 heads, MLP 3072.
* ``gpt2`` (5,240,320): the twin of ``transformers.GPT2LMHeadModel`` with the benchmark's
  config: token ``Embed(8000, 256)`` plus a learned position ``Embed(128, 256)``, 4 pre-LN
  causal blocks (d 256, 4 heads, MLP 1024, tanh-approximated GELU, LayerNorm epsilon
  1e-5), final LayerNorm, logits by the transposed token embedding (the tied LM head);
  input ``int32 [B, T]``, labels ``int32 [B, T]`` (the next tokens), output
  ``[B, T, 8000]``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._specs import LANGUAGE_MODELS, MODEL_NAMES, SPECS, ModelSpec, check_name

__all__ = [
    "CNN",
    "GPT2LM",
    "LANGUAGE_MODELS",
    "LSTM",
    "LSTMClassifier",
    "MLP",
    "MODEL_NAMES",
    "ModelSpec",
    "SPECS",
    "TransformerBlock",
    "TransformerClassifier",
    "build_model",
    "count_parameters",
    "init_params",
    "make_batch",
]

_LN_EPSILON = 1e-5  # PyTorch's LayerNorm default (flax's is 1e-6)


class MLP(nn.Module):
    """MLP 784 -> 512 -> 512 -> 10 with ReLU between the dense layers (``fc1..fc3``).

    Attributes:
        dtype: Compute dtype.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[B, 10]`` for ``x`` of shape ``[B, 784]``."""
        x = nn.relu(nn.Dense(512, dtype=self.dtype, name="fc1")(x))
        x = nn.relu(nn.Dense(512, dtype=self.dtype, name="fc2")(x))
        return nn.Dense(10, dtype=self.dtype, name="fc3")(x)


class CNN(nn.Module):
    """Four 3x3 convolutions on 32x32x3 NHWC images, then a dense classifier.

    ``conv1`` (32 channels), ReLU, 2x2 max pool -> 16x16; ``conv2`` (64), ReLU, pool ->
    8x8; ``conv3`` (128), ReLU, pool -> 4x4; ``conv4`` (256), ReLU, mean over the 4x4
    positions; ``fc = Dense 10``. No normalisation layers.

    Attributes:
        dtype: Compute dtype.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[B, 10]`` for images ``x`` of shape ``[B, 32, 32, 3]``."""
        for i, width in enumerate((32, 64, 128, 256)):
            conv = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype, name=f"conv{i + 1}")
            x = nn.relu(conv(x))
            if i < 3:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10, dtype=self.dtype, name="fc")(jnp.mean(x, axis=(1, 2)))


class LSTM(nn.Module):
    """One LSTM layer over ``[B, T, d_in]`` with PyTorch's parametrisation; returns ``h_T``.

    Parameters: ``kernel_ih [d_in, 4H]``, ``bias_ih [4H]``, ``kernel_hh [H, 4H]``,
    ``bias_hh [4H]``, the ``4H`` axis split into the input, forget, cell and output
    gates in that order; all drawn from ``U(-1/sqrt(H), 1/sqrt(H))`` as PyTorch does.
    The input projection is computed for all steps at once; ``jax.lax.scan`` runs the
    recurrence from a zero state.

    Attributes:
        hidden: Hidden size ``H``.
        dtype: Compute dtype (the parameters are cast to it).
    """

    hidden: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Final hidden state ``[B, H]`` for inputs ``x`` of shape ``[B, T, d_in]``."""
        width = 4 * self.hidden
        bound = 1.0 / math.sqrt(self.hidden)

        def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel_ih, bias_ih, kernel_hh, bias_hh = (
            self.param(name, init, shape).astype(self.dtype)
            for name, shape in (("kernel_ih", (x.shape[-1], width)), ("bias_ih", (width,)),
                                ("kernel_hh", (self.hidden, width)), ("bias_hh", (width,))))
        x = x.astype(self.dtype)
        inputs = jnp.einsum("btd,dg->tbg", x, kernel_ih) + bias_ih  # time-major for the scan

        def cell(carry: tuple[jax.Array, jax.Array], projected: jax.Array):
            h, c = carry
            gates = projected + h @ kernel_hh + bias_hh
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), None

        zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        (h, _), _ = jax.lax.scan(cell, (zeros, zeros), inputs)
        return h


class LSTMClassifier(nn.Module):
    """``Embed(vocab, 128)``, :class:`LSTM` (256), ``Dense(num_classes)`` on ``h_T``.

    Attributes:
        vocab: Vocabulary size.
        embed_dim: Embedding width.
        hidden: LSTM hidden size.
        num_classes: Output classes.
        dtype: Compute dtype.
    """

    vocab: int = 8000
    embed_dim: int = 128
    hidden: int = 256
    num_classes: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``[B, num_classes]`` for token ids ``tokens`` of shape ``[B, T]``."""
        x = nn.Embed(self.vocab, self.embed_dim, dtype=self.dtype, name="embedding")(tokens)
        h = LSTM(self.hidden, self.dtype, name="lstm")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(h)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm encoder block (no dropout, no mask), as :mod:`benchmarks.models`'.

    ``x = x + proj(attention(qkv(ln1(x))))`` then ``x = x + fc2(gelu(fc1(ln2(x))))``;
    ``qkv`` splits into queries, keys, values (in that order), each into ``heads``
    heads; softmax attention scaled by ``1 / sqrt(d / heads)``; exact (erf) GELU. GPT-2's
    block is the same with a causal mask and the tanh-approximated GELU.

    Attributes:
        d_model: Model width ``d``.
        heads: Attention heads (must divide ``d_model``).
        causal: Whether a position attends only to itself and earlier positions.
        approximate_gelu: Whether the GELU is the tanh approximation (GPT-2's).
        dtype: Compute dtype.
    """

    d_model: int = 256
    heads: int = 4
    causal: bool = False
    approximate_gelu: bool = False
    dtype: Any = jnp.float32

    def _attention(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.heads
        q, k, v = jnp.split(nn.Dense(3 * width, dtype=self.dtype, name="qkv")(x), 3, axis=-1)

        def split_heads(t: jax.Array) -> jax.Array:
            return jnp.reshape(t, (batch, length, self.heads, head_dim))

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        if self.causal:
            scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores,
                               jnp.finfo(scores.dtype).min)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        mixed = jnp.reshape(mixed, (batch, length, width))
        return nn.Dense(width, dtype=self.dtype, name="proj")(mixed)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to ``x`` of shape ``[B, T, d]``."""
        if self.d_model % self.heads:
            raise ValueError(
                f"heads must divide d_model, got heads={self.heads} and d_model={self.d_model}; "
                "pick a divisor."
            )
        x = x + self._attention(nn.LayerNorm(_LN_EPSILON, dtype=self.dtype, name="ln1")(x))
        normed = nn.LayerNorm(_LN_EPSILON, dtype=self.dtype, name="ln2")(x)
        hidden = nn.Dense(4 * self.d_model, dtype=self.dtype, name="fc1")(normed)
        hidden = nn.gelu(hidden, approximate=self.approximate_gelu)
        return x + nn.Dense(self.d_model, dtype=self.dtype, name="fc2")(hidden)


class TransformerClassifier(nn.Module):
    """Token and position embeddings, pre-LN blocks, final LayerNorm, mean pool, dense head.

    Its attributes are the arguments of the PyTorch twin,
    :class:`benchmarks.models.TransformerClassifier` (vocabulary, longest sequence, width,
    blocks, heads, classes), and the compute ``dtype``.
    """

    vocab: int = 8000
    seq_len: int = 128
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    num_classes: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``[B, num_classes]`` for token ids ``tokens`` of shape ``[B, T]``."""
        x = _embed(self, tokens, "tokens", "positions")[0]
        for i in range(self.layers):
            x = TransformerBlock(self.d_model, self.heads, dtype=self.dtype, name=f"block{i}")(x)
        x = jnp.mean(nn.LayerNorm(_LN_EPSILON, dtype=self.dtype, name="ln")(x), axis=1)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class GPT2LM(nn.Module):
    """GPT-2 language model: the twin of ``transformers.GPT2LMHeadModel`` (dropout 0).

    Token embedding ``wte`` plus position embedding ``wpe`` (``0..T-1``), ``layers``
    causal :class:`TransformerBlock` (``h0``, ``h1``, ...; tanh GELU), final LayerNorm
    ``ln_f``, and logits ``x @ wte^T`` (the LM head tied to the token embedding).

    Attributes:
        vocab: Vocabulary size.
        seq_len: Size of the position table (GPT-2's ``n_positions``).
        d_model: Model width.
        layers: Number of blocks.
        heads: Attention heads per block.
        dtype: Compute dtype.
    """

    vocab: int = 8000
    seq_len: int = 128
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``[B, T, vocab]`` for token ids ``tokens`` of shape ``[B, T]``."""
        x, wte = _embed(self, tokens, "wte", "wpe")
        for i in range(self.layers):
            x = TransformerBlock(self.d_model, self.heads, causal=True, approximate_gelu=True,
                                 dtype=self.dtype, name=f"h{i}")(x)
        return wte.attend(nn.LayerNorm(_LN_EPSILON, dtype=self.dtype, name="ln_f")(x))


def _embed(model: Any, tokens: jax.Array, token_name: str,
           position_name: str) -> tuple[jax.Array, nn.Embed]:
    """Token plus learned position embeddings of a transformer (inside its compact call).

    Returns:
        ``([B, T, d] embeddings, the token embedding layer)``.
    """
    table = nn.Embed(model.vocab, model.d_model, dtype=model.dtype, name=token_name)
    where = jnp.arange(tokens.shape[1])
    positions = nn.Embed(model.seq_len, model.d_model, dtype=model.dtype, name=position_name)
    return table(tokens) + positions(where)[None], table


def build_model(name: str, *, seq_len: Optional[int] = None, dtype: Any = jnp.float32
                ) -> nn.Module:
    """The flax module of benchmark model ``name``.

    Args:
        name: One of :data:`MODEL_NAMES`.
        seq_len: Size of the classifier transformers' position table (default: the
            reference 128); ignored by the other models (GPT-2's table has 128 rows).
        dtype: Compute dtype (``jnp.bfloat16`` for bf16 compute).

    Returns:
        The (unbound) linen module.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    check_name(name)
    spec = SPECS[name]
    if name == "mlp":
        return MLP(dtype)
    if name == "cnn":
        return CNN(dtype)
    if name == "lstm":
        return LSTMClassifier(dtype=dtype)
    if name == "gpt2":
        return GPT2LM(spec.vocab, spec.seq_len, spec.width, heads=spec.heads, dtype=dtype)
    return TransformerClassifier(spec.vocab, seq_len or spec.seq_len, spec.width,
                                 heads=spec.heads, dtype=dtype)


def make_batch(
    name: str, batch: int, *, seq_len: Optional[int] = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic inputs and integer labels of the right shape and dtype for model ``name``.

    Args:
        name: One of :data:`MODEL_NAMES`.
        batch: Number of examples.
        seq_len: Sequence length for token models (default: the reference length).
        seed: Seed of the numpy generator.

    Returns:
        ``(inputs, labels)`` as numpy arrays (``float32`` images or ``int32`` tokens;
        ``int32`` labels; a language model's labels are its tokens shifted left by one,
        the last wrapping around).

    Raises:
        ValueError: If ``name`` is unknown or ``batch`` / ``seq_len`` is not positive.
    """
    check_name(name)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}.")
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    if name in LANGUAGE_MODELS:
        tokens = rng.integers(0, spec.vocab, size=(batch, seq_len or spec.seq_len),
                              dtype=np.int32)
        return tokens, np.roll(tokens, -1, axis=1)
    labels = rng.integers(0, spec.num_classes, size=(batch,), dtype=np.int32)
    if name == "mlp":
        return rng.standard_normal((batch, 784), dtype=np.float32), labels
    if name == "cnn":
        return rng.standard_normal((batch, 32, 32, 3), dtype=np.float32), labels
    length = spec.seq_len if seq_len is None else seq_len
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
    assert spec.vocab is not None
    return rng.integers(0, spec.vocab, size=(batch, length), dtype=np.int32), labels


def init_params(name: str, *, seq_len: Optional[int] = None, seed: int = 0) -> Any:
    """Freshly initialised float32 parameters of model ``name``.

    Args:
        name: One of :data:`MODEL_NAMES`.
        seq_len: As in :func:`build_model` (and the dummy input's length).
        seed: Seed of the initialisation key.

    Returns:
        The ``params`` collection (a nested dict of arrays).
    """
    model = build_model(name, seq_len=seq_len)
    length = seq_len or SPECS[name].seq_len
    dummy, _ = make_batch(name, 1, seq_len=length)
    return model.init(jax.random.key(seed), jnp.asarray(dummy))["params"]


def count_parameters(params: Any) -> int:
    """Number of scalars in the parameter pytree ``params``."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
