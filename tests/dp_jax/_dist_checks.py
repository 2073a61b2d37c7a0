"""Subprocess half of tests/dp_jax/test_distributed.py: the sharded step on host devices.

Run as ``python tests/dp_jax/_dist_checks.py OUT.npz`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the test sets it). Each case
runs on a 4- or 2-device mesh and on one device (the reference), in float64, and the
raw arrays go to ``OUT.npz`` under ``"<case>|<what>|<leaf path>"`` keys. The test file
makes every assertion; nothing here compares anything.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import dp_jax  # noqa: E402
from dp_jax import _distributed as dist  # noqa: E402
from tests.dp_jax import _dist_common as common  # noqa: E402

#: (clipping, sigma, devices, read the bound from the optimizer state with bound_of?)
CASES = [("flat", 0.0, 4, False), ("flat", common.SIGMA, 4, False),
         ("per_layer", common.SIGMA, 4, False), ("flat", common.SIGMA, 2, True),
         ("per_layer", 0.0, 2, False)]
NOISE_DIM = 1500
NOISE_KEYS = 4
NOISE_SIGMA = 1.3


def case_name(clipping: str, sigma: float, devices: int, use_bound_of: bool) -> str:
    """The key prefix of one case, e.g. ``"flat-sigma1.1-4dev"``."""
    return f"{clipping}-sigma{sigma}-{devices}dev" + ("-bound_of" if use_bound_of else "")


def _put(out: dict, name: str, what: str, tree: Any) -> None:
    """Store a ``{leaf path: array}`` dict (or one array) under ``name|what|...`` keys."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            out[f"{name}|{what}|{key}"] = value
    else:
        out[f"{name}|{what}|"] = np.asarray(tree)


def run_case(out: dict, clipping: str, sigma: float, devices: int, use_bound_of: bool) -> None:
    """STEPS Poisson steps sharded over ``devices`` devices, and on one device."""
    name = case_name(clipping, sigma, devices, use_bound_of)
    bound: Any = common.C_FLAT if clipping == "flat" else common.C_LAYERS
    # With bound_of the grad_fn's own bound (99) must be overridden by the state's.
    grad_fn = dp_jax.clipped_grad(common.loss_fn, 99.0 if use_bound_of else bound,
                                  clipping=clipping)
    tx = common.make_tx(sigma, bound)
    mesh = dist.data_mesh(jax.devices()[:devices])
    bound_of = (lambda opt_state: jnp.asarray(bound)) if use_bound_of else None
    step = dist.make_sharded_step(grad_fn, tx, mesh, bound_of=bound_of)
    state = dist.replicate(common.initial_state(tx), mesh)
    losses, counts, rows = [], [], []
    for logical in dist.ShardedBatches(common.poisson_batches(), mesh):
        assert len(logical) == 1
        batch, mask = logical[0]
        state, metrics = step(state, batch, mask, True)
        losses.append(float(metrics["loss"]))
        counts.append(int(np.sum(np.asarray(mask))))
        rows.append([s.data.shape[0] for s in batch["x"].addressable_shards])
    ref_params, ref_losses, ref_counts = common.reference_run(
        grad_fn, tx, bound if use_bound_of else None)
    _put(out, name, "sharded", common.flat(state.params))
    _put(out, name, "single", common.flat(ref_params))
    _put(out, name, "shards", common.shards(state))
    _put(out, name, "sharded_loss", np.array(losses))
    _put(out, name, "single_loss", np.array(ref_losses))
    _put(out, name, "sharded_counts", np.array(counts))
    _put(out, name, "single_counts", np.array(ref_counts))
    _put(out, name, "rows_per_device", np.array(rows))
    _put(out, name, "step", state.step)
    _put(out, name, "param_specs", np.array([str(x.sharding.spec)
                                             for x in jax.tree_util.tree_leaves(state.params)]))


def _aux_vector(aux: dp_jax.ClipAux) -> np.ndarray:
    return np.array([aux.loss, aux.num_examples, aux.num_unclipped, aux.num_nonfinite],
                    dtype=np.float64)


def run_masked_batch(out: dict, devices: int) -> None:
    """shard_batch on 13 rows (padded to the device count), two rows masked and NaN."""
    data = common.make_data()
    batch = {"x": data["x"][:13].copy(), "y": data["y"][:13].copy()}
    mask = np.ones(13, bool)
    mask[[2, 9]] = False
    batch["x"][[2, 9]] = np.nan  # a masked row must contribute exactly zero, even NaN
    grad_fn = dp_jax.clipped_grad(common.loss_fn, common.C_FLAT)
    mesh = dist.data_mesh(jax.devices()[:devices])
    sharded_batch, sharded_mask = dist.shard_batch(batch, mask, mesh)
    clip = jax.jit(dist.sharded_clipped_grad(grad_fn, mesh))
    total, aux = clip(dist.replicate(common.init_params(), mesh), sharded_batch, sharded_mask)
    ref_total, ref_aux = jax.jit(grad_fn)(common.init_params(), batch, mask)
    name = f"masked-{devices}dev"
    _put(out, name, "sharded", common.flat(total))
    _put(out, name, "single", common.flat(ref_total))
    _put(out, name, "padded_rows", sharded_batch["x"].shape[0])
    _put(out, name, "sharded_aux", _aux_vector(aux))
    _put(out, name, "single_aux", _aux_vector(ref_aux))
    _put(out, name, "sharded_norms", np.asarray(aux.norms)[:13][mask])
    _put(out, name, "single_norms", np.asarray(ref_aux.norms)[mask])


