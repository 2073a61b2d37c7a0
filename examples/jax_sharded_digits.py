"""Data-parallel DP-SGD on scikit-learn's 8x8 digits over 4 host devices with dp_jax.

The sharded twin of ``examples/jax_digits.py``: the same data split, flax MLP
(64 -> 128 tanh -> 10), Poisson sampling with an expected batch of 256 (sample rate
1/6), flat clipping at 1.0, SGD with learning rate 0.5, and a noise multiplier
calibrated by :meth:`dp_jax.PrivacyEngine.make_private_with_epsilon` (RDP) so that the whole
run spends at most ``--epsilon`` at ``--delta``. What changes is where the work runs:

* ``make_private_with_epsilon(..., mesh=dp_jax.data_mesh())``: the devices form a
  one-axis mesh; run as a
  script on a CPU, the script asks XLA for 4 host devices
  (``--xla_force_host_platform_device_count=4``) unless ``XLA_FLAGS`` already sets a
  count;
* every Poisson batch is padded to a bucket whose size is a multiple of the device
  count and split row-wise over the devices (``dp_jax.ShardedBatches``; padded rows masked);
* each device clips the gradients of its own rows, the clipped sums are added with
  ``psum``, and the Gaussian noise is added once to the global sum from one
  replicated state, so the parameters stay identical on every
  device and the privacy accounting is that of one device: one ``dpcore`` accountant
  step per logical batch with the global sample rate.

With the defaults (epsilon 3, delta 1e-5, 30 epochs) it reaches about 94 % test
accuracy, as ``jax_digits.py`` does.

Several processes (hosts) run the same script, each with its own process id; every
process feeds the rows of the batch that land on its devices::

    python examples/jax_sharded_digits.py --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 0 &
    python examples/jax_sharded_digits.py --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 1

(with 4 host devices each: a mesh of 8). Only process 0 prints.

Run ``python examples/jax_sharded_digits.py`` (``--smoke``: two epochs, for the tests;
see ``--help``). It ends with a line such as
``dp_jax sharded digits (4 devices): test accuracy 0.944 at epsilon 2.99 (delta 1e-05)``.
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
import pathlib  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, Optional  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import dp_jax  # noqa: E402
from examples import jax_digits  # noqa: E402
from examples._cli import Check, digits_parser, parse_checked  # noqa: E402
from examples._common import NUM_IMAGES, TEST_SIZE, result_line, run_timed  # noqa: E402

__all__ = ["main", "parse_args"]

#: Epochs used by ``--smoke``.
SMOKE_EPOCHS = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``argv=None`` reads ``sys.argv``)."""
    parser = digits_parser(__doc__.split("\n\n")[0], hidden=False)
    parser.add_argument("--devices", type=int, default=None,
                        help="use the first K devices (default: all of them)")
    parser.add_argument("--coordinator", default=None,
                        help="host:port of process 0, for a multi-process run "
                             "(goes with --num-processes > 1)")
    parser.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    parser.add_argument("--process-id", type=int, default=0, help="this process, 0-based")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_EPOCHS} epochs only")
    return parse_checked(parser, argv, train_size=NUM_IMAGES - TEST_SIZE,
                         smoke_epochs=SMOKE_EPOCHS, extra_checks=_own_checks)


def _own_checks(args: argparse.Namespace) -> list[Check]:
    return [
        ("--devices", args.devices, args.devices is None or args.devices >= 1),
        ("--num-processes", args.num_processes, args.num_processes >= 1),
        ("--process-id", args.process_id, 0 <= args.process_id < args.num_processes),
        ("--coordinator", args.coordinator,
         (args.coordinator is None) == (args.num_processes == 1)),
    ]


def _mesh(args: argparse.Namespace) -> jax.sharding.Mesh:
    devices = jax.devices()
    if args.devices is not None:
        if args.devices > len(devices):
            raise ValueError(f"--devices {args.devices} but only {len(devices)} are visible; set "
                             f"XLA_FLAGS={_COUNT_FLAG}=K for K host devices.")
        devices = devices[: args.devices]
    return dp_jax.data_mesh(devices)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated global array's value, read from this process's first copy."""
    return np.asarray(x.addressable_data(0))


def _run(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    mesh = _mesh(args)
    train, test = jax_digits.load_data()
    model = jax_digits.MLP()
    engine = dp_jax.PrivacyEngine(accountant="rdp")
    # The same call as jax_digits.py plus mesh=: the engine shards every Poisson batch
    # over the mesh, clips on each device, psums the clipped sums and adds the noise
    # once from the replicated state; the accountant steps once per logical batch.
    private = engine.make_private_with_epsilon(
        loss_fn=dp_jax.linen_loss(model, "cross_entropy"),
        params=jax_digits.init_params(model, args.seed),
        mesh=mesh,
        **jax_digits.private_options(args, train),
    )
    say(f"{mesh.devices.size} devices in {jax.process_count()} process(es); noise multiplier "
        f"{private.noise_multiplier:.3f}, sample rate {private.sample_rate:.4f}")
    state, loss = private.state, float("nan")
    for epoch in range(1, args.epochs + 1):
        losses = []
        for logical_batch in private.batches:
            state, metrics = private.train_logical_step(state, logical_batch)
            losses.append(float(_host(metrics["loss"])))
        loss = float(np.mean(losses))
        say(f"epoch {epoch:3d}  loss {loss:.3f}  epsilon {engine.get_epsilon(args.delta):.2f}")
    host_params = jax.tree_util.tree_map(_host, state.params)
    return {
        "accuracy": jax_digits.accuracy(model, host_params, test),
        "epsilon": engine.get_epsilon(args.delta),
        "delta": args.delta,
        "noise_multiplier": private.noise_multiplier,
        "train_loss": loss,
        "epochs": args.epochs,
        "devices": int(mesh.devices.size),
        "steps": len(engine.accountant),
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train on the mesh, evaluate, print the result line (process 0) and return the figures.

    Args:
        argv: Command-line arguments (see :func:`parse_args`); ``None`` reads ``sys.argv``.

    Returns:
        ``accuracy``, ``epsilon`` (RDP upper bound), ``delta``, ``noise_multiplier``,
        ``train_loss`` (last epoch's mean), ``epochs``, ``devices``, ``steps`` and
        ``seconds`` (wall time, compilation included).
    """
    args = parse_args(argv)
    if args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    lead = jax.process_index() == 0

    def say(text: str) -> None:
        if lead:
            print(text, flush=True)

    result = run_timed(lambda parsed: _run(parsed, say), args)
    say(result_line(f"dp_jax sharded digits ({result['devices']} devices)", result, args.delta))
    return result


if __name__ == "__main__":
    main()
