"""Canary audits of dp_jax's real training paths: one step, one run, and the sampler.

The statistics live in :mod:`dpcore.audit`; this module builds the canaries and
runs them through the code a user runs: :meth:`dp_jax.PrivacyEngine.make_private`,
its jitted ``step`` (per-example clipping by vmap or ghost clipping, the
clipped-sum accumulator, noise, ``optax.sgd``) and its Poisson batches.

The model is one ``flax.linen.Dense`` layer without bias and the loss is linear,
``loss(w, x) = -<w, x>``, so an example's gradient is ``-x`` whatever the
parameters. A canary is a "Dirac" example: ``x = 10 C e_k`` on a coordinate ``k``
no other example touches, so its clipped gradient is exactly ``C e_k`` and the
released value of coordinate ``k``, in units of ``C`` on the sum scale, is
``1 + N(0, sigma^2)`` when it was in the batch and ``N(0, sigma^2)`` when not.
It is recovered from the parameter change: ``u = delta_w * m / (lr * C)`` with the
known SGD learning rate ``lr`` and denominator ``m`` (``expected_batch_size`` for
``loss_reduction="mean"``, 1 for ``"sum"``).

Public API:

- :func:`step_audit`: many trials of ONE logical step at sample rate 1 through the
  engine's jitted step (``jax.lax.scan`` over trials, the noise key advancing as in
  training); two attacks: the canary's coordinate, and the spread of coordinates no
  example touches (it exposes a denominator that depends on the realised batch).
  Bounds by :func:`dpcore.audit.clopper_pearson_bound` and
  :func:`dpcore.audit.gdp_bound` against the exact claim ``mu = 1 / sigma``.
- :func:`run_audit`: one training run with real Poisson batches and many canaries
  (Steinke, Nasr and Jagielski 2023): :func:`dpcore.audit.one_run_bound` and
  Clopper-Pearson against the engine's accountant, and
  :func:`dpcore.audit.sampler_test` on the batches the engine produced.
- ``python -m dp_jax.audit --noise-multiplier 1 --sample-rate 0.1 --steps 50 --json``
  prints a JSON report (a ``dpcore`` command can run it without importing JAX).

Guarantee:
    For an implementation that is ``(claimed_epsilon[i], deltas[i])``-DP (for
    :func:`step_audit`: ``1 / sigma``-GDP, the exact privacy of one unsampled
    Gaussian step), ``flagged`` is true with probability at most ``significance``
    (Bonferroni over every bound it compares). ``flagged`` is evidence of a bug;
    not flagged is evidence, never proof, of a correct implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from dp_jax._engine import PrivacyEngine
from dp_jax._flax import linen_loss
from dp_jax._training import PrivateTraining, TrainState
from dpcore import audit as core_audit
from dpcore._audit_run import add_audit_arguments, run_audit_cli
from dpcore.checks import check_int, check_sample_rate

__all__ = [
    "AttackBounds",
    "DEFAULT_DELTAS",
    "RunAuditResult",
    "StepAuditResult",
    "main",
    "run_audit",
    "step_audit",
]

DEFAULT_DELTAS: tuple[float, ...] = (1e-5, 1e-3, 1e-2, 0.1, 0.2)
"""The deltas at which audited and claimed epsilons are compared."""

_LEARNING_RATE = 0.5
_CANARY_NORM = 10.0  # canary gradient norm in units of C
_BACKGROUND_NORM = 0.5  # background gradient norm in units of C (never clipped)
_MAX_SCALE_SCORE = 50.0
_GRAD_SAMPLE_MODES = ("vmap", "ghost")
_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class AttackBounds:
    """Lower bounds on epsilon from one attack's in/out scores.

    Attributes:
        attack: ``"coordinate"`` (the canary's released coordinate) or ``"scale"``
            (minus the log RMS of the coordinates no example touches).
        clopper_pearson: Clopper-Pearson lower bound on epsilon at each delta.
        gdp_mu: Lower bound on the Gaussian-DP ``mu``.
        gdp: ``gdp_mu`` converted to epsilon at each delta.
    """

    attack: str
    clopper_pearson: tuple[float, ...]
    gdp_mu: float
    gdp: tuple[float, ...]


class _Report:
    """Adds ``to_dict`` to the result dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-serialisable builtins (nested dataclasses as dicts)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StepAuditResult(_Report):
    """Outcome of :func:`step_audit`.

    Attributes:
        noise_multiplier: ``sigma``.
        max_grad_norm: ``C``.
        trials: Number of one-step trials (half with the canary).
        grad_sample_mode: ``"vmap"`` or ``"ghost"``.
        max_physical_batch_size: Physical chunk size (``None``: one chunk).
        loss_reduction: ``"mean"`` or ``"sum"``.
        deltas: The deltas compared.
        claimed_mu: ``1 / sigma``.
        claimed_epsilon: The epsilon of ``claimed_mu``-GDP at each delta.
        audited_mu: Best GDP lower bound over the attacks.
        audited_epsilon: Best lower bound at each delta (attacks and methods).
        attacks: The bounds of each attack.
        out_score_std: Standard deviation of the canary coordinate without the
            canary (``~ sigma`` when correct).
        in_score_mean: Mean of the canary coordinate with the canary (``~ 1``).
        significance: Probability of a false ``flagged`` for a correct implementation.
        flagged: Whether some bound exceeds the claim.
        seconds: Wall-clock time of the audit.
    """

    noise_multiplier: float
    max_grad_norm: float
    trials: int
    grad_sample_mode: str
    max_physical_batch_size: Optional[int]
    loss_reduction: str
    deltas: tuple[float, ...]
    claimed_mu: float
    claimed_epsilon: tuple[float, ...]
    audited_mu: float
    audited_epsilon: tuple[float, ...]
    attacks: tuple[AttackBounds, ...]
    out_score_std: float
    in_score_mean: float
    significance: float
    flagged: bool
    seconds: float


@dataclasses.dataclass(frozen=True)
class RunAuditResult(_Report):
    """Outcome of :func:`run_audit`.

    Attributes:
        noise_multiplier: ``sigma``.
        sample_rate: Poisson rate ``q``.
        steps: Logical steps ``T``.
        num_canaries: ``m`` canaries, each in the data with probability 1/2.
        num_included: Canaries that were in the data.
        grad_sample_mode: ``"vmap"`` or ``"ghost"``.
        loss_reduction: ``"mean"`` or ``"sum"``.
        accountant: The engine's accountant kind.
        deltas: The deltas compared.
        claimed_epsilon: The accountant's epsilon after the run at each delta.
        one_run_epsilon: :func:`dpcore.audit.one_run_bound` at each delta.
        clopper_pearson_epsilon: Clopper-Pearson bound, included vs excluded canaries.
        gdp_mu: GDP lower bound from the same scores (reported, never flagged: the
            run is not exactly Gaussian).
        gdp_epsilon: ``gdp_mu`` at each delta (reported only).
        audited_epsilon: The larger of the one-run and Clopper-Pearson bounds.
        num_guesses: Guesses of the one-run audit (top and bottom scores).
        num_correct: Correct guesses.
        sampler: :func:`dpcore.audit.sampler_test` on the batches the engine drew.
        significance: Probability of a false ``flagged`` for a correct implementation.
        flagged: Whether a bound exceeds the accountant or the sampler test failed.
        seconds: Wall-clock time of the audit.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    num_canaries: int
    num_included: int
    grad_sample_mode: str
    loss_reduction: str
    accountant: str
    deltas: tuple[float, ...]
    claimed_epsilon: tuple[float, ...]
    one_run_epsilon: tuple[float, ...]
    clopper_pearson_epsilon: tuple[float, ...]
    gdp_mu: float
    gdp_epsilon: tuple[float, ...]
    audited_epsilon: tuple[float, ...]
    num_guesses: int
    num_correct: int
    sampler: core_audit.SamplerTestResult
    significance: float
    flagged: bool
    seconds: float


# --------------------------------------------------------------------------- checks


def _check_sigma(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"noise_multiplier must be a number > 0, got {value!r}; e.g. 1.0.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"noise_multiplier must be a finite number > 0, got {value!r}; an audit of "
            "sigma = 0 has nothing to refute (its claimed epsilon is infinite)."
        )
    return float(value)


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def _check_bound(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {value!r}; e.g. 1.0.")
    return float(value)


def _check_deltas(deltas: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(float(d) for d in deltas)
    if not checked or not all(0.0 < d < 1.0 for d in checked):
        raise ValueError(
            f"deltas must be a non-empty sequence of numbers in (0, 1), got {deltas!r}; "
            f"e.g. {list(DEFAULT_DELTAS)}."
        )
    return checked


# --------------------------------------------------------------------------- canaries


class _Linear(nn.Module):
    """``<w, x>``: one Dense unit without bias, zero-initialised, float32."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros,
                         param_dtype=jnp.float32, dtype=jnp.float32)
        return dense(x)


