"""The step audit of dp_jax: many trials of one logical step with Dirac canaries."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax._audit_common import (
    DEFAULT_DELTAS,
    StepAuditResult,
    _BACKGROUND_NORM,
    _CANARY_NORM,
    _GRAD_SAMPLE_MODES,
    _MAX_SCALE_SCORE,
    _REDUCTIONS,
    _attack_bounds,
    _check_bound,
    _check_choice,
    _check_deltas,
    _check_sigma,
    _exceeds,
    _make_private,
    _rows,
    _unit,
)
from dp_jax._engine import PrivacyEngine
from dp_jax._training import PrivateTraining, TrainState
from dpcore import audit as core_audit
from dpcore.checks import check_int

# --------------------------------------------------------------------------- step audit


def _logical_chunks(private: PrivateTraining, canary: int) -> list[tuple[Any, Any, Any]]:
    """The chunks of one (full, ``q = 1``) logical batch: ``(batch, mask, mask_out)``."""
    logical = next(iter(private.batches))
    out = []
    for chunk in logical:
        mask = np.asarray(chunk.mask)
        without = mask & (np.asarray(chunk.batch["idx"]) != canary)
        out.append((jax.tree_util.tree_map(jnp.asarray, chunk.batch), jnp.asarray(mask),
                    jnp.asarray(without)))
    return out


def _trial_scan(private: PrivateTraining, chunks: list, unit: float) -> Any:
    """Jitted ``scan(state, in_flags) -> (coordinate scores, noise RMS)`` over trials."""
    params0 = private.state.params
    last = len(chunks) - 1

    def one_trial(state: TrainState, included: jax.Array):
        state = state._replace(params=params0)
        for i, (batch, mask, without) in enumerate(chunks):
            state, _ = private.step(state, batch, jnp.where(included, mask, without), i == last)
        delta = (state.params["Dense_0"]["kernel"][:, 0] - params0["Dense_0"]["kernel"][:, 0])
        released = delta.astype(jnp.float32) * unit
        return state, (released[0], jnp.sqrt(jnp.mean(jnp.square(released[2:]))))

    return jax.jit(lambda state, flags: jax.lax.scan(one_trial, state, flags)[1])


def _step_scores(
    private: PrivateTraining, chunks: list, unit: float, flags: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    coordinate, rms = _trial_scan(private, chunks, unit)(private.state, jnp.asarray(flags))
    rms = np.asarray(rms, np.float64)
    with np.errstate(divide="ignore"):
        scale = np.clip(-np.log(rms), -_MAX_SCALE_SCORE, _MAX_SCALE_SCORE)
    return np.asarray(coordinate, np.float64), scale


def _step_layout(num_background: int, num_noise: int, bound: float) -> tuple[int, dict, int]:
    """``(dim, data, canary_row)``: coordinate 0 the canary's, 1 the background's, 2.. noise."""
    dim = 2 + num_noise
    coords = np.concatenate([np.ones(num_background, np.int64), [0]])
    norms = np.concatenate([np.full(num_background, _BACKGROUND_NORM), [_CANARY_NORM]])
    return dim, _rows(coords, norms, dim, bound), num_background


def step_audit(
    *, noise_multiplier: float, max_grad_norm: float = 1.0, trials: int = 2000,
    grad_sample_mode: str = "vmap", max_physical_batch_size: Optional[int] = None,
    loss_reduction: str = "mean", num_background: int = 7, num_noise_coordinates: int = 1024,
    deltas: Sequence[float] = DEFAULT_DELTAS, significance: float = 0.05, seed: int = 0,
) -> StepAuditResult:
    """Audit one logical step (sample rate 1) of the engine with a Dirac canary.

    The data are ``num_background`` examples with gradient ``0.5 C`` on a shared
    coordinate and one canary with gradient ``10 C`` on its own coordinate. Each
    trial runs the engine's jitted ``step`` on every physical chunk of the full
    batch from the initial parameters (the noise key advancing from trial to
    trial); "out" trials mask the canary's row, as Poisson padding does, so the
    public ``expected_batch_size`` is the same in both. Scores: the canary's
    released coordinate (in units of ``C``), and minus the log RMS of
    ``num_noise_coordinates`` coordinates no example touches (it moves only if the
    output scale depends on the realised batch).

    Guarantee:
        For a correct implementation (one Gaussian release, ``1 / sigma``-GDP),
        ``flagged`` is true with probability at most ``significance``.

    Args:
        noise_multiplier: ``sigma > 0``.
        max_grad_norm: ``C > 0``.
        trials: Number of trials ``>= 20`` (half with the canary, in random order).
        grad_sample_mode: ``"vmap"`` or ``"ghost"``.
        max_physical_batch_size: Physical chunk size (virtual steps), or ``None``.
        loss_reduction: ``"mean"`` (divide by ``expected_batch_size``) or ``"sum"``.
        num_background: Background examples ``>= 0``.
        num_noise_coordinates: Coordinates no example touches, ``>= 2``.
        deltas: Deltas at which to compare epsilons.
        significance: False-alarm probability, split over every bound compared.
        seed: Seed of the engine (noise key) and of the in/out order.

    Returns:
        The :class:`StepAuditResult`.

    Raises:
        TypeError: If ``noise_multiplier`` is not a number.
        ValueError: On an invalid value (the message names it).
    """
    start = time.perf_counter()
    sigma, bound = _check_sigma(noise_multiplier), _check_bound(max_grad_norm)
    trials = check_int(trials, "trials", 20)
    _check_choice(grad_sample_mode, "grad_sample_mode", _GRAD_SAMPLE_MODES)
    _check_choice(loss_reduction, "loss_reduction", _REDUCTIONS)
    deltas = _check_deltas(deltas)
    dim, data, canary = _step_layout(check_int(num_background, "num_background", 0),
                                     check_int(num_noise_coordinates, "num_noise_coordinates", 2),
                                     bound)
    private = _make_private(
        PrivacyEngine(), data, dim, noise_multiplier=sigma, max_grad_norm=bound,
        sample_rate=1.0, steps=1, loss_reduction=loss_reduction, seed=seed,
        grad_sample_mode=grad_sample_mode, max_physical_batch_size=max_physical_batch_size)
    flags = np.random.default_rng(seed).permutation(np.arange(trials) < trials // 2)
    unit = _unit(loss_reduction, private.expected_batch_size, bound)
    coordinate, scale = _step_scores(private, _logical_chunks(private, canary), unit, flags)
    return _step_result(
        config=dict(noise_multiplier=sigma, max_grad_norm=bound, trials=trials,
                     grad_sample_mode=grad_sample_mode, loss_reduction=loss_reduction,
                     max_physical_batch_size=max_physical_batch_size, deltas=deltas,
                     significance=significance),
        scores={"coordinate": coordinate, "scale": scale}, flags=flags, start=start)


def _step_result(
    *, config: dict, scores: dict[str, np.ndarray], flags: np.ndarray, start: float
) -> StepAuditResult:
    deltas, sigma = config["deltas"], config["noise_multiplier"]
    level = config["significance"] / (len(scores) * (len(deltas) + 1))
    attacks = tuple(_attack_bounds(name, s[flags], s[~flags], deltas, level)
                    for name, s in scores.items())
    claimed = core_audit.epsilon_at_deltas(1.0 / sigma, deltas)
    audited = tuple(max(max(a.clopper_pearson[i], a.gdp[i]) for a in attacks)
                    for i in range(len(deltas)))
    audited_mu = max(a.gdp_mu for a in attacks)
    coordinate = scores["coordinate"]
    return StepAuditResult(
        **config, claimed_mu=1.0 / sigma, claimed_epsilon=claimed, audited_mu=audited_mu,
        audited_epsilon=audited, attacks=attacks,
        out_score_std=float(np.std(coordinate[~flags])),
        in_score_mean=float(np.mean(coordinate[flags])),
        flagged=audited_mu > 1.0 / sigma or _exceeds(audited, claimed),
        seconds=time.perf_counter() - start,
    )
