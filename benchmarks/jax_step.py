"""DP-SGD step time in JAX: non-private, dp_jax and optax's contrib DP-SGD, side by side.

For each flax model of :mod:`benchmarks.models_flax` (MLP, CNN, LSTM, transformer d 256 and
d 768, GPT-2; the reference table's shapes, twins of :mod:`benchmarks.models`) this script times,
in one run, one jitted training step (plain SGD everywhere, learning rate 1e-3) of:

* ``nonprivate``: ``jax.grad`` of the batch-mean cross-entropy of the batched model (no
  vmap) and ``optax.sgd``;
* ``dp_jax``: the step of ``dp_jax.PrivacyEngine().make_private(...)`` (what a user runs):
  per-example gradients by ``vmap(grad)``, flat clipping at 1, the clipped sum
  accumulated, Gaussian noise (multiplier 1) added once, division by the expected batch
  size, ``optax.sgd``; called with ``apply_update=True`` and an all-``True`` mask;
* ``dp_jax-ghost``: the same engine step with ``grad_sample_mode="ghost"``: the clipped
  sum by ghost clipping (``dp_jax.ghost_clipped_grad``: per-example norms of the
  dense and embedding layers from their inputs and output gradients, no per-example
  weight gradients; the other layers by ``vmap(grad)``), then the same noise, division
  and ``optax.sgd``;
* ``dp_jax-sgd``: the optax-style path, ``dp_jax.per_example_grads`` then
  ``dp_jax.dp_sgd`` (clip + noise + sgd in one transformation), ``mask`` all ``True``;
* ``optax-contrib``: ``vmap(grad)`` then ``optax.contrib.differentially_private_aggregate``
  chained with ``optax.sgd`` (optax 0.2.8's own DP-SGD; ``optax.contrib.dpsgd`` is the
  same chain but takes only a deprecated integer seed).

The DP modes differentiate the same per-example loss (``dp_jax.linen_loss``: the model on
one example with a batch axis of one) and use the same clipping bound and noise
multiplier. Each step is compiled ahead of time (``jax.jit(...).lower(...).compile()``,
the compile time is reported) and then called on one fixed batch of exactly the stated
size that lives on the device, its new state fed back into the next call; batch sampling
is not timed.

Time: the modes of one model are stepped in interleaved rounds (one step of each per
round, the order rotating) so that load from other processes affects them alike; the
figure is the median over ``--steps`` rounds after ``--warmup`` rounds, each step timed
with ``time.perf_counter`` around the call and ``jax.block_until_ready`` on its outputs.
A mode so slow that its rounds would exceed ``--mode-budget`` seconds (default 30) skips
the warm-up rounds (its first, checked call after compiling already ran it once) and is
timed over ``floor(budget / first step)`` rounds, at least 3. A mode whose first step
took less than ``--block-ms`` (default 20 ms) runs a block of ``1 + ceil(block / first
step)`` consecutive steps (at most 25) in each round and only the block's first step is
not timed, so that a step of a few milliseconds is timed with warm caches, back to back
with itself as in a training loop, rather than right after another mode's step.
``step_ms`` in the JSON lists every timed step, ``repeats`` the block length.
Memory (beside the time in every cell): with ``--memory plan`` (default) XLA's footprint of
one call of the compiled step (``compiled.memory_analysis()``: arguments + outputs +
temporaries - outputs aliased to arguments), where the backend reports it; with ``--memory
process`` each mode runs again alone in a fresh subprocess and the figure is the resident-set
growth during its steps on the CPU, the device's ``peak_bytes_in_use`` on a GPU. On a GPU
the JSON's environment also keeps the process's device peak (``device_peak_mib``).

Precision: ``--bf16`` (or ``--precision fp32,bf16``) measures every model twice, the second
time with the models' compute ``dtype=jnp.bfloat16`` (parameters, gradients, noise and the
optimizer stay float32; the loss is taken in float32). Each precision is a table line of
its own; its ratios are to the non-private step of the same precision. GPT-2's loss of an
example is the mean cross-entropy over its positions.

``--profile`` adds component timings per model (same rounds), to see where a DP step's
time goes: ``forward`` (batched forward + loss), ``grad`` (the non-private gradient
without the optimizer), ``pe-grad-sum`` (per-example gradients by ``vmap(grad)``, summed
unclipped), ``pe-norms`` (per-example gradients and their L2 norms only),
``clipped-sum`` (``dp_jax.clipped_grad``: per-example gradients, clip and sum; no noise,
no optimizer), ``ghost-clipped-sum`` (the same by ghost clipping), ``noise`` (drawing and
adding the Gaussian noise alone) and, with
``--microbatch K``, ``dp_jax-mb`` (the engine step with ``microbatch_size=K``).

Sizes (batch = reference batch x ``--batch-scale``, at least 2; sequence lengths x
``--seq-scale``), the same as ``benchmarks/torch_step.py``'s so the two can be compared:

=============  ====  ===  ====  ===========  ===============================================
setting        mlp   cnn  lstm  transformer  notes
=============  ====  ===  ====  ===========  ===============================================
gpu default    1024  512  256   64           reference sizes; 20 steps, 3 warm-up rounds
cpu default    256   128  64    16           ``--batch-scale 0.25``; 10 steps, 3 warm-up
``--quick``    128   64   32    8            ``--batch-scale 0.125``; 7 steps, 2 warm-up
``--smoke``    2     2    2     2            seq lstm 4, transformers 8; 1 step, no warm-up
=============  ====  ===  ====  ===========  ===============================================

``transformer-768`` and ``gpt2`` (reference batch 32) scale the same way (32, 8, 4, 2).
Sequence lengths are the reference ones (LSTM 64, transformers 128) except with
``--smoke``. The device is whatever JAX picks (``jax.devices()[0]``: a GPU when JAX sees
one, else the CPU).

Should XLA's GPU autotuner fail with ``CUDA_ERROR_MISALIGNED_ADDRESS`` (which also
poisons the process for the later modes), ``XLA_FLAGS=--xla_gpu_autotune_level=0`` turns
the autotuner off.

Examples::

    python benchmarks/jax_step.py --quick --json jax_step.json        # CPU sizes
    python benchmarks/jax_step.py --quick --profile --models mlp,transformer
    python benchmarks/jax_step.py --json jax_step_gpu.json             # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optax.contrib  # noqa: E402

import dp_jax  # noqa: E402
from benchmarks import _memory, _timing  # noqa: E402
from benchmarks._timing import repeats_for, rounds_for  # noqa: E402
from benchmarks.models_flax import (  # noqa: E402
    MODEL_NAMES,
    SPECS,
    build_model,
    count_parameters,
    init_params,
    make_batch,
)

__all__ = [
    "COMPONENTS",
    "MODES",
    "Config",
    "Runner",
    "build_runner",
    "main",
    "markdown_table",
    "repeats_for",
    "rounds_for",
    "time_interleaved",
]

MODES: tuple[str, ...] = ("nonprivate", "dp_jax", "dp_jax-ghost", "dp_jax-sgd", "optax-contrib")
COMPONENTS: tuple[str, ...] = (
    "forward", "grad", "pe-grad-sum", "pe-norms", "clipped-sum", "ghost-clipped-sum", "noise",
    "dp_jax-mb",
)
_LR = 1e-3
_NOISE = 1.0
_CLIP = 1.0
_SEED = 0


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        model: A name from :data:`benchmarks.models_flax.MODEL_NAMES`.
        mode: One of :data:`MODES` or :data:`COMPONENTS`.
        batch: Fixed batch size of the timed steps.
        seq_len: Sequence length for token models, else ``None``.
        microbatch: ``microbatch_size`` of the ``dp_jax-mb`` component, else ``None``.
        precision: ``"fp32"``, or ``"bf16"``: the model computes in ``jnp.bfloat16``
            (parameters, gradients, noise and optimizer stay float32; the loss is taken
            in float32).
    """

    model: str
    mode: str
    batch: int
    seq_len: Optional[int]
    microbatch: Optional[int] = None
    precision: str = "fp32"


