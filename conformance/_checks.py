"""The numeric checks of one case in one dtype: gradients, clipping, noise, trajectory.

Torch side: ``dp_torch.GradSampleModule`` and the phases of ``dp_torch``'s
``DPOptimizer`` / ``DPPerLayerOptimizer``. JAX side: ``dp_jax.per_example_grads``,
``clip_per_example``, ``dp_aggregate`` and ``dp_sgd`` with host-drawn noise. Both
draw noise from a ``dpcore.noise.NoiseSource`` with the same seed, in the case's
canonical (torch ``parameters()``) order; the JAX noise is the same float64 draw,
converted to the flax layout (a transpose: exact).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import dp_jax
from dp_jax import _grads as jax_grads
from dp_torch.grad_sample import GradSampleModule
from dp_torch.optimizers import DPOptimizer, DPPerLayerOptimizer
from dp_torch.utils.uniform_sampler import UniformWithReplacementSampler
from dpcore.noise import NoiseSource
from dpcore.sampling import expected_batch_size

from conformance import tolerances
from conformance._cases import Case, get_path
from conformance._report import CheckResult, result_from_leaves

__all__ = ["Settings", "jax_precision", "run_case"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and hyperparameters shared by every case.

    Attributes:
        batch: Examples in the single-batch checks.
        expected_batch_size: Averaging denominator of the single-batch update
            (deliberately not ``batch``, so that dividing by the realised size fails).
        noise_multiplier: ``sigma``.
        num_samples: Data set size of the trajectory.
        sample_rate: Poisson rate of the trajectory.
        learning_rate: SGD step of the trajectory.
        steps: Trajectory length.
        seed: Seed of data, sampler and noise.
    """

    batch: int = 7
    expected_batch_size: int = 9
    noise_multiplier: float = 0.8
    num_samples: int = 24
    sample_rate: float = 0.25
    learning_rate: float = 0.2
    steps: int = tolerances.TRAJECTORY_STEPS
    seed: int = 0


