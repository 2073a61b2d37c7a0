"""The run audit of dp_jax: one Poisson training run with canaries included at rate 1/2."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from dp_jax._audit_common import _BACKGROUND_NORM, _CANARY_NORM, _GRAD_SAMPLE_MODES, _REDUCTIONS
from dp_jax._audit_common import DEFAULT_DELTAS, RunAuditResult, _attack_bounds, _exceeds, _kernel
from dp_jax._audit_common import _check_bound, _check_choice, _check_deltas, _check_sigma
from dp_jax._audit_common import _make_private, _rows, _unit
from dp_jax._engine import PrivacyEngine
from dp_jax._training import PrivateTraining
from dpcore import audit as core_audit
from dpcore.checks import check_int, check_sample_rate

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
    *, noise_multiplier: float, sample_rate: float, steps: int, num_canaries: int,
    grad_sample_mode: str = "vmap", max_grad_norm: float = 1.0, num_background: int = 64,
    loss_reduction: str = "sum", max_physical_batch_size: Optional[int] = None,
    accountant: str = "rdp", guess_fraction: float = 0.2,
    deltas: Sequence[float] = DEFAULT_DELTAS, significance: float = 0.05, seed: int = 0,
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
        The :class:`RunAuditResult`; bad arguments raise as in :func:`dp_jax.audit.step_audit`.
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
