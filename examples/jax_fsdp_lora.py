"""DP LoRA fine-tuning of a small Llama-like language model, its weights split over 4 devices.

The model is written in flax nnx: token embedding, ``--layers`` decoder blocks
(RMSNorm, causal multi-head attention with rotary position embeddings, RMSNorm, a
SwiGLU MLP), a final RMSNorm and an output projection; every attention and MLP
projection is an ``nnx.LoRALinear``. The base weights are randomly initialised and
frozen; only the LoRA adapters (``nnx.LoRAParam``) are trained, with DP-SGD.

The private data are token sequences from a fixed random Markov chain over the
vocabulary (each row of the transition matrix a sparse Dirichlet draw), so the
held-out next-token perplexity can fall from that of the random model towards the
chain's own perplexity ``exp(entropy rate)``, printed as the floor.

How the model is split:

* ``mesh = dp_jax.data_mesh()``: one mesh axis, ``"data"``, over the devices; run as a
  script on a CPU, the script asks XLA for 4 host devices
  (``--xla_force_host_platform_device_count=4``) unless ``XLA_FLAGS`` already sets a count;
* ``make_private_with_epsilon(..., mesh=mesh, param_sharding="fsdp",
  frozen_params=base)``: the LoRA adapters, the optimizer state (the clipped-sum
  accumulator, Adam's moments) and the frozen base are split along ``"data"`` (each
  array of at least 1024 elements on its largest dimension divisible by the device
  count; the adapters' smaller arrays stay replicated); the batch is split along
  ``"data"`` too. Each step is one XLA program:
  the devices gather the weights they need, clip every sequence's gradient by its
  norm over all adapters, and the Gaussian noise is drawn once for the whole
  adapters and split like them. The accountant steps once per logical batch.

Run ``python examples/jax_fsdp_lora.py`` (``--smoke``: a short run, for the tests;
see ``--help``). Each epoch prints the held-out perplexity and the epsilon spent; with
the defaults (6 epochs, epsilon 8) the last line reads
``dp_jax FSDP LoRA (4 devices): perplexity 109.2 -> 24.1 (chain 10.5) at epsilon 8.00 (delta 1e-05)``
(about a minute on two CPU cores).
"""

from __future__ import annotations

import os
import sys

#: Host (CPU) devices the script asks XLA for when XLA_FLAGS does not say.
HOST_DEVICES = 4
_COUNT_FLAG = "--xla_force_host_platform_device_count"

if __name__ == "__main__" and _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX starts: the number of CPU devices is fixed when its backend starts.
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), f"{_COUNT_FLAG}={HOST_DEVICES}"])
    )

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import dp_jax  # noqa: E402

