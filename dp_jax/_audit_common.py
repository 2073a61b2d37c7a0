"""Shared pieces of the dp_jax canary audits: results, argument checks, the canary model."""

from __future__ import annotations

import dataclasses
import math
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
    """Outcome of :func:`dp_jax.audit.step_audit`.

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
    """Outcome of :func:`dp_jax.audit.run_audit`.

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
