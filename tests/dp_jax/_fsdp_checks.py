"""Subprocess half of tests/dp_jax/test_sharded_params.py: sharded parameters on host devices.

Run as ``python tests/dp_jax/_fsdp_checks.py OUT.npz DEVICES SUITE`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the test sets it); ``SUITE`` is
``quick`` (the MLP, the refusals that need several devices) or ``slow`` (every model,
clipping and gradient mode, and secure mode). Each case trains with
``PrivacyEngine.make_private(mesh=..., param_sharding=...)`` on ``DEVICES`` devices and
with the same seed and key on one device (the oracle), in float64; the raw arrays go to
``OUT.npz`` under ``"<case>|<what>|<leaf path>"`` keys. The test file makes every
assertion; nothing here compares anything.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, NamedTuple, Optional

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import dp_jax  # noqa: E402
from dp_jax import distributed as dist  # noqa: E402
from tests.dp_jax import zoo_models as zoo  # noqa: E402

STEPS, Q, LR, MOMENTUM = 3, 0.3, 0.1, 0.9
SIGMA, SEED, NOISE_SEED = 1.1, 3, 7
MLP_DIM, MLP_HIDDEN, MLP_N = 16, 64, 40
TOKENS_N = 24


class Model(NamedTuple):
    """A loss, its parameters and data, and the frozen arrays it reads (or ``None``)."""

    loss_fn: Any
    params: Any
    data: Any
    frozen: Any = None
    min_size: Optional[int] = None  # None: param_sharding="fsdp"; else fsdp_specs(min_size=)


def mlp() -> Model:
    """A tanh MLP whose first kernel (16 x 64 = 1024 elements) is split by ``"fsdp"``."""
    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.asarray(rng.normal(size=(MLP_DIM, MLP_HIDDEN)) / 4),
        "b1": jnp.asarray(0.1 * rng.normal(size=MLP_HIDDEN)),
        "w2": jnp.asarray(rng.normal(size=(MLP_HIDDEN,)) / 8), "b2": jnp.asarray(0.1),
    }

    def loss(p: Any, ex: Any) -> jax.Array:
        h = jnp.tanh(ex["x"] @ p["w1"] + p["b1"])
        return (h @ p["w2"] + p["b2"] - ex["y"]) ** 2

    data = {"x": 2.0 * rng.normal(size=(MLP_N, MLP_DIM)), "y": rng.normal(size=MLP_N)}
    return Model(loss, params, data)


def _tokens() -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(2).integers(0, zoo.VOCAB, size=(TOKENS_N, zoo.SEQ + 1))
    return {"x": tokens[:, :-1].astype(np.int32), "y": tokens[:, 1:].astype(np.int32)}


def gpt() -> Model:
    """The zoo's nnx transformer, every parameter trainable, every divisible one split."""
    case = zoo.lora_gpt(jnp.float64, lora_only=False)
    return Model(case.loss_fn, case.params, _tokens(), min_size=1)


def lora() -> Model:
    """The zoo's transformer with only the LoRA leaves trainable (the base closed over)."""
    case = zoo.lora_gpt(jnp.float64, lora_only=True)
    return Model(case.loss_fn, case.params, _tokens(), min_size=1)


def lora_frozen() -> Model:
    """The LoRA transformer with its frozen base passed as ``frozen_params``."""
    model = zoo._create(zoo.LoRAGPT, jnp.float64)  # pylint: disable=protected-access
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(p: Any, ex: Any, frozen: Any) -> jax.Array:
        return zoo.token_loss(nnx.merge(graphdef, p, frozen)(ex["x"][None])[0], ex["y"])

    return Model(loss, params, _tokens(), frozen=rest, min_size=1)


MODELS = {"mlp": mlp, "gpt": gpt, "lora": lora, "lora_frozen": lora_frozen}


def _bound(model: Model, clipping: str) -> Any:
    if clipping != "per_layer":  # flat, or adaptive's initial bound
        return 0.5
    return [0.1 + 0.05 * (i % 5) for i in range(len(jax.tree_util.tree_leaves(model.params)))]


def _param_sharding(model: Model, mesh: Any) -> Any:
    if model.min_size is None:
        return "fsdp"
    return dist.fsdp_specs(model.params, mesh, min_size=model.min_size)