__all__ = ["Config", "LlamaLM", "main", "markov_tokens", "parse_args"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The model's shape."""

    vocab: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 4
    hidden: int = 128
    rank: int = 8


# --------------------------------------------------------------------------- data


def markov_chain(vocab: int, seed: int) -> np.ndarray:
    """A random ``[vocab, vocab]`` transition matrix, each row a sparse Dirichlet draw."""
    return np.random.default_rng(seed).dirichlet(np.full(vocab, 0.1), size=vocab)


def markov_tokens(chain: np.ndarray, count: int, length: int, seed: int) -> np.ndarray:
    """``[count, length]`` int32 sequences of the chain from uniform start tokens."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(chain, axis=1)
    tokens = np.empty((count, length), np.int32)
    tokens[:, 0] = rng.integers(0, chain.shape[0], size=count)
    for t in range(1, length):
        draws = rng.random(count)[:, None]
        rows = cumulative[tokens[:, t - 1]]
        tokens[:, t] = np.minimum((draws > rows).sum(axis=1), chain.shape[0] - 1)
    return tokens


def chain_perplexity(chain: np.ndarray) -> float:
    """``exp`` of the chain's entropy rate under its stationary distribution: the floor."""
    values, vectors = np.linalg.eig(chain.T)
    stationary = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    stationary = stationary / stationary.sum()
    entropy = -np.sum(chain * np.log(np.where(chain > 0, chain, 1.0)), axis=1)
    return float(np.exp(stationary @ entropy))


# --------------------------------------------------------------------------- model


def rotary(x: jax.Array) -> jax.Array:
    """Rotary position embedding of ``[B, T, H, Dh]`` queries or keys (halves rotated)."""
    t, half = x.shape[1], x.shape[-1] // 2
    freqs = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]  # [T, half]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def _lora(d_in: int, d_out: int, cfg: Config, rngs: nnx.Rngs) -> nnx.LoRALinear:
    return nnx.LoRALinear(d_in, d_out, lora_rank=cfg.rank, use_bias=False, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm decoder block: RMSNorm, causal attention with RoPE, RMSNorm, SwiGLU MLP."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs) -> None:
        self.heads = cfg.heads
        self.attn_norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.q, self.k, self.v, self.o = (_lora(cfg.dim, cfg.dim, cfg, rngs) for _ in range(4))
        self.mlp_norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.gate = _lora(cfg.dim, cfg.hidden, cfg, rngs)
        self.up = _lora(cfg.dim, cfg.hidden, cfg, rngs)
        self.down = _lora(cfg.hidden, cfg.dim, cfg, rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: jnp.reshape(y, (b, t, self.heads, d // self.heads))  # noqa: E731
        q, k, v = rotary(split(self.q(x))), rotary(split(self.k(x))), split(self.v(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        return self.o(jnp.reshape(jnp.einsum("bhqk,bkhd->bqhd", weights, v), (b, t, d)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attn_norm(x))
        h = self.mlp_norm(x)
        return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


class LlamaLM(nnx.Module):
    """Embedding, decoder blocks, final RMSNorm, output projection: ``[B, T] -> [B, T, V]``."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(cfg.vocab, cfg.dim, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.head = nnx.Linear(cfg.dim, cfg.vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def split_model(cfg: Config, seed: int) -> tuple[Any, Any, Any]:
    """``(graphdef, adapters, base)``: the LoRA parameters apart from everything else."""
    model = LlamaLM(cfg, nnx.Rngs(seed))
    return nnx.split(model, nnx.LoRAParam, ...)


def sequence_loss(graphdef: Any) -> Any:
    """``loss(adapters, example, base)``: mean next-token cross-entropy of one sequence."""

    def loss(adapters: Any, example: Any, base: Any) -> jax.Array:
        logits = nnx.merge(graphdef, adapters, base)(example["x"][None])[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, example["y"]))

    return loss


def perplexity(graphdef: Any, adapters: Any, base: Any, tokens: np.ndarray) -> float:
    """``exp`` of the mean next-token cross-entropy over ``tokens`` (one batch)."""
    loss = sequence_loss(graphdef)
    batch = {"x": jnp.asarray(tokens[:, :-1]), "y": jnp.asarray(tokens[:, 1:])}
    mean = jax.jit(lambda a, b, d: jnp.mean(jax.vmap(loss, (None, 0, None))(a, d, b)))
    return float(np.exp(float(mean(adapters, base, batch))))


# --------------------------------------------------------------------------- run


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``argv=None`` reads ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="passes over the data")
    parser.add_argument("--epsilon", type=float, default=8.0, help="budget for the whole run")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta")
    parser.add_argument("--sequences", type=int, default=4096, help="private training sequences")
    parser.add_argument("--length", type=int, default=17, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=256, help="expected logical batch")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound")
    parser.add_argument("--seed", type=int, default=0, help="data, model and sampling seed")
    parser.add_argument("--smoke", action="store_true",
                        help="2 epochs on 1024 sequences, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.sequences = 2, 1024
    checks = [("--epochs", args.epochs, args.epochs >= 1),
              ("--epsilon", args.epsilon, args.epsilon > 0),
              ("--delta", args.delta, 0 < args.delta < 1),
              ("--length", args.length, args.length >= 2),
              ("--batch-size", args.batch_size, 1 <= args.batch_size <= args.sequences),
              ("--lr", args.lr, args.lr > 0),
              ("--max-grad-norm", args.max_grad_norm, args.max_grad_norm > 0),
              ("--seed", args.seed, args.seed >= 0)]
    for flag, value, ok in checks:
        if not ok:
            parser.error(f"{flag} {value} is out of range; see --help.")
    return args


def _shard_count(tree: Any) -> tuple[int, int]:
    """``(split leaves, all leaves)`` of a pytree of global arrays."""
    leaves = jax.tree_util.tree_leaves(tree)
    split = sum(1 for x in leaves if x.addressable_shards[0].data.shape != x.shape)
    return split, len(leaves)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train the adapters privately on the mesh; print each epoch and the result line.

    Args:
        argv: Command-line arguments (see :func:`parse_args`); ``None`` reads ``sys.argv``.

    Returns:
        ``perplexity_start``, ``perplexity`` (held out, after training),
        ``chain_perplexity``, ``epsilon``, ``delta``, ``noise_multiplier``, ``epochs``,
        ``devices``, ``steps``, ``split_adapters``/``split_base`` (split leaves) and
        ``seconds``.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    cfg = Config()
    chain = markov_chain(cfg.vocab, args.seed)
    tokens = markov_tokens(chain, args.sequences, args.length, args.seed + 1)
    held_out = markov_tokens(chain, 512, args.length, args.seed + 2)
    graphdef, adapters, base = split_model(cfg, args.seed)
    mesh = dp_jax.data_mesh()
    engine = dp_jax.PrivacyEngine()
    private = engine.make_private_with_epsilon(
        loss_fn=sequence_loss(graphdef), params=adapters, frozen_params=base,
        optimizer=optax.adam(args.lr), data={"x": tokens[:, :-1], "y": tokens[:, 1:]},
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        batch_size=args.batch_size, max_grad_norm=args.max_grad_norm, seed=args.seed,
        mesh=mesh, param_sharding="fsdp",
    )
    state, base = private.state, private.frozen_params
    first = perplexity(graphdef, state.params, base, held_out)
    floor = chain_perplexity(chain)
    (split_adapters, num_adapters), (split_base, num_base) = map(_shard_count, (state.params, base))
    print(f"{mesh.devices.size} devices; {split_adapters}/{num_adapters} adapter and "
          f"{split_base}/{num_base} base arrays split; "
          f"noise multiplier {private.noise_multiplier:.3f}; perplexity {first:.1f} "
          f"(chain {floor:.1f})", flush=True)
    ppl = first
    for epoch in range(1, args.epochs + 1):
        for logical_batch in private.batches:
            state, _ = private.train_logical_step(state, logical_batch)
        ppl = perplexity(graphdef, state.params, base, held_out)
        print(f"epoch {epoch:2d}  perplexity {ppl:6.2f}  epsilon "
              f"{engine.get_epsilon(args.delta):.2f}", flush=True)
    result = {
        "perplexity_start": first, "perplexity": ppl, "chain_perplexity": floor,
        "epsilon": engine.get_epsilon(args.delta), "delta": args.delta,
        "noise_multiplier": private.noise_multiplier, "epochs": args.epochs,
        "devices": int(mesh.devices.size), "steps": len(engine.accountant),
        "split_adapters": split_adapters, "split_base": split_base,
        "seconds": time.perf_counter() - start,
    }
    print(f"dp_jax FSDP LoRA ({result['devices']} devices): perplexity {first:.1f} -> {ppl:.1f} "
          f"(chain {floor:.1f}) at epsilon {result['epsilon']:.2f} (delta {args.delta:g})",
          flush=True)
    return result


if __name__ == "__main__":
    main()