def _linear_loss(output: jax.Array, label: jax.Array) -> jax.Array:
    """``-<w, x>``: the gradient is ``-x`` at every parameter value."""
    del label
    return -jnp.sum(output)


def _canary_model(dim: int) -> tuple[Any, Any]:
    """``(loss_fn, params)`` of the linear model on ``dim`` input coordinates."""
    module = _Linear()
    params = module.init(jax.random.key(0), jnp.zeros((1, dim), jnp.float32))["params"]
    return linen_loss(module, _linear_loss), params


def _rows(coordinates: np.ndarray, norms: np.ndarray, dim: int, bound: float) -> dict:
    """Examples ``x_i = norms_i * C * e_{coordinates_i}``, with an ``idx`` field."""
    x = np.zeros((coordinates.size, dim), np.float32)
    x[np.arange(coordinates.size), coordinates] = norms * bound
    return {"x": x, "y": np.zeros(coordinates.size, np.float32),
            "idx": np.arange(coordinates.size, dtype=np.int32)}


def _kernel(state: TrainState) -> np.ndarray:
    return np.asarray(state.params["Dense_0"]["kernel"][:, 0], np.float64)


def _unit(loss_reduction: str, expected_batch_size: Optional[int], bound: float) -> float:
    """Multiply a parameter change by this to get the released sum in units of ``C``."""
    m = expected_batch_size if loss_reduction == "mean" else 1
    return float(m) / (_LEARNING_RATE * bound)