@contextlib.contextmanager
def jax_precision(dtype: str) -> Iterator[None]:
    """Run JAX with x64 on for float64 and off for float32 (what float32 users run)."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


# --------------------------------------------------------------------------- torch helpers


def _torch_backward(case: Case, gsm: GradSampleModule, model: torch.nn.Module,
                    x: torch.Tensor, y: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
        p.grad_sample = None
    case.torch_losses(gsm, x, y).sum().backward()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _sgd(model: torch.nn.Module, lr: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr)


# --------------------------------------------------------------------------- single batch


def _noise_canonical(model: torch.nn.Module, seed: int, std: float) -> list[np.ndarray]:
    source = NoiseSource(seed)
    return [source.normal(tuple(p.shape), std) for p in model.parameters()]


def _median_bound(norms: np.ndarray) -> float:
    """A clipping bound that clips about half of the examples (3 significant digits)."""
    return float(f"{float(np.median(norms)):.3g}")


def _single_batch(case: Case, dtype: str, s: Settings) -> list[CheckResult]:
    model = case.torch_model(dtype, s.seed)
    maps = case.ordered_maps(model)
    variables = case.convert(model.state_dict())
    x, y = case.make_data(s.batch, np.random.default_rng(s.seed + 1))
    tx, ty = case.torch_batch(x, y, dtype)
    jb = case.jax_batch(x, y, dtype)
    gsm = GradSampleModule(model, loss_reduction="sum")
    params = list(model.parameters())

    # per-example gradients
    _torch_backward(case, gsm, model, tx, ty)
    torch_gs = [_np(p.grad_sample) for p in params]
    jax_pe = jax.jit(lambda v, b: dp_jax.per_example_grads(case.jax_loss(), v, b))(variables, jb)
    expected = case.to_flax(model, torch_gs)

    def pairs(jax_tree: Any, torch_tree: Any) -> list[tuple[str, Any, Any]]:
        return [
            (f"{m.name} -> {'/'.join(m.flax_path)}",
             np.asarray(get_path(jax_tree["params"], m.flax_path)),
             get_path(torch_tree["params"], m.flax_path))
            for m in maps
        ]

    out = [_result(case, "per_example_grads", dtype, pairs(jax_pe, expected))]

    # norms and clip factors (torch: the optimizer's own phases)
    probe = DPOptimizer(_sgd(model), noise_multiplier=0.0, max_grad_norm=1.0,
                        expected_batch_size=s.expected_batch_size)
    flats, batch = probe._collect_grad_samples()
    torch_norms = _np(probe._per_example_norms(flats, batch))
    bound = _median_bound(torch_norms)
    probe.max_grad_norm = bound
    torch_factors = _np(probe._clip_factors(flats, batch)[0][0])
    jax_sum, aux = dp_jax.clip_per_example(jax_pe, bound, clipping="flat")
    jax_factors = jax_grads._factor(aux.norms, bound)
    out.append(_result(case, "per_example_norms", dtype,
                       [("norms", np.asarray(aux.norms), torch_norms)]))
    out.append(_result(case, "clip_factors", dtype,
                       [("factors", np.asarray(jax_factors), torch_factors)]))

    # flat clipped sum and the noised update
    std = s.noise_multiplier * bound
    opt = DPOptimizer(_sgd(model), noise_multiplier=s.noise_multiplier, max_grad_norm=bound,
                      expected_batch_size=s.expected_batch_size,
                      generator=NoiseSource(s.seed + 2))
    opt.clip_and_accumulate()
    summed = case.to_flax(model, [_np(p.summed_grad) for p in params])
    out.append(_result(case, "clipped_sum_flat", dtype, pairs(jax_sum, summed)))
    opt.add_noise()
    opt.scale_grad()
    torch_update = case.to_flax(model, [_np(p.grad) for p in params])
    noise = case.to_flax(model, _noise_canonical(model, s.seed + 2, std))
    tx_agg = dp_jax.dp_aggregate(s.noise_multiplier, bound, s.expected_batch_size,
                                 jax.random.key(0))
    update, _ = tx_agg.update(jax_pe, tx_agg.init(variables), noise=noise)
    out.append(_result(case, "noised_update", dtype, pairs(update, torch_update)))

    # per-layer clipped sum
    _torch_backward(case, gsm, model, tx, ty)
    layer_bounds = [_median_bound(np.linalg.norm(g.reshape(g.shape[0], -1), axis=1))
                    for g in torch_gs]
    per_layer = DPPerLayerOptimizer(_sgd(model), noise_multiplier=s.noise_multiplier,
                                    max_grad_norm=layer_bounds,
                                    expected_batch_size=s.expected_batch_size)
    per_layer.clip_and_accumulate()
    summed_pl = case.to_flax(model, [_np(p.summed_grad) for p in params])
    bound_tree: dict = {}
    for mp, b in zip(maps, layer_bounds):
        sub = bound_tree
        for key in mp.flax_path[:-1]:
            sub = sub.setdefault(key, {})
        sub[mp.flax_path[-1]] = b
    bound_tree = {"params": bound_tree}
    jax_pl, _ = dp_jax.clip_per_example(jax_pe, bound_tree, clipping="per_layer")
    out.append(_result(case, "clipped_sum_per_layer", dtype, pairs(jax_pl, summed_pl)))
    gsm.remove_hooks()
    return out


def _result(case: Case, check: str, dtype: str, leaves: list) -> CheckResult:
    return result_from_leaves(case.name, check, dtype, tolerances.rtol_for(check, dtype), leaves)


# --------------------------------------------------------------------------- sampling


def _batch_indices(case: Case, dtype: str, s: Settings) -> CheckResult:
    """One epoch of Poisson batches: dp_torch's sampler vs dp_jax's iterator, same seed."""
    torch_batches = [np.asarray(b, dtype=np.int64) for b in UniformWithReplacementSampler(
        num_samples=s.num_samples, sample_rate=s.sample_rate, seed=s.seed + 3)]
    jax_batches = [_unmasked(logical) for logical in dp_jax.poisson_batches(
        np.arange(s.num_samples), s.sample_rate, seed=s.seed + 3)]
    return _index_result(case.name, dtype, torch_batches, jax_batches)


def _unmasked(logical: list) -> np.ndarray:
    return np.concatenate([np.asarray(c.batch)[np.asarray(c.mask)] for c in logical])


def _index_result(case: str, dtype: str, torch_batches: list, jax_batches: list) -> CheckResult:
    detail = ""
    mismatched = 0
    if len(torch_batches) != len(jax_batches):
        detail = f"{len(torch_batches)} torch batches vs {len(jax_batches)} jax batches"
    for step, (a, b) in enumerate(zip(torch_batches, jax_batches)):
        if a.shape != b.shape or not np.array_equal(a, b):
            mismatched += 1
            detail = detail or f"step {step}: torch {a.tolist()} vs jax {b.tolist()}"
    return CheckResult(case, "batch_indices", dtype, float(mismatched), float(mismatched),
                       tolerances.EXACT, not detail, detail)


# --------------------------------------------------------------------------- trajectory


def _trajectory(case: Case, dtype: str, s: Settings) -> CheckResult:
    """``s.steps`` DP-SGD steps in both frameworks: same init, batches and noise."""
    rng = np.random.default_rng(s.seed + 4)
    data_x, data_y = case.make_data(s.num_samples, rng)
    m = expected_batch_size(s.num_samples, s.sample_rate)
    model = case.torch_model(dtype, s.seed)
    variables = jax.tree_util.tree_map(jnp.asarray, case.convert(model.state_dict()))
    bound = _trajectory_bound(case, dtype, s, model, data_x, data_y)
    std = s.noise_multiplier * bound
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(_sgd(model, s.learning_rate), noise_multiplier=s.noise_multiplier,
                      max_grad_norm=bound, expected_batch_size=m,
                      generator=NoiseSource(s.seed + 5))
    sampler = UniformWithReplacementSampler(num_samples=s.num_samples,
                                            sample_rate=s.sample_rate, seed=s.seed + 6,
                                            steps=s.steps)
    jax_data = case.jax_batch(data_x, data_y, dtype)
    batches = dp_jax.poisson_batches(jax_data, s.sample_rate, seed=s.seed + 6, steps=s.steps,
                                     buckets=[s.num_samples])
    tx = dp_jax.dp_sgd(s.learning_rate, s.noise_multiplier, bound, m, jax.random.key(0))
    state = tx.init(variables)
    jax_source = NoiseSource(s.seed + 5)
    step = _jax_step(case, tx)
    leaves: list[tuple[str, Any, Any]] = []
    for k, (indices, logical) in enumerate(zip(sampler, batches)):
        _torch_step(case, gsm, model, opt, data_x, data_y, np.asarray(indices, np.int64), dtype)
        noise = case.to_flax(model, _noise_canonical_from(jax_source, model, std))
        (chunk,) = logical
        variables, state = step(variables, state, chunk.batch, chunk.mask, noise)
        expected = case.to_flax(model, [_np(p) for p in model.parameters()])
        leaves += [
            (f"step {k + 1}: {mp.name} -> {'/'.join(mp.flax_path)}",
             np.asarray(get_path(variables["params"], mp.flax_path)),
             get_path(expected["params"], mp.flax_path))
            for mp in case.ordered_maps(model)
        ]
    gsm.remove_hooks()
    return _result(case, "trajectory", dtype, leaves)


def _noise_canonical_from(source: NoiseSource, model: torch.nn.Module, std: float) -> list:
    return [source.normal(tuple(p.shape), std) for p in model.parameters()]


def _trajectory_bound(case: Case, dtype: str, s: Settings, model: torch.nn.Module,
                      data_x: np.ndarray, data_y: np.ndarray) -> float:
    """Median per-example norm at the initial parameters: clipping is active throughout."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    tx, ty = case.torch_batch(data_x, data_y, dtype)
    _torch_backward(case, gsm, model, tx, ty)
    sq = sum(np.sum(_np(p.grad_sample).reshape(s.num_samples, -1) ** 2, axis=1)
             for p in model.parameters())
    for p in model.parameters():
        p.grad = None
        p.grad_sample = None
    gsm.remove_hooks()
    return _median_bound(np.sqrt(sq))