def _frozen_on(model: Model, mesh: Any) -> Any:
    """The frozen arrays, split beforehand on ``mesh`` (they keep that placement)."""
    if model.frozen is None or mesh is None:
        return model.frozen
    specs = dist.fsdp_specs(model.frozen, mesh, min_size=1)
    shardings = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    return dist.place(model.frozen, shardings)


def train(model: Model, mesh: Any, *, sigma: float, secure: bool = False, **kwargs: Any):
    """``STEPS`` logical steps; the params after each, the final state and epsilon."""
    engine = dp_jax.PrivacyEngine(secure_mode=secure)
    seeds = {} if secure else {"seed": SEED, "key": jax.random.key(NOISE_SEED)}
    private = engine.make_private(
        loss_fn=model.loss_fn, params=model.params, data=model.data, noise_multiplier=sigma,
        optimizer=optax.sgd(LR, momentum=MOMENTUM), sample_rate=Q, steps=STEPS, mesh=mesh,
        param_sharding=None if mesh is None else _param_sharding(model, mesh),
        frozen_params=_frozen_on(model, mesh), **seeds, **kwargs,
    )
    state, history = private.state, []
    for logical in private.batches:
        state, _ = private.train_logical_step(state, logical)
        history.append(state.params)
    return history, state, engine.get_epsilon(1e-5), private