class Runner:
    """A compiled step and its carried state: call it to run (and wait for) one step.

    Attributes:
        compiled: The ahead-of-time compiled function ``f(carry, *args)``.
        carry: The first argument; replaced by the step's new state when ``threaded``.
        args: The other (fixed) arguments, already on the device.
        threaded: Whether ``f`` returns ``(new_carry, extra)`` to feed back.
        compile_s: Seconds spent lowering and compiling.
        temp_mib: XLA's temporary-buffer estimate in MiB, or ``None``.
        plan_mib: XLA's whole footprint of one call in MiB (arguments + outputs +
            temporaries - outputs aliased to arguments), or ``None``.
    """

    def __init__(self, fn: Callable[..., Any], carry: Any, args: tuple[Any, ...], *,
                 threaded: bool) -> None:
        """Compile ``fn`` for ``(carry, *args)``.

        Args:
            fn: A jittable function, or an already ``jax.jit``-wrapped one.
            carry: First argument (the training state, or the parameters).
            args: Remaining arguments.
            threaded: ``fn`` returns ``(new_carry, extra)`` and the carry is fed back.
        """
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        start = time.perf_counter()
        self.compiled = jitted.lower(carry, *args).compile()
        self.compile_s = time.perf_counter() - start
        self.carry = carry
        self.args = args
        self.threaded = threaded
        self.temp_mib, self.plan_mib = _planned_mib(self.compiled)

    def __call__(self) -> None:
        """Run one step and block until its outputs are ready."""
        out = self.compiled(self.carry, *self.args)
        jax.block_until_ready(out)
        if self.threaded:
            self.carry = out[0]