def _torch_step(case: Case, gsm: GradSampleModule, model: torch.nn.Module, opt: DPOptimizer,
                data_x: np.ndarray, data_y: np.ndarray, idx: np.ndarray, dtype: str) -> None:
    opt.zero_grad(set_to_none=True)
    if idx.size:
        tx, ty = case.torch_batch(data_x[idx], data_y[idx], dtype)
        case.torch_losses(gsm, tx, ty).sum().backward()
    opt.step()


def _jax_step(case: Case, tx: Any):
    loss = case.jax_loss()

    @jax.jit
    def step(variables: Any, state: Any, batch: Any, mask: Any, noise: Any):
        grads = dp_jax.per_example_grads(loss, variables, batch)
        updates, state = tx.update(grads, state, variables, mask=mask, noise=noise)
        return optax.apply_updates(variables, updates), state

    return step


# --------------------------------------------------------------------------- entry


def run_case(case: Case, dtype: str, settings: Settings | None = None,
             *, trajectory: bool = True) -> list[CheckResult]:
    """Every check of one case in one dtype.

    Args:
        case: The paired case.
        dtype: ``"float32"`` or ``"float64"``.
        settings: Sizes and hyperparameters (defaults: :class:`Settings`).
        trajectory: Include the end-to-end trajectory check.

    Returns:
        One :class:`CheckResult` per check.
    """
    s = settings or Settings()
    with jax_precision(dtype):
        out = _single_batch(case, dtype, s)
        out.append(_batch_indices(case, dtype, s))
        if trajectory:
            out.append(_trajectory(case, dtype, s))
    return out