def flat(tree: Any) -> dict[str, np.ndarray]:
    """``{keystr(path): numpy leaf}``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def shard_shapes(tree: Any) -> dict[str, np.ndarray]:
    """``{path: [global shape..., first addressable shard's shape...]}`` of every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and leaf.ndim:
            out[jax.tree_util.keystr(path)] = np.array(
                [leaf.shape, leaf.addressable_shards[0].data.shape])
    return out


def _put(out: dict, name: str, what: str, tree: Any) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            out[f"{name}|{what}|{key}"] = np.asarray(value)
    else:
        out[f"{name}|{what}|"] = np.asarray(tree)


def run_case(out: dict, devices: int, model_name: str, clipping: str, mode: str,
             **kwargs: Any) -> None:
    """Sharded and one-device runs, with noise and without; the first step gives the noise."""
    model = MODELS[model_name]()
    mesh = dist.data_mesh(jax.devices()[:devices])
    name = f"{model_name}-{clipping}-{mode}-{devices}dev"
    common = {"clipping": clipping, "grad_sample_mode": mode,
              "max_grad_norm": _bound(model, clipping), **kwargs}
    runs = {}
    for where, on in (("sharded", mesh), ("single", None)):
        for sigma in (0.0, SIGMA):
            runs[where, sigma] = train(model, on, sigma=sigma, **common)
    for where in ("sharded", "single"):
        zero, noisy = runs[where, 0.0], runs[where, SIGMA]
        _put(out, name, f"{where}_zero", flat(zero[1].params))
        _put(out, name, f"{where}_noisy", flat(noisy[1].params))
        # First step, SGD with momentum: params - lr * (sum + noise) / m, so the
        # difference of the noisy and the noise-free runs is -lr * noise / m.
        first = jax.tree_util.tree_map(lambda a, b: a - b, noisy[0][0], zero[0][0])
        _put(out, name, f"{where}_noise", flat(first))
        _put(out, name, f"{where}_eps", np.array(noisy[2]))
    state, private = runs["sharded", SIGMA][1], runs["sharded", SIGMA][3]
    _put(out, name, "param_shards", shard_shapes(state.params))
    _put(out, name, "opt_shards", shard_shapes(state.opt_state))
    _put(out, name, "m", np.array(private.expected_batch_size))
    if private.frozen_params is not None:
        _put(out, name, "frozen_shards", shard_shapes(private.frozen_params))


def run_secure(out: dict, devices: int) -> None:
    """Secure mode on the MLP: one step with host noise minus the same step without noise."""
    model = mlp()
    mesh = dist.data_mesh(jax.devices()[:devices])
    kwargs = {"clipping": "flat", "max_grad_norm": 0.5}
    zero = train(model, mesh, sigma=0.0, **kwargs)  # the noise-free reference (seeded)
    engine = dp_jax.PrivacyEngine(secure_mode=True)
    private = engine.make_private(
        loss_fn=model.loss_fn, params=model.params, data=model.data, noise_multiplier=SIGMA,
        optimizer=optax.sgd(LR, momentum=MOMENTUM), sample_rate=Q, steps=STEPS, mesh=mesh,
        param_sharding="fsdp", **kwargs,
    )
    # Replay the seeded run's first logical batch, so only the noise differs.
    first = next(iter(dist.ShardedBatches(
        dp_jax.PoissonBatches(model.data, Q, steps=STEPS, seed=SEED), mesh)))
    state, _ = private.train_logical_step(private.state, first)
    noise = jax.tree_util.tree_map(lambda a, b: a - b, state.params, zero[0][0])
    _put(out, "secure", "noise", flat(noise))
    _put(out, "secure", "m", np.array(private.expected_batch_size))
    _put(out, "secure", "param_shards", shard_shapes(state.params))
    _put(out, "secure", "opt_shards", shard_shapes(state.opt_state))
    _put(out, "secure", "steps", np.array(len(engine.accountant)))


def run_checkpoint(out: dict, devices: int) -> None:
    """save_checkpoint / load_checkpoint of a split state: the same values, split again."""
    import io  # pylint: disable=import-outside-toplevel

    model = mlp()
    mesh = dist.data_mesh(jax.devices()[:devices])
    engine = dp_jax.PrivacyEngine()
    private = engine.make_private(
        loss_fn=model.loss_fn, params=model.params, optimizer=optax.adam(LR), data=model.data,
        noise_multiplier=SIGMA, max_grad_norm=1.0, sample_rate=Q, seed=SEED, mesh=mesh,
        param_sharding="fsdp",
    )
    buffer = io.BytesIO()
    engine.save_checkpoint(buffer, private.state)
    buffer.seek(0)
    loaded, _ = engine.load_checkpoint(buffer, private.state)
    _put(out, "checkpoint", "saved", flat(private.state.params))
    _put(out, "checkpoint", "loaded", flat(loaded.params))
    _put(out, "checkpoint", "param_shards", shard_shapes(loaded.params))
    _put(out, "checkpoint", "opt_shards", shard_shapes(loaded.opt_state))


def _message(fn: Any) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def run_errors(out: dict, devices: int) -> None:
    """A spec that does not divide its dimension (needs > 1 device); the engine stays unused."""
    model = mlp()
    mesh = dist.data_mesh(jax.devices()[:devices])
    engine = dp_jax.PrivacyEngine()
    params = dict(model.params, b1=jnp.zeros(MLP_HIDDEN + 1))  # 65 entries: no even split
    specs = dict(dist.fsdp_specs(params, mesh), b1=jax.sharding.PartitionSpec("data"))
    out["errors|uneven|"] = np.array(_message(lambda: engine.make_private(
        loss_fn=model.loss_fn, params=params, optimizer=optax.sgd(LR), data=model.data,
        noise_multiplier=SIGMA, max_grad_norm=1.0, sample_rate=Q, mesh=mesh,
        param_sharding=specs)))
    out["errors|steps_after|"] = np.array(len(engine.accountant))
    out["errors|data_after|"] = np.array(engine.data is None)


#: (model, clipping, grad_sample_mode, extra make_private arguments) per suite and device count.
SUITES = {
    ("quick", 2): [("mlp", "flat", "vmap", {})],
    ("slow", 2): [("gpt", "flat", "vmap", {"max_physical_batch_size": 8}),
                  ("lora", "per_layer", "ghost", {}), ("lora_frozen", "flat", "vmap", {})],
    ("slow", 4): [("mlp", "per_layer", "ghost", {}), ("mlp", "adaptive", "vmap", {}),
                  ("gpt", "flat", "vmap", {"max_physical_batch_size": 8}),
                  ("gpt", "per_layer", "ghost", {}), ("lora", "flat", "ghost", {}),
                  ("lora", "per_layer", "vmap", {}), ("lora_frozen", "flat", "vmap", {})],
}


def main(path: str, devices: int, suite: str) -> None:
    """Run the suite's cases and write the arrays to ``path``."""
    out: dict[str, np.ndarray] = {"devices||": np.asarray(jax.device_count()),
                                  "mesh_devices||": np.asarray(devices)}
    for model_name, clipping, mode, kwargs in SUITES[suite, devices]:
        run_case(out, devices, model_name, clipping, mode, **kwargs)
    if suite == "quick":
        run_errors(out, devices)
        run_checkpoint(out, devices)
    else:
        run_secure(out, devices)
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