def _make_private(engine: PrivacyEngine, data: dict, dim: int, **kwargs: Any) -> PrivateTraining:
    loss_fn, params = _canary_model(dim)
    return engine.make_private(loss_fn=loss_fn, params=params,
                               optimizer=optax.sgd(_LEARNING_RATE), data=data, **kwargs)


# --------------------------------------------------------------------------- bounds


def _attack_bounds(
    name: str, ins: np.ndarray, outs: np.ndarray, deltas: tuple[float, ...], level: float
) -> AttackBounds:
    cp = tuple(core_audit.clopper_pearson_bound(ins, outs, delta=d, significance=level).epsilon
               for d in deltas)
    mu = core_audit.gdp_bound(ins, outs, delta=deltas[0], significance=level).mu or 0.0
    return AttackBounds(name, cp, float(mu), core_audit.epsilon_at_deltas(mu, deltas))


def _exceeds(audited: Sequence[float], claimed: Sequence[float]) -> bool:
    return any(a > c for a, c in zip(audited, claimed))


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
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    trials: int = 2000,
    grad_sample_mode: str = "vmap",
    max_physical_batch_size: Optional[int] = None,
    loss_reduction: str = "mean",
    num_background: int = 7,
    num_noise_coordinates: int = 1024,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    significance: float = 0.05,
    seed: int = 0,
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


# --------------------------------------------------------------------------- run audit


def _run_layout(
    num_canaries: int, num_background: int, bound: float, rng: np.random.Generator
) -> tuple[int, dict, np.ndarray]:
    """``(dim, data, included)``: canary ``k`` on coordinate ``k``, background on ``m``."""
    included = rng.random(num_canaries) < 0.5
    dim = num_canaries + 1
    coords = np.concatenate([np.full(num_background, num_canaries), np.flatnonzero(included)])
    norms = np.concatenate([np.full(num_background, _BACKGROUND_NORM),
                            np.full(int(included.sum()), _CANARY_NORM)])
    return dim, _rows(coords, norms, dim, bound), included


