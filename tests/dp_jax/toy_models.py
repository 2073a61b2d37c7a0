"""Toy flax models shared by the JAX tests, each with a ``dtype`` (float32 or float64).

The ``LINEN`` and ``NNX`` tables map a layer kind to a small model built around
that layer (per-example gradient tests); the ghost-clipping models exercise
the layers ghost clipping intercepts (Dense, DenseGeneral, Embed, weight sharing).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

# ------------------------------------------------------------------- one model per layer kind


class LinenDense(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(4, param_dtype=self.dtype, dtype=self.dtype)(x))
        return nn.Dense(2, param_dtype=self.dtype, dtype=self.dtype)(x)


class LinenConv(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME", param_dtype=self.dtype,
                    dtype=self.dtype)(x)
        x = jnp.tanh(x)
        x = nn.Conv(2, (2, 2), padding="VALID", param_dtype=self.dtype, dtype=self.dtype)(x)
        return jnp.mean(x, axis=(1, 2))


class LinenEmbed(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, tokens):
        e = nn.Embed(10, 4, param_dtype=self.dtype, dtype=self.dtype)(tokens)
        return nn.Dense(2, param_dtype=self.dtype, dtype=self.dtype)(jnp.mean(e, axis=1))


class LinenLayerNorm(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, param_dtype=self.dtype, dtype=self.dtype)(x)
        x = nn.LayerNorm(param_dtype=self.dtype, dtype=self.dtype)(x)
        return nn.Dense(2, param_dtype=self.dtype, dtype=self.dtype)(x)


class LinenGroupNorm(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), param_dtype=self.dtype, dtype=self.dtype)(x)
        x = nn.GroupNorm(num_groups=2, param_dtype=self.dtype, dtype=self.dtype)(x)
        return jnp.mean(x, axis=(1, 2))[:, :2]


class LinenLSTM(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, xs):  # [1, T, F]
        cell = nn.OptimizedLSTMCell(3, param_dtype=self.dtype, dtype=self.dtype)
        carry = (jnp.zeros((1, 3), self.dtype), jnp.zeros((1, 3), self.dtype))
        for t in range(xs.shape[1]):
            carry, y = cell(carry, xs[:, t])
        return nn.Dense(2, param_dtype=self.dtype, dtype=self.dtype)(y)


class LinenAttention(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):  # [1, T, D]
        y = nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=4, param_dtype=self.dtype, dtype=self.dtype
        )(x, x)
        return jnp.mean(y, axis=1)[:, :2]


LINEN = {
    "dense": LinenDense, "conv": LinenConv, "embed": LinenEmbed, "layernorm": LinenLayerNorm,
    "groupnorm": LinenGroupNorm, "lstm": LinenLSTM, "attention": LinenAttention,
}


class NnxDense(nnx.Module):
    def __init__(self, dtype, rngs):
        self.a = nnx.Linear(3, 4, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.b = nnx.Linear(4, 2, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


class NnxConv(nnx.Module):
    def __init__(self, dtype, rngs):
        self.a = nnx.Conv(2, 3, (3, 3), strides=(2, 2), padding="SAME", param_dtype=dtype,
                          dtype=dtype, rngs=rngs)
        self.b = nnx.Conv(3, 2, (2, 2), padding="VALID", param_dtype=dtype, dtype=dtype,
                          rngs=rngs)

    def __call__(self, x):
        return jnp.mean(self.b(jnp.tanh(self.a(x))), axis=(1, 2))


class NnxEmbed(nnx.Module):
    def __init__(self, dtype, rngs):
        self.e = nnx.Embed(10, 4, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.d = nnx.Linear(4, 2, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        return self.d(jnp.mean(self.e(tokens), axis=1))


class NnxLayerNorm(nnx.Module):
    def __init__(self, dtype, rngs):
        self.a = nnx.Linear(3, 4, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.n = nnx.LayerNorm(4, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.b = nnx.Linear(4, 2, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.b(self.n(self.a(x)))


class NnxGroupNorm(nnx.Module):
    def __init__(self, dtype, rngs):
        self.c = nnx.Conv(2, 4, (3, 3), param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.n = nnx.GroupNorm(4, num_groups=2, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return jnp.mean(self.n(self.c(x)), axis=(1, 2))[:, :2]


class NnxLSTM(nnx.Module):
    def __init__(self, dtype, rngs):
        self.cell = nnx.OptimizedLSTMCell(2, 3, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.d = nnx.Linear(3, 2, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, xs):
        carry = (jnp.zeros((1, 3), self.dtype), jnp.zeros((1, 3), self.dtype))
        for t in range(xs.shape[1]):
            carry, y = self.cell(carry, xs[:, t])
        return self.d(y)


class NnxAttention(nnx.Module):
    def __init__(self, dtype, rngs):
        self.att = nnx.MultiHeadAttention(
            num_heads=2, in_features=4, qkv_features=4, param_dtype=dtype, dtype=dtype,
            decode=False, keep_rngs=False, rngs=rngs,
            # dropout_rate > 0 with deterministic=True (no dropout is applied) selects flax's
            # own attention instead of jax.nn.dot_product_attention, whose softmax runs in
            # float32 even for float64 inputs (which would make a 1e-10 check meaningless).
            dropout_rate=0.1 if dtype == jnp.float64 else 0.0, deterministic=True,
        )

    def __call__(self, x):
        return jnp.mean(self.att(x, x), axis=1)[:, :2]


NNX = {
    "dense": NnxDense, "conv": NnxConv, "embed": NnxEmbed, "layernorm": NnxLayerNorm,
    "groupnorm": NnxGroupNorm, "lstm": NnxLSTM, "attention": NnxAttention,
}


# --------------------------------------------------------------------------- ghost clipping models


class LinenMLP(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(6, param_dtype=self.dtype, dtype=self.dtype)(x))
        x = jnp.tanh(nn.Dense(5, use_bias=False, param_dtype=self.dtype, dtype=self.dtype)(x))
        return nn.Dense(3, param_dtype=self.dtype, dtype=self.dtype)(x)


class LinenConvDense(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), strides=(2, 2), param_dtype=self.dtype, dtype=self.dtype)(x)
        x = jnp.reshape(jnp.tanh(x), (x.shape[0], -1))
        return nn.Dense(3, param_dtype=self.dtype, dtype=self.dtype)(x)


class LinenBlock(nn.Module):
    """Token + position embeddings, pre-LN attention (DenseGeneral) and an MLP block."""

    dtype: object

    @nn.compact
    def __call__(self, tokens):  # [1, T]
        kw = {"param_dtype": self.dtype, "dtype": self.dtype}
        x = nn.Embed(12, 6, **kw)(tokens) + nn.Embed(5, 6, **kw)(jnp.arange(tokens.shape[1]))
        x = jnp.nan_to_num(x)  # an out-of-range id gives NaN; its gradient row is dropped
        h = nn.LayerNorm(**kw)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, **kw)(h, h)
        h = nn.gelu(nn.Dense(8, **kw)(nn.LayerNorm(**kw)(x)))
        x = x + nn.Dense(6, **kw)(h)
        return nn.Dense(3, **kw)(jnp.mean(x, axis=1))


class LinenShared(nn.Module):
    """One Dense applied twice per position of a sequence (rows of both calls add up)."""

    dtype: object

    @nn.compact
    def __call__(self, x):  # [1, T, 4]
        shared = nn.Dense(4, param_dtype=self.dtype, dtype=self.dtype)
        h = jnp.tanh(shared(x))
        h = jnp.tanh(shared(h + x))
        return nn.Dense(3, param_dtype=self.dtype, dtype=self.dtype)(jnp.mean(h, axis=1))


class NnxMLP(nnx.Module):
    """LinearGeneral over two axes, a Linear called twice, LayerNorm, a bias-free Linear."""

    def __init__(self, dtype, rngs):
        kw = {"param_dtype": dtype, "dtype": dtype, "rngs": rngs}
        self.first = nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), **kw)
        self.shared = nnx.Linear(5, 5, **kw)
        self.norm = nnx.LayerNorm(5, **kw)
        self.out = nnx.Linear(5, 3, use_bias=False, **kw)

    def __call__(self, x):  # [1, 2, 3]
        h = jnp.tanh(self.first(x))
        h = jnp.tanh(self.shared(jnp.tanh(self.shared(h))))
        return self.out(self.norm(h))


class NnxTokenEmbed(nnx.Module):
    """Embed with out-of-range ids (NaN rows zeroed) and a Linear head."""

    def __init__(self, dtype, rngs):
        kw = {"param_dtype": dtype, "dtype": dtype, "rngs": rngs}
        self.embed = nnx.Embed(7, 4, **kw)
        self.out = nnx.Linear(4, 3, **kw)

    def __call__(self, tokens):  # [1, T]
        return self.out(jnp.mean(jnp.nan_to_num(self.embed(tokens)), axis=1))


def padded_nan_batch(seed: int) -> tuple[dict, tuple, tuple, jnp.ndarray]:
    """Five real examples and the same batch padded to eight with NaN rows marked bad.

    Args:
        seed: Seed of the features.

    Returns:
        ``(params, (x, bad), (x_pad, bad_pad), mask)`` for a loss over ``(x, bad)``
        examples, ``params = {"w": [1, 2, 3], "b": 0.5}`` and ``mask`` true on the real rows.
    """
    import jax

    params = {"w": jnp.arange(1.0, 4.0), "b": jnp.asarray(0.5)}
    x = jax.random.normal(jax.random.key(seed), (5, 3))
    bad = jnp.zeros(5, bool)
    x_pad = jnp.concatenate([x, jnp.full((3, 3), jnp.nan)])
    bad_pad = jnp.concatenate([bad, jnp.ones(3, bool)])
    return params, (x, bad), (x_pad, bad_pad), jnp.arange(8) < 5
