"""Small real-model shapes for the dp_jax zoo (:mod:`tests.dp_jax.test_zoo`).

Each builder returns a :class:`ZooCase`: a per-example loss of the kind users write
(:func:`dp_jax.nnx_loss` / :func:`dp_jax.linen_loss`), the trainable parameters, a batch
and an independent oracle loss (the model called directly on one example, no dp_jax
helper in between). The models are tiny, have no dropout (rate 0, train mode) and use
one dtype for parameters and computation.

* :func:`lora_gpt`: a GPT-2-like nnx transformer. Token embedding plus position
  embeddings looked up from a ``[1, T]`` position-id array that broadcasts against the
  batch, pre-LayerNorm causal self-attention and an MLP whose projections are
  ``nnx.LoRALinear``, a final LayerNorm and a linear head. ``lora_only=True`` trains
  only the ``nnx.LoRAParam`` leaves (as PEFT does); ``False`` trains everything.
* :func:`linen_cnn`: a linen CNN with GroupNorm (two convolutions, a dense head).
* :func:`tied_nnx`: an nnx language model whose ``nnx.Embed`` table is used for the
  input lookup and, through ``Embed.attend``, for the output logits.
* :func:`linen_lstm`: a linen sequence classifier: token embedding, ``nn.RNN`` over an
  ``nn.LSTMCell``, LayerNorm on the last hidden state, a dense head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dp_jax

__all__ = ["BATCH", "BUILDERS", "ZooCase", "linen_cnn", "linen_lstm", "lora_gpt", "tied_nnx",
           "token_loss"]

BATCH = 8
VOCAB = 11
MAX_LEN = 8
SEQ = 6
DIM = 8
HEADS = 2
RANK = 2


class ZooCase(NamedTuple):
    """One model, ready for a DP step.

    Attributes:
        loss_fn: ``loss_fn(params, example) -> scalar`` built with dp_jax's flax helpers.
        params: The trainable parameters (the pytree that is clipped).
        batch: ``{"x": ..., "y": ...}`` with leading axis :data:`BATCH`.
        oracle_loss: The same per-example loss written without dp_jax.
    """

    loss_fn: Callable[[Any, Any], jax.Array]
    params: Any
    batch: dict[str, np.ndarray]
    oracle_loss: Callable[[Any, Any], jax.Array]


def token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of one sequence (``[T, V]`` logits, ``[T]`` ids)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def _token_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ + 1)).astype(np.int32)
    tokens[:, 2] = tokens[:, 1]  # a repeated id in every sequence
    return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


# --------------------------------------------------------------------------- transformer


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head causal attention on ``[B, T, H, Dh]`` projections."""
    t, head_dim = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(q.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class LoRABlock(nnx.Module):
    """Pre-LayerNorm transformer block with ``nnx.LoRALinear`` projections."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs) -> None:
        def lora(d_in: int, d_out: int) -> nnx.LoRALinear:
            return nnx.LoRALinear(
                d_in, d_out, lora_rank=RANK, dtype=dtype, param_dtype=dtype,
                lora_dtype=dtype, lora_param_dtype=dtype, rngs=rngs)

        self.ln_attn = nnx.LayerNorm(DIM, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.query, self.key, self.value = lora(DIM, DIM), lora(DIM, DIM), lora(DIM, DIM)
        self.proj = lora(DIM, DIM)
        self.ln_mlp = nnx.LayerNorm(DIM, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.up, self.down = lora(DIM, 2 * DIM), lora(2 * DIM, DIM)
        self.dropout = nnx.Dropout(0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h = self.ln_attn(x)
        q, k, v = (jnp.reshape(f(h), (b, t, HEADS, DIM // HEADS))
                   for f in (self.query, self.key, self.value))
        x = x + self.dropout(self.proj(jnp.reshape(_causal_attention(q, k, v), (b, t, DIM))))
        return x + self.dropout(self.down(nnx.gelu(self.up(self.ln_mlp(x)))))


class LoRAGPT(nnx.Module):
    """GPT-2-shaped language model: wte + wpe, one LoRA block, final LayerNorm, head."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs) -> None:
        self.wte = nnx.Embed(VOCAB, DIM, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wpe = nnx.Embed(MAX_LEN, DIM, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.block = LoRABlock(dtype, rngs)
        self.ln_f = nnx.LayerNorm(DIM, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, V]
        positions = jnp.arange(tokens.shape[1])[None, :]  # [1, T], as GPT-2 builds it
        x = self.wte(tokens) + self.wpe(positions)  # [B, T, D] + [1, T, D]
        return self.head(self.ln_f(self.block(x)))


def _random_values(shapes: Any, seed: int) -> Any:
    """Arrays of ``N(0, 0.5^2)`` values in the shapes and dtypes of ``shapes``.

    Filled by numpy instead of flax's initialisers (which compile one XLA program per
    operation on CPU); every parameter, LoRA's ``B`` included (zero at initialisation,
    non-zero once trained), gets a non-zero gradient.
    """
    rng = np.random.default_rng(seed)

    def fill(x: Any) -> jax.Array:
        return jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map(fill, shapes)


def _create(cls: type[nnx.Module], dtype: Any) -> nnx.Module:
    """``cls(dtype, rngs)`` in train mode with random values (the same for every dtype)."""
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: cls(dtype, nnx.Rngs(0))))
    model = nnx.merge(graphdef, _random_values(shapes, seed=0))
    model.train()
    return model


def _nnx_oracle(graphdef: Any, rest: Any) -> Callable[[Any, Any], jax.Array]:
    def oracle(params: Any, example: Any) -> jax.Array:
        model = nnx.merge(graphdef, params, rest)
        return token_loss(model(example["x"][None])[0], example["y"])

    return oracle


def lora_gpt(dtype: Any, *, lora_only: bool) -> ZooCase:
    """The LoRA transformer; only the LoRA leaves are trainable when ``lora_only``."""
    model = _create(LoRAGPT, dtype)
    trainable = nnx.LoRAParam if lora_only else nnx.Param
    graphdef, params, rest = nnx.split(model, trainable, ...)
    loss_fn = dp_jax.nnx_loss(graphdef, rest, token_loss)
    return ZooCase(loss_fn, params, _token_batch(1), _nnx_oracle(graphdef, rest))


# --------------------------------------------------------------------------- tied embedding


class TiedLM(nnx.Module):
    """One table for the input lookup and (``Embed.attend``) the output logits."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs) -> None:
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.embed = nnx.Embed(VOCAB, DIM, **kw)
        self.wpe = nnx.Embed(MAX_LEN, DIM, **kw)
        self.mix = nnx.Linear(DIM, DIM, **kw)
        self.norm = nnx.LayerNorm(DIM, **kw)
        self.dropout = nnx.Dropout(0.0)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = self.embed(tokens) + self.wpe(positions)
        x = x + self.dropout(jnp.tanh(self.mix(jnp.cumsum(x, axis=1))))
        return self.embed.attend(self.norm(x))


def tied_nnx(dtype: Any) -> ZooCase:
    """The tied-embedding language model, every parameter trainable."""
    model = _create(TiedLM, dtype)
    graphdef, params, rest = dp_jax.nnx_split_params(model)
    loss_fn = dp_jax.nnx_loss(graphdef, rest, token_loss)
    return ZooCase(loss_fn, params, _token_batch(2), _nnx_oracle(graphdef, rest))


# --------------------------------------------------------------------------- CNN


class GroupNormCNN(nn.Module):
    """Two convolutions with GroupNorm, global average pooling and a dense head."""

    dtype: Any
    classes: int = 5
    param_dtype: Any = None  # None: ``dtype``

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 8, 8, 3]
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype or self.dtype}
        x = nn.relu(nn.GroupNorm(num_groups=2, **kw)(nn.Conv(4, (3, 3), **kw)(x)))
        x = nn.Conv(8, (3, 3), strides=(2, 2), **kw)(x)
        x = nn.relu(nn.GroupNorm(num_groups=4, **kw)(x))
        x = nn.Dropout(0.0, deterministic=False)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.classes, **kw)(nn.relu(nn.Dense(16, **kw)(x)))


def linen_cnn(dtype: Any, param_dtype: Any = None) -> ZooCase:
    """The GroupNorm CNN on random images, cross-entropy on 5 classes.

    ``param_dtype`` (default ``dtype``) stores the parameters in another dtype than the
    computation's, e.g. float32 parameters for a bfloat16 model.
    """
    model = GroupNormCNN(dtype, param_dtype=param_dtype)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((BATCH, 8, 8, 3)).astype(np.dtype(dtype))
    labels = rng.integers(0, model.classes, size=BATCH).astype(np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(images[:1]))
    params = _random_values(shapes["params"], seed=0)

    def oracle(p: Any, example: Any) -> jax.Array:
        logits = model.apply({"params": p}, example["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

    loss_fn = dp_jax.linen_loss(model, "cross_entropy")
    return ZooCase(loss_fn, params, {"x": images, "y": labels}, oracle)


# --------------------------------------------------------------------------- LSTM


class LSTMClassifier(nn.Module):
    """Embedding, an LSTM over the tokens, LayerNorm of the last hidden state, dense head."""

    dtype: Any
    classes: int = 3

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, classes]
        kw = {"dtype": self.dtype, "param_dtype": self.dtype}
        x = nn.Embed(VOCAB, DIM, name="embed", **kw)(tokens)
        h = nn.RNN(nn.LSTMCell(DIM, **kw), name="rnn")(x)[:, -1]
        return nn.Dense(self.classes, name="head", **kw)(nn.LayerNorm(name="norm", **kw)(h))


def linen_lstm(dtype: Any) -> ZooCase:
    """The LSTM classifier on random token sequences, cross-entropy on 3 classes."""
    model = LSTMClassifier(dtype)
    tokens = _token_batch(4)["x"]
    labels = np.random.default_rng(4).integers(0, model.classes, size=BATCH).astype(np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(tokens[:1]))
    params = _random_values(shapes["params"], seed=1)

    def oracle(p: Any, example: Any) -> jax.Array:
        logits = model.apply({"params": p}, example["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

    loss_fn = dp_jax.linen_loss(model, "cross_entropy")
    return ZooCase(loss_fn, params, {"x": tokens, "y": labels}, oracle)


BUILDERS: dict[str, Callable[[Any], ZooCase]] = {
    "gpt_lora": lambda dtype: lora_gpt(dtype, lora_only=True),
    "gpt_full": lambda dtype: lora_gpt(dtype, lora_only=False),
    "cnn": linen_cnn,
    "tied": tied_nnx,
    "lstm": linen_lstm,
}
"""Builders by name: ``BUILDERS[name](dtype) -> ZooCase``."""