def _logical_batches(batches: Any, steps: int) -> Iterator[Any]:
    """``steps`` logical batches, continuing the stream over epochs if needed."""
    taken = 0
    while taken < steps:
        before = taken
        for logical in batches:
            yield logical
            taken += 1
            if taken == steps:
                return
        if taken == before:
            raise ValueError("the engine's batches are empty; cannot run the audit.")


def _indices(logical: Sequence[Any]) -> np.ndarray:
    parts = [np.asarray(c.batch["idx"])[np.asarray(c.mask)] for c in logical]
    return np.concatenate(parts).astype(np.int64)


def _train(
    private: PrivateTraining, steps: int, num_canaries: int, unit: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Train ``steps`` logical steps; per-step released canary coordinates and batches."""
    state = private.state
    previous = _kernel(state)
    released = np.zeros((steps, num_canaries))
    plan = []
    for t, logical in enumerate(_logical_batches(private.batches, steps)):
        plan.append(_indices(logical))
        state, _ = private.train_logical_step(state, logical)
        current = _kernel(state)
        released[t] = (current - previous)[:num_canaries] * unit
        previous = current
    return released, plan


def _one_run(
    scores: np.ndarray, included: np.ndarray, deltas: tuple[float, ...], level: float,
    guess_fraction: float,
) -> tuple[tuple[float, ...], int, int]:
    k = max(1, int(round(guess_fraction * scores.size / 2)))
    r, v = core_audit.count_guesses(scores, included, num_positive=k, num_negative=k)
    eps = tuple(core_audit.one_run_bound(scores.size, r, v, delta=d, significance=level).epsilon
                for d in deltas)
    return eps, r, v


def run_audit(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    num_canaries: int,
    grad_sample_mode: str = "vmap",
    max_grad_norm: float = 1.0,
    num_background: int = 64,
    loss_reduction: str = "sum",
    max_physical_batch_size: Optional[int] = None,
    accountant: str = "rdp",
    guess_fraction: float = 0.2,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    significance: float = 0.05,
    seed: int = 0,
) -> RunAuditResult:
    """Audit one training run of the engine with real Poisson batches and many canaries.

    Each canary (gradient ``10 C`` on its own coordinate) is in the data with
    probability 1/2; ``num_background`` examples have gradient ``0.5 C`` on one
    more coordinate. The engine trains ``steps`` logical steps of plain SGD; a
    canary's score is ``sum_t log(1 - q + q exp((2 x_t - 1) / (2 sigma^2)))``
    with ``x_t`` its coordinate's released increment in units of ``C`` (the
    likelihood ratio of "in" against "out" for a correct implementation). The
    one-run bound guesses "in" for the top and "out" for the bottom
    ``guess_fraction / 2`` of the canaries; Clopper-Pearson compares included
    with excluded canaries; both are compared with the accountant's epsilon. The
    batch indices the engine's batches produced go through
    :func:`dpcore.audit.sampler_test`.

    Guarantee:
        For a correct implementation whose accountant is right, ``flagged`` is true
        with probability at most ``significance`` (half for the bounds, half for
        the sampler test).

    Args:
        noise_multiplier: ``sigma > 0``.
        sample_rate: Poisson rate ``q`` in ``(0, 1]``.
        steps: Logical steps ``>= 1``.
        num_canaries: Canaries ``>= 2``.
        grad_sample_mode: ``"vmap"`` or ``"ghost"``.
        max_grad_norm: ``C > 0``.
        num_background: Background examples ``>= 0``.
        loss_reduction: ``"sum"`` (default) or ``"mean"``.
        max_physical_batch_size: Physical chunk size (virtual steps), or ``None``.
        accountant: The engine's accountant kind (``"rdp"``, ``"prv"``, ...).
        guess_fraction: Fraction of canaries guessed on, in ``(0, 1]``.
        deltas: Deltas at which to compare epsilons.
        significance: False-alarm probability.
        seed: Seed of the canary inclusion, the sampler and the noise key.

    Returns:
        The :class:`RunAuditResult`.

    Raises:
        TypeError: If ``noise_multiplier`` is not a number.
        ValueError: On an invalid value (the message names it).
    """
    start = time.perf_counter()
    sigma, bound = _check_sigma(noise_multiplier), _check_bound(max_grad_norm)
    q, steps = check_sample_rate(sample_rate), check_int(steps, "steps", 1)
    m = check_int(num_canaries, "num_canaries", 2)
    _check_choice(grad_sample_mode, "grad_sample_mode", _GRAD_SAMPLE_MODES)
    _check_choice(loss_reduction, "loss_reduction", _REDUCTIONS)
    if not 0.0 < guess_fraction <= 1.0:
        raise ValueError(f"guess_fraction must be in (0, 1], got {guess_fraction!r}; e.g. 0.2.")
    deltas = _check_deltas(deltas)
    dim, data, included = _run_layout(m, check_int(num_background, "num_background", 0),
                                      bound, np.random.default_rng(seed))
    engine = PrivacyEngine(accountant=accountant)
    private = _make_private(
        engine, data, dim, noise_multiplier=sigma, max_grad_norm=bound, sample_rate=q,
        steps=steps, loss_reduction=loss_reduction, seed=seed,
        grad_sample_mode=grad_sample_mode, max_physical_batch_size=max_physical_batch_size)
    released, plan = _train(private, steps, m, _unit(loss_reduction, private.expected_batch_size,
                                                     bound))
    scores = core_audit.log_likelihood_ratio_scores(released, q, sigma)
    level = significance / 2.0 / (2 * len(deltas))
    one_run, r, v = _one_run(scores, included, deltas, level, guess_fraction)
    cp = _attack_bounds("coordinate", scores[included], scores[~included], deltas, level)
    sampler = core_audit.sampler_test(plan, data["x"].shape[0], q, steps,
                                      significance=significance / 2.0)
    claimed = tuple(float(engine.get_epsilon(d)) for d in deltas)
    audited = tuple(max(a, b) for a, b in zip(one_run, cp.clopper_pearson))
    return RunAuditResult(
        noise_multiplier=sigma, sample_rate=q, steps=steps, num_canaries=m,
        num_included=int(included.sum()), grad_sample_mode=grad_sample_mode,
        loss_reduction=loss_reduction, accountant=accountant, deltas=deltas,
        claimed_epsilon=claimed, one_run_epsilon=one_run,
        clopper_pearson_epsilon=cp.clopper_pearson, gdp_mu=cp.gdp_mu, gdp_epsilon=cp.gdp,
        audited_epsilon=audited, num_guesses=r, num_correct=v, sampler=sampler,
        significance=significance,
        flagged=_exceeds(audited, claimed) or not sampler.passed,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dp_jax.audit",
        description="Canary audit of dp_jax's engine: one run (Poisson batches, many "
                    "canaries) and/or one step (many trials).")
    add_audit_arguments(parser, num_canaries=500, trials=2000, accountant="rdp",
                        significance=0.05, seed=0)
    parser.add_argument("--kind", choices=("run", "step", "both"), default="run")
    parser.add_argument("--grad-sample-mode", choices=_GRAD_SAMPLE_MODES, default="vmap")
    return parser


def _report(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"backend": "dp_jax", "run": None, "step": None}
    if args.kind in ("run", "both"):
        report["run"] = run_audit(
            noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate,
            steps=args.steps, num_canaries=args.num_canaries,
            grad_sample_mode=args.grad_sample_mode, accountant=args.accountant,
            significance=args.significance, seed=args.seed).to_dict()
    if args.kind in ("step", "both"):
        report["step"] = step_audit(
            noise_multiplier=args.noise_multiplier, trials=args.trials,
            grad_sample_mode=args.grad_sample_mode, significance=args.significance,
            seed=args.seed).to_dict()
    report["flagged"] = any(r["flagged"] for r in (report["run"], report["step"]) if r)
    return report


def _text(report: dict[str, Any]) -> str:
    lines = []
    for kind in ("step", "run"):
        result = report[kind]
        if result is None:
            continue
        lines.append(f"{kind} audit: flagged={result['flagged']}")
        for d, a, c in zip(result["deltas"], result["audited_epsilon"],
                           result["claimed_epsilon"]):
            lines.append(f"  delta={d:g}: audited eps >= {a:.3f}, claimed eps {c:.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the audit(s) and print the report.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 if nothing was flagged, 1 if an audit flagged the implementation.
    """
    return run_audit_cli(argv, _parser(), _report, _text)


if __name__ == "__main__":
    sys.exit(main())