def _planned_mib(compiled: Any) -> tuple[Optional[float], Optional[float]]:
    """XLA's temporary buffers and whole footprint of one call, in MiB (``None``: unknown)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None, None
    sizes = [getattr(analysis, f"{part}_size_in_bytes", None)
             for part in ("temp", "argument", "output", "alias")]
    if sizes[0] is None:
        return None, None
    plan = None if None in sizes else sizes[0] + sizes[1] + sizes[2] - sizes[3]
    return sizes[0] / 2**20, None if plan is None else plan / 2**20


# ---------------------------------------------------------------------- the steps


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy in float32: over the batch, over an example's positions
    (language model), or both."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.mean(losses)


def _example_loss(module: Any) -> Callable[[Any, Any], jax.Array]:
    """The per-example loss the DP modes differentiate."""
    return dp_jax.linen_loss(module, _cross_entropy)


def _batched_loss(module: Any) -> Callable[[Any, Any, Any], jax.Array]:
    def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return _cross_entropy(module.apply({"params": params}, x), y)

    return loss


def _nonprivate(module: Any, params: Any, x: Any, y: Any) -> Runner:
    loss = _batched_loss(module)
    tx = optax.sgd(_LR)

    def step(state, x, y):
        params, opt_state = state
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    return Runner(step, (params, tx.init(params)), (x, y), threaded=True)


def _dp_engine(module: Any, params: Any, x: Any, y: Any, microbatch: Optional[int],
               grad_sample_mode: str = "vmap") -> Runner:
    engine = dp_jax.PrivacyEngine(accountant="rdp")
    extra = {} if grad_sample_mode == "vmap" else {"grad_sample_mode": grad_sample_mode}
    private = engine.make_private(
        loss_fn=_example_loss(module), params=params, optimizer=optax.sgd(_LR),
        data={"x": np.asarray(x), "y": np.asarray(y)}, sample_rate=1.0,
        noise_multiplier=_NOISE, max_grad_norm=_CLIP, seed=_SEED, microbatch_size=microbatch,
        **extra,
    )
    mask = jnp.ones((x.shape[0],), bool)
    apply = jnp.asarray(True)
    return Runner(private.step, private.state, ({"x": x, "y": y}, mask, apply), threaded=True)


def _dp_transform(module: Any, params: Any, x: Any, y: Any) -> Runner:
    loss_fn = _example_loss(module)
    tx = dp_jax.dp_sgd(_LR, _NOISE, _CLIP, int(x.shape[0]), jax.random.key(_SEED))

    def step(state, batch, mask):
        params, opt_state = state
        grads = dp_jax.per_example_grads(loss_fn, params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, mask=mask)
        return (optax.apply_updates(params, updates), opt_state), None

    mask = jnp.ones((x.shape[0],), bool)
    return Runner(step, (params, tx.init(params)), ({"x": x, "y": y}, mask), threaded=True)


def _optax_contrib(module: Any, params: Any, x: Any, y: Any) -> Runner:
    loss_fn = _example_loss(module)
    tx = optax.chain(
        optax.contrib.differentially_private_aggregate(_CLIP, _NOISE, key=jax.random.key(_SEED)),
        optax.sgd(_LR),
    )

    def step(state, batch):
        params, opt_state = state
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    return Runner(step, (params, tx.init(params)), ({"x": x, "y": y},), threaded=True)


def _component(name: str, module: Any, params: Any, x: Any, y: Any) -> Runner:
    """A non-threaded function of ``(params, *args)`` that isolates one part of a DP step."""
    loss = _batched_loss(module)
    loss_fn = _example_loss(module)
    batch = {"x": x, "y": y}
    vgrad = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
    if name == "forward":
        return Runner(loss, params, (x, y), threaded=False)
    if name == "grad":
        return Runner(jax.grad(loss), params, (x, y), threaded=False)
    if name == "pe-grad-sum":
        def pe_sum(params, batch):
            return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), vgrad(params, batch))

        return Runner(pe_sum, params, (batch,), threaded=False)
    if name == "pe-norms":
        def pe_norms(params, batch):
            leaves = jax.tree_util.tree_leaves(vgrad(params, batch))
            return jnp.sqrt(sum(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1)
                                for g in leaves))

        return Runner(pe_norms, params, (batch,), threaded=False)
    if name == "clipped-sum":
        grad_fn = dp_jax.clipped_grad(loss_fn, _CLIP)
        return Runner(lambda p, b: grad_fn(p, b)[0], params, (batch,), threaded=False)
    if name == "ghost-clipped-sum":
        ghost_fn = dp_jax.ghost_clipped_grad(loss_fn, _CLIP)
        return Runner(lambda p, b: ghost_fn(p, b)[0], params, (batch,), threaded=False)
    if name == "noise":
        def noised(params, key):
            leaves, treedef = jax.tree_util.tree_flatten(params)
            keys = jax.random.split(key, len(leaves))
            out = [p + _NOISE * _CLIP * jax.random.normal(k, p.shape, p.dtype)
                   for p, k in zip(leaves, keys)]
            return jax.tree_util.tree_unflatten(treedef, out)

        return Runner(noised, params, (jax.random.key(_SEED),), threaded=False)
    raise ValueError(f"component must be one of {list(COMPONENTS)}, got {name!r}.")


def build_runner(config: Config) -> Runner:
    """Build and compile the step of ``config`` on JAX's default device.

    Weights and the batch are seeded identically for every mode.

    Args:
        config: The configuration.

    Returns:
        The compiled :class:`Runner`.

    Raises:
        ValueError: If ``config.mode`` is unknown, or ``dp_jax-mb`` has no microbatch.
    """
    if config.mode not in MODES + COMPONENTS:
        raise ValueError(f"mode must be one of {list(MODES + COMPONENTS)}, got {config.mode!r}.")
    if config.mode == "dp_jax-mb" and config.microbatch is None:
        raise ValueError("mode 'dp_jax-mb' needs Config.microbatch; pass --microbatch K.")
    dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32
    module = build_model(config.model, seq_len=config.seq_len, dtype=dtype)
    params = jax.device_put(init_params(config.model, seq_len=config.seq_len, seed=_SEED))
    inputs, labels = make_batch(config.model, config.batch, seq_len=config.seq_len, seed=_SEED)
    x, y = jax.device_put(inputs), jax.device_put(labels)
    if config.mode == "nonprivate":
        return _nonprivate(module, params, x, y)
    if config.mode == "dp_jax":
        return _dp_engine(module, params, x, y, None)
    if config.mode == "dp_jax-mb":
        return _dp_engine(module, params, x, y, config.microbatch)
    if config.mode == "dp_jax-ghost":
        return _dp_engine(module, params, x, y, None, grad_sample_mode="ghost")
    if config.mode == "dp_jax-sgd":
        return _dp_transform(module, params, x, y)
    if config.mode == "optax-contrib":
        return _optax_contrib(module, params, x, y)
    return _component(config.mode, module, params, x, y)


def time_interleaved(
    runners: dict[str, Runner], *, steps: int, warmup: int,
    rounds: Optional[dict[str, tuple[int, int]]] = None,
    repeats: Optional[dict[str, int]] = None,
) -> dict[str, list[float]]:
    """Each compiled configuration's step times (s) from rotating rounds.

    The loop is :func:`benchmarks._timing.time_interleaved`: ``rounds`` (from
    :func:`rounds_for`) gives a mode its own ``(warmup, steps)``, ``repeats`` (from
    :func:`repeats_for`) its block of consecutive steps per round, the first untimed.

    Args:
        runners: Compiled configurations by mode.
        steps: Timed rounds.
        warmup: Untimed rounds first.
        rounds: Optional per-mode round counts.
        repeats: Optional per-mode block lengths.

    Returns:
        The measured durations of each mode, in seconds.
    """
    return _timing.time_interleaved(dict(runners), steps=steps, warmup=warmup, rounds=rounds,
                                    repeats=repeats)


# ---------------------------------------------------------------------- driver


def _on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def _plan(args: argparse.Namespace) -> _timing.Plan:
    # With --smoke the check call after compiling is the only warm-up.
    default_run = not (args.smoke or args.quick)
    return _timing.make_plan(args, full_size=default_run and _on_accelerator(), smoke_warmup=0)


def _sizes(model: str, plan: _timing.Plan) -> tuple[int, Optional[int]]:
    return _timing.sizes(SPECS[model], plan)


def _bench_model(model: str, precision: str, modes: Sequence[str], plan: _timing.Plan,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    batch, seq = _sizes(model, plan)
    num_params = count_parameters(jax.eval_shape(lambda: init_params(model, seq_len=seq)))
    configs = {mode: Config(model, mode, batch, seq,
                            args.microbatch if mode == "dp_jax-mb" else None, precision)
               for mode in modes}
    rows = {mode: {**dataclasses.asdict(c), "title": SPECS[model].title}
            for mode, c in configs.items()}
    runners: dict[str, Runner] = {}
    rounds: dict[str, tuple[int, int]] = {}
    repeats: dict[str, int] = {}
    block_s = 0.0 if args.smoke else args.block_ms / 1e3
    for mode, config in configs.items():
        built = _timing.guarded(lambda c=config: _build_checked(c), rows[mode], width=14,
                                verbose=args.verbose)
        if built is None:
            continue
        runners[mode], first_s = built
        rounds[mode] = rounds_for(first_s, steps=plan.steps, warmup=plan.warmup,
                                  budget_s=args.mode_budget)
        repeats[mode] = repeats_for(first_s, block_s=block_s)
        rows[mode].update(_runner_facts(runners[mode], first_s, repeats[mode], args.memory))
        if mode in MODES:
            rows[mode]["params"] = num_params
    times = time_interleaved(runners, steps=plan.steps, warmup=plan.warmup, rounds=rounds,
                             repeats=repeats)
    del runners
    _timing.record_times(rows, times)
    for mode, config in configs.items():
        if "median_ms" in rows[mode] and args.memory == "process":
            rows[mode].update(measure_memory(config, warmup=plan.warmup))
        _timing.log(_row_log(rows[mode]))
    _timing.add_ratios(rows, _optax_twin, "vs_optax_contrib")
    return [rows[mode] for mode in modes]


def _build_checked(config: Config) -> tuple[Runner, float]:
    """Compile ``config`` and time its first call (so that it fails here, not in a round)."""
    runner = build_runner(config)
    return runner, _timing.timed(runner)


def _runner_facts(runner: Runner, first_s: float, repeats: int, memory: str) -> dict[str, Any]:
    """The row fields of a compiled mode: first call, compile time, XLA's memory plan."""
    facts = {"first_ms": 1e3 * first_s, "compile_s": runner.compile_s, "repeats": repeats,
             "temp_mib": runner.temp_mib, "plan_mib": runner.plan_mib}
    if memory == "plan" and runner.plan_mib is not None:
        facts.update(peak_mib=runner.plan_mib, memory_kind="xla-plan")
    return facts