def run_linear(out: dict) -> None:
    """Linear least squares on 4 devices (closed-form per-example gradients in the test)."""
    rng = np.random.default_rng(4)
    x, y, w = rng.normal(size=(22, 6)), rng.normal(size=22), rng.normal(size=6)
    mask = rng.random(22) < 0.8
    loss = lambda p, ex: 0.5 * (ex["x"] @ p - ex["y"]) ** 2
    mesh = dist.data_mesh()
    sharded_batch, sharded_mask = dist.shard_batch({"x": x, "y": y}, mask, mesh)
    fn = jax.jit(dist.sharded_clipped_grad(dp_jax.clipped_grad(loss, 0.7), mesh))
    total, aux = fn(dist.replicate(jnp.asarray(w), mesh), sharded_batch, sharded_mask)
    for what, value in {"sharded": total, "x": x, "y": y, "w": w, "mask": mask,
                        "num_examples": aux.num_examples}.items():
        _put(out, "linear", what, value)


def run_noise(out: dict) -> None:
    """The noise of the sharded update alone: (noisy step) - (noise-free step), 4 keys."""
    rng = np.random.default_rng(5)
    data = {"x": rng.normal(size=(26, NOISE_DIM)), "y": rng.normal(size=26)}
    loss = lambda p, ex: 0.5 * (ex["x"] @ p - ex["y"]) ** 2
    grad_fn = dp_jax.clipped_grad(loss, 1.0)
    mesh = dist.data_mesh()
    batch, mask = dist.shard_batch(data, rng.random(26) < 0.5, mesh)
    params = jnp.zeros(NOISE_DIM)
    steps = []
    for sigma in (NOISE_SIGMA, 0.0):
        tx = optax.chain(
            optax.scale(1.0 / common.EXPECTED),
            dp_jax.add_gaussian_noise(sigma, 1.0, common.EXPECTED, jax.random.key(0)),
            optax.sgd(1.0),
        )
        steps.append((tx, dist.make_sharded_step(grad_fn, tx, mesh)))
    draws = []
    for seed in range(NOISE_KEYS):  # a fresh key per draw; the compiled steps are reused
        results = []
        for tx, step in steps:
            opt_state = tuple(
                dp_jax.NoiseState(jax.random.key(seed)) if isinstance(s, dp_jax.NoiseState) else s
                for s in tx.init(params)
            )
            state = dist.replicate(
                dp_jax.TrainState(params, opt_state, jnp.zeros((), jnp.int32)), mesh)
            results.append(np.asarray(step(state, batch, mask, True)[0].params))
        draws.append(results[0] - results[1])
    _put(out, "noise", "draws", np.concatenate(draws))
    _put(out, "noise", "std", NOISE_SIGMA * 1.0 / common.EXPECTED)


def run_chunks(out: dict) -> None:
    """ShardedBatches with small buckets on 4 devices: split batches, rounded chunk sizes."""
    data = {"i": np.arange(common.N)}
    batches = dp_jax.PoissonBatches(data, common.Q, steps=common.STEPS, seed=common.SEED,
                                    buckets=(5, 7))
    sizes, rows = [], []
    for logical in dist.ShardedBatches(batches, dist.data_mesh()):
        sizes.append([int(chunk.mask.shape[0]) for chunk in logical])
        rows.append(np.concatenate([np.asarray(chunk.batch["i"])[np.asarray(chunk.mask)]
                                    for chunk in logical]))
    _put(out, "chunks", "sizes", np.array([s for step in sizes for s in step]))
    _put(out, "chunks", "per_step", np.array([len(step) for step in sizes]))
    _put(out, "chunks", "rows", np.concatenate(rows))
    _put(out, "chunks", "rows_per_step", np.array([r.size for r in rows]))


def run_errors(out: dict) -> None:
    """The message of the refusal that needs more than one device."""
    mesh = dist.data_mesh()
    tx = common.make_tx(0.0, 1.0)
    step = dist.make_sharded_step(dp_jax.clipped_grad(common.loss_fn, 1.0), tx, mesh)
    data = common.make_data()
    try:
        step(dist.replicate(common.initial_state(tx), mesh),
             {"x": data["x"][:13], "y": data["y"][:13]}, np.ones(13, bool), True)
        message = "no error"
    except ValueError as err:
        message = str(err)
    _put(out, "errors", "uneven", np.array(message))


