"""One process of the multi-process test of tests/dp_jax/test_distributed.py.

``python tests/dp_jax/_dist_worker.py --process-id I --num-processes P --port PORT
--out DIR [--local-devices 2] [--die-at K] [--heartbeat S]``

Each process joins ``jax.distributed.initialize`` on 127.0.0.1, exposes
``--local-devices`` CPU devices, builds the global 1-D mesh, and runs the DP steps of
``_dist_common`` on :class:`dp_jax._distributed.ShardedBatches`. Process 0 samples with
the shared seed; the others sample in secure mode (their draws must be ignored: the
indices come from process 0). The data set records which examples this process
reads. After each step the process writes ``DIR/p{I}-step{K}.npz`` (its shards of the
parameters, the loss and the examples it read); ``--die-at K`` makes process ``--die-process``
(default 1) exit abruptly before step ``K`` (the others must then fail, not hang).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

import numpy as np


class RecordingDataset:
    """An indexable data set that remembers which examples were read."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.data = data
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.data["y"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        self.read.append(int(index))
        return {"x": self.data["x"][index], "y": self.data["y"][index]}


def parse_args() -> argparse.Namespace:
    """The worker's command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--die-process", type=int, default=1)
    parser.add_argument("--heartbeat", type=int, default=30)
    return parser.parse_args()


def main() -> None:
    """Join the process group, run the steps, save each step's result."""
    args = parse_args()
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"),
        f"--xla_force_host_platform_device_count={args.local_devices}",
    ]))
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=args.heartbeat,
        shutdown_timeout_seconds=30,
    )
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    import dp_jax
    from dp_jax import _distributed as dist
    from tests.dp_jax import _dist_common as common

    mesh = dist.data_mesh()
    tx = common.make_tx(common.SIGMA, common.C_FLAT)
    step = dist.make_sharded_step(dp_jax.clipped_grad(common.loss_fn, common.C_FLAT), tx, mesh)
    state = dist.replicate(common.initial_state(tx), mesh)
    dataset = RecordingDataset(common.make_data())
    own = dict(seed=common.SEED) if args.process_id == 0 else dict(seed=None, secure_mode=True)
    batches = dp_jax.PoissonBatches(dataset, common.Q, steps=common.STEPS,
                                    buckets=common.BUCKETS, **own)
    for k, logical in enumerate(dist.ShardedBatches(batches, mesh)):
        if args.die_at == k and args.process_id == args.die_process:
            os._exit(17)  # no cleanup, no goodbye to the coordinator: a crash
        batch, mask = logical[0]
        state, metrics = step(state, batch, mask, True)
        _save(args, k, common.shards(state), float(metrics["loss"].addressable_data(0)),
              dataset.read, [d.id for d in jax.local_devices()], jax.device_count())
        dataset.read = []
    if args.die_at is None:
        _engine_runs(args)


def _engine_runs(args: argparse.Namespace) -> None:
    """PrivacyEngine(mesh=...) across the processes: a seeded virtual-step run with a
    checkpoint round trip, and a secure run; ``p{I}-engine.npz`` holds the results."""
    import optax
    from jax.experimental import multihost_utils

    import dp_jax
    from dp_jax import _distributed as dist
    from tests.dp_jax import _dist_checks as checks
    from tests.dp_jax import _dist_common as common

    mesh = dist.data_mesh()
    _, kwargs = checks.ENGINE_CASES[0]
    state, eps, _ = checks._engine_run(mesh, kwargs)
    out = {f"seeded|{k}": v for k, v in common.shards(state.params).items()}
    out["eps"] = np.asarray(eps)
    engine = dp_jax.PrivacyEngine()
    private = engine.make_private(
        loss_fn=common.loss_fn, params=common.init_params(), optimizer=optax.adam(0.1),
        data=common.make_data(), noise_multiplier=common.SIGMA, max_grad_norm=common.C_FLAT,
        sample_rate=common.Q, steps=common.STEPS, seed=common.SEED, mesh=mesh,
    )
    first = next(iter(private.batches))
    stepped, metrics = private.train_logical_step(private.state, first)
    out["loss"] = np.asarray(float(metrics["loss"].addressable_data(0)))
    path = args.out / "engine-ckpt.npz"
    engine.save_checkpoint(path, stepped)  # only process 0 writes
    multihost_utils.sync_global_devices("checkpoint written")
    restored, _ = engine.load_checkpoint(path, private.state)
    out.update({f"restored|{k}": v for k, v in common.shards(restored.params).items()})
    out.update({f"stepped|{k}": v for k, v in common.shards(stepped.params).items()})
    out["ckpt_steps"] = np.asarray(len(engine.accountant))
    secure, _, _ = checks._engine_run(mesh, {"clipping": "flat"}, secure=True)
    out.update({f"secure|{k}": v for k, v in common.shards(secure.params).items()})
    np.savez(args.out / f"p{args.process_id}-engine.npz", **out)


def _save(args: argparse.Namespace, k: int, shards: dict[str, Any], loss: float,
          read: list[int], local_ids: list[int], global_devices: int) -> None:
    """Write ``p{I}-step{K}.npz``: this process's shards, the loss, the rows it read."""
    out = {f"shards|{key}": value for key, value in shards.items()}
    out.update({"loss": np.asarray(loss), "read": np.asarray(read, dtype=np.int64),
                "local_ids": np.asarray(local_ids), "global_devices": np.asarray(global_devices)})
    np.savez(args.out / f"p{args.process_id}-step{k}.npz", **out)


if __name__ == "__main__":
    main()