def _row_log(row: dict[str, Any]) -> str:
    where = f"  {row['model']:15s} {row['precision']} {row['mode']:14s}"
    if "median_ms" not in row:
        return f"{where} failed"
    memory = (f"{row['peak_mib']:.0f} MiB ({row['memory_kind']})" if "peak_mib" in row
              else row.get("memory_error", "-"))
    return f"{where} {row['median_ms']:9.2f} ms  compile {row['compile_s']:5.1f} s  {memory}"


# ---------------------------------------------------------------------- memory (subprocess)


def _device_peak_mib() -> Optional[float]:
    """The default device's peak allocation so far in MiB (``None``: no memory stats)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _memory_worker(config: Config, warmup: int) -> dict[str, Any]:
    """Compile and run ``config`` alone (warm-up + 2 steps); its peak memory in MiB.

    On an accelerator the figure is the device's ``peak_bytes_in_use`` (absolute:
    parameters, optimizer state and batch included); on the CPU the resident-set growth
    during the steps (:func:`benchmarks._memory.rss_growth`).
    """
    runner = build_runner(config)

    def steps() -> None:
        for _ in range(warmup + 2):
            runner()

    if not _on_accelerator():
        return _memory.rss_growth(steps)
    steps()
    return {"peak_mib": _device_peak_mib(), "memory_kind": "device-peak"}


def measure_memory(config: Config, *, warmup: int, timeout: float = 600.0) -> dict[str, Any]:
    """Peak memory of ``config`` measured in a fresh Python process.

    Args:
        config: The configuration.
        warmup: Untimed steps before the two measured ones.
        timeout: Seconds before the subprocess is abandoned.

    Returns:
        ``{"peak_mib": float, "memory_kind": str}``, or ``{"memory_error": str}``.
    """
    job = {"config": dataclasses.asdict(config), "warmup": warmup}
    return _memory.run_worker(__file__, job, timeout=timeout)


def _optax_twin(mode: str) -> Optional[str]:
    return "optax-contrib" if mode.startswith("dp_jax") else None


def markdown_table(results: list[dict[str, Any]], modes: Sequence[str]) -> str:
    """The step-time table in markdown: median ms, ratio to non-private, memory, dp_jax/optax.

    Args:
        results: Rows as produced by this script (one per model, precision and mode).
        modes: Column order (modes and components).

    Returns:
        One markdown table, one line per model and precision, followed (after a blank
        line) by one list item per failed step or memory measurement.
    """
    ours = ([(m, f"{m} / optax-contrib") for m in modes
             if m in ("dp_jax", "dp_jax-ghost", "dp_jax-sgd")] if "optax-contrib" in modes else [])
    return _timing.report(results, modes, ours, "vs_optax_contrib")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring); ``argv=None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _timing.add_size_arguments(parser, MODEL_NAMES, MODES,
                               "reference batch x this (default 1 on an accelerator, 0.25 on "
                               "the CPU, 0.125 with --quick)")
    _timing.add_run_arguments(parser)
    parser.add_argument("--profile", action="store_true",
                        help="also time the components of a DP step (see the docstring)")
    parser.add_argument("--microbatch", type=_timing.positive(int), default=None,
                        help="with --profile: also time the engine step with this "
                        "microbatch_size")
    parser.add_argument("--mode-budget", type=_timing.positive(float), default=30.0,
                        help="seconds one mode may spend in the timed rounds (default 30); a "
                        "slower mode drops its warm-up and gets fewer (>= 3) rounds")
    parser.add_argument("--block-ms", type=float, default=20.0,
                        help="modes faster than this run blocks of consecutive steps per round, "
                        "the first one untimed (default 20; 0 turns blocks off; off with "
                        "--smoke)")
    parser.add_argument("--memory", choices=("plan", "process", "none"), default="plan",
                        help="plan: XLA's footprint of the compiled step (default); process: "
                        "each mode again alone in a subprocess (resident-set growth on the "
                        "CPU, peak_bytes_in_use on a GPU); none")
    _timing.add_precision_arguments(parser)
    _timing.add_output_arguments(parser)
    parser.add_argument(_memory.WORKER_FLAG, dest="memory_worker", default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.microbatch is not None and not args.profile:
        parser.error(f"--microbatch {args.microbatch} needs --profile (it adds the "
                     "dp_jax-mb component); add --profile or drop --microbatch.")
    return args


def _environment(plan: _timing.Plan) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__, "optax": optax.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "steps": plan.steps,
        "warmup": plan.warmup, "batch_scale": plan.batch_scale, "seq_scale": plan.seq_scale,
        "optimizer": f"sgd(lr={_LR})", "noise_multiplier": _NOISE, "max_grad_norm": _CLIP,
        "x64": bool(jax.config.jax_enable_x64),
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown table, optionally write JSON.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        ``{"environment": {...}, "results": [row, ...], "table": str}``.
    """
    args = parse_args(argv)
    if args.memory_worker is not None:
        job = json.loads(args.memory_worker)
        print(json.dumps(_memory_worker(Config(**job["config"]), job["warmup"])), flush=True)
        return {}
    if args.report:
        return _timing.print_report(args.report, markdown_table)
    plan = _plan(args)
    modes = list(args.modes)
    if args.profile:
        modes += [c for c in COMPONENTS if c != "dp_jax-mb" or args.microbatch is not None]
    environment = _environment(plan)
    environment["block_ms"] = 0.0 if args.smoke else args.block_ms
    _timing.log(f"JAX {environment['jax']} on {environment['backend']} ({environment['device']})")
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in args.models:
        batch, seq = _sizes(model, plan)
        _timing.log(f"{model}: batch {batch}, seq {seq}")
        for precision in _timing.precisions(args):
            results += _bench_model(model, precision, modes, plan, args)
    environment["device_peak_mib"] = _device_peak_mib() if _on_accelerator() else None
    environment["precisions"] = _timing.precisions(args)
    environment["memory"] = args.memory
    table = markdown_table(results, modes)
    return _timing.write_output(results, table, environment, started, args.json)


if __name__ == "__main__":
    main()