#: (name, make_private keyword arguments) of the engine runs on a mesh and on one device.
ENGINE_CASES = [
    ("engine-flat-virtual", {"clipping": "flat", "max_physical_batch_size": 5}),
    ("engine-adaptive-virtual", {"clipping": "adaptive", "max_physical_batch_size": 5}),
    ("engine-per_layer", {"clipping": "per_layer"}),
]


def _engine_run(mesh: Any, kwargs: dict, secure: bool = False) -> tuple[Any, float, list]:
    """Three logical steps of PrivacyEngine.make_private(mesh=mesh) -> (params, eps, chunks)."""
    engine = dp_jax.PrivacyEngine(secure_mode=secure)
    bound = common.C_LAYERS if kwargs.get("clipping") == "per_layer" else common.C_FLAT
    seeds = {} if secure else {"seed": common.SEED, "key": jax.random.key(common.NOISE_SEED)}
    private = engine.make_private(
        loss_fn=common.loss_fn, params=common.init_params(), optimizer=optax.adam(common.LR),
        data=common.make_data(), noise_multiplier=common.SIGMA, max_grad_norm=bound,
        sample_rate=common.Q, steps=common.STEPS, mesh=mesh, **seeds, **kwargs,
    )
    state, chunks = private.state, []
    for logical in private.batches:
        chunks.append(len(logical))
        state, _ = private.train_logical_step(state, logical)
    return state, engine.get_epsilon(1e-5), chunks


def run_engine(out: dict) -> None:
    """The engine with ``mesh=`` against the engine on one device (same seed and key)."""
    mesh = dist.data_mesh()
    for name, kwargs in ENGINE_CASES:
        sharded, eps_sharded, chunks = _engine_run(mesh, kwargs)
        single, eps_single, _ = _engine_run(None, kwargs)
        _put(out, name, "sharded", common.flat(sharded.params))
        _put(out, name, "single", common.flat(single.params))
        _put(out, name, "eps", np.array([eps_sharded, eps_single]))
        _put(out, name, "chunks", np.array(chunks))
        _put(out, name, "device_copies", _device_copies(sharded.params))
    secure, _, _ = _engine_run(mesh, {"clipping": "flat"}, secure=True)
    _put(out, "engine-secure", "params", common.flat(secure.params))
    _put(out, "engine-secure", "device_copies", _device_copies(secure.params))


def run_ghost_engine(out: dict) -> None:
    """A flax MLP: ghost clipping on the mesh against vmap clipping on one device."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = {"param_dtype": jnp.float64, "dtype": jnp.float64}
            return nn.Dense(1, **dense)(jnp.tanh(nn.Dense(common.HIDDEN, **dense)(x)))[..., 0]

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((common.DIM,)))["params"]

    def loss(p, example):
        return (model.apply({"params": p}, example["x"]) - example["y"]) ** 2

    plan = dp_jax.ghost_plan(loss, params, common.make_data())
    out["ghost-engine|ghost_leaves|"] = np.asarray(len(plan.ghost))
    results = {}
    for mesh, mode in ((dist.data_mesh(), "ghost"), (None, "vmap")):
        engine = dp_jax.PrivacyEngine()
        private = engine.make_private(
            loss_fn=loss, params=params, optimizer=optax.sgd(common.LR), data=common.make_data(),
            noise_multiplier=common.SIGMA, max_grad_norm=common.C_FLAT, sample_rate=common.Q,
            steps=common.STEPS, seed=common.SEED, key=jax.random.key(common.NOISE_SEED),
            max_physical_batch_size=5, mesh=mesh, grad_sample_mode=mode,
        )
        state = private.state
        for logical in private.batches:
            state, _ = private.train_logical_step(state, logical)
        results[mode] = state.params
    _put(out, "ghost-engine", "sharded", common.flat(results["ghost"]))
    _put(out, "ghost-engine", "single", common.flat(results["vmap"]))
    _put(out, "ghost-engine", "start", common.flat(params))


def _device_copies(params: Any) -> np.ndarray:
    """How many distinct values the devices hold for each leaf (1 = identical everywhere)."""
    counts = []
    for leaf in jax.tree_util.tree_leaves(params):
        copies = {np.asarray(s.data).tobytes() for s in leaf.addressable_shards}
        counts.append(len(copies))
    return np.array(counts)


def main(path: str) -> None:
    """Run every check and write the arrays to ``path``."""
    out: dict[str, np.ndarray] = {"devices||": np.asarray(jax.device_count())}
    for case in CASES:
        run_case(out, *case)
    for devices in (4, 2):
        run_masked_batch(out, devices)
    run_linear(out)
    run_noise(out)
    run_chunks(out)
    run_errors(out)
    run_engine(out)
    run_ghost_engine(out)
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
