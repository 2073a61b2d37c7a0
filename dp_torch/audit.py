"""Canary audits of dp_torch through its real code paths (design.md, Auditing).

Two audits, both built on :mod:`dpcore.audit` (which holds the statistics only):

- :func:`step_audit`: many trials of *one* logical DP-SGD step with sample rate
  ``q = 1`` through ``PrivacyEngine.make_private`` (real ``DPDataLoader``, real
  ``DPOptimizer``, the chosen ``grad_sample_mode``, and ``BatchMemoryManager`` when
  ``physical_batch_size`` is given). One Gaussian step with sensitivity ``C`` is
  ``1/sigma``-GDP; the audit checks that claim and two calibration facts.
- :func:`run_audit`: one training run of ``T`` steps with real Poisson sampling and
  many canaries, each in the data set with probability 1/2, bounded by the one-run
  audit of Steinke, Nasr and Jagielski (2023) and by Clopper-Pearson over included
  vs excluded canaries, compared with the engine's accountant; the batches the
  loader produced go through :func:`dpcore.audit.sampler_test`.

Canaries. The model is ``nn.Linear(D, 1, bias=False)`` with the linear loss
``sum(output)``, so an example's gradient is its input. A canary is a "Dirac"
gradient: ``10 C`` times a one-hot vector on a coordinate of its own, so clipping
brings it to exactly ``C`` (a skipped clip shows as 10). Background examples are
zero on every canary coordinate but still contribute, so batches are never empty.
With plain SGD of known learning rate and ``loss_reduction="sum"``, the released
(noised) gradient on a canary coordinate is ``-delta_w / lr``; divided by ``C`` it
is ``[canary in the batch] + N(0, sigma^2)``. Each canary coordinate is one
independent trial, so one (large) step holds many trials, still on the real path.

Command line (prints a JSON report; exit status 1 when an audit flags)::

    python -m dp_torch.audit --noise-multiplier 1.0 --sample-rate 0.1 --steps 50 --json

Guarantee:
    With the library implementing the claimed mechanism, each audit is flagged
    with probability at most its ``significance`` (Bonferroni over every bound and
    calibration test it reports). A flag is statistical evidence of a bug; no flag
    is evidence, never proof, of a correct implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from dp_torch.data_loader import DPDataLoader
from dp_torch.privacy_engine import PrivacyEngine
from dp_torch.utils.batch_memory_manager import BatchMemoryManager
from dpcore import audit as core_audit
from dpcore._audit_run import add_audit_arguments, run_audit_cli
from dpcore.checks import check_choice, check_delta, check_int, check_positive, check_sample_rate

__all__ = [
    "CANARY_NORM_FACTOR",
    "DEFAULT_DELTAS",
    "CalibrationCheck",
    "RunAuditResult",
    "StepAuditResult",
    "main",
    "run_audit",
    "step_audit",
]

#: Raw gradient norm of a canary, in units of the clipping bound ``C``.
CANARY_NORM_FACTOR = 10.0
#: Deltas at which audited and claimed epsilons are compared.
DEFAULT_DELTAS = (1e-5, 1e-3, 1e-2, 0.1, 0.2)
_MODES = ("hooks", "ghost", "functorch")
_LEARNING_RATE = 1.0
_NUM_BACKGROUND = 32
_BACKGROUND_DIM = 8


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class CalibrationCheck:
    """A fact the correct mechanism satisfies, with a confidence interval.

    Attributes:
        name: What is checked (e.g. ``"out-score std"``).
        expected: Its value for the claimed mechanism.
        observed: Its estimate from the audit.
        ci_low: Lower end of the two-sided confidence interval around ``observed``.
        ci_high: Upper end of that interval.
        ok: Whether ``expected`` lies in ``[ci_low, ci_high]``.
    """

    name: str
    expected: float
    observed: float
    ci_low: float
    ci_high: float
    ok: bool


@dataclasses.dataclass(frozen=True)
class StepAuditResult:
    """Outcome of :func:`step_audit` (scores and epsilons in units of ``C``).

    Attributes:
        noise_multiplier: ``sigma`` of the audited step.
        grad_sample_mode: The per-sample gradient mode used.
        physical_batch_size: Chunk size of ``BatchMemoryManager`` (``None``: none).
        num_in: Trials whose canary was in the batch.
        num_out: Trials whose canary was not.
        deltas: Deltas of the comparison.
        claimed_mu: ``1 / sigma``.
        claimed_epsilons: Epsilon of ``1/sigma``-GDP at each delta.
        gdp: Lower bound on ``mu`` (:func:`dpcore.audit.gdp_bound`).
        gdp_epsilons: ``gdp.mu`` converted to epsilon at each delta.
        clopper_pearson: One Clopper-Pearson bound per delta.
        out_std: Std of out-scores (expected ``sigma``).
        in_mean: Mean of in-scores (expected 1).
        significance: Overall false-alarm level of ``flagged``.
        flagged: Whether any bound exceeds the claim or a calibration fact is off.
        reasons: Why it was flagged (empty otherwise).
    """

    noise_multiplier: float
    grad_sample_mode: str
    physical_batch_size: Optional[int]
    num_in: int
    num_out: int
    deltas: tuple[float, ...]
    claimed_mu: float
    claimed_epsilons: tuple[float, ...]
    gdp: core_audit.AuditBound
    gdp_epsilons: tuple[float, ...]
    clopper_pearson: tuple[core_audit.AuditBound, ...]
    out_std: CalibrationCheck
    in_mean: CalibrationCheck
    significance: float
    flagged: bool
    reasons: tuple[str, ...]

    @property
    def audited_epsilons(self) -> tuple[float, ...]:
        """Best audited lower bound (GDP or Clopper-Pearson) at each delta."""
        return tuple(max(g, c.epsilon) for g, c in zip(self.gdp_epsilons, self.clopper_pearson))


@dataclasses.dataclass(frozen=True)
class RunAuditResult:
    """Outcome of :func:`run_audit`.

    Attributes:
        noise_multiplier: ``sigma`` of the run.
        sample_rate: Poisson rate ``q``.
        steps: Logical steps ``T``.
        num_canaries: ``m``.
        num_included: Canaries that were in the data set.
        accountant: The engine's accountant kind.
        grad_sample_mode: The per-sample gradient mode used.
        deltas: Deltas of the comparison.
        claimed_epsilons: The accountant's ``get_epsilon(delta)`` at each delta.
        one_run: One-run bounds, one per delta.
        clopper_pearson: Clopper-Pearson bounds over included vs excluded canaries.
        gdp: GDP bound over the same scores (informative only: the run's trade-off
            curve is not Gaussian, so it does not enter ``flagged``).
        noise_std: Std of excluded canaries' per-step increments (expected ``sigma``).
        in_increment_mean: Mean per-step increment of included canaries (expected ``q``).
        sampler: The sampler test of the batches the loader produced.
        significance: Overall false-alarm level of ``flagged``.
        flagged: Whether a certified bound exceeds the claim, a calibration fact is
            off, or the sampler test fails.
        reasons: Why it was flagged (empty otherwise).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    num_canaries: int
    num_included: int
    accountant: str
    grad_sample_mode: str
    deltas: tuple[float, ...]
    claimed_epsilons: tuple[float, ...]
    one_run: tuple[core_audit.OneRunBound, ...]
    clopper_pearson: tuple[core_audit.AuditBound, ...]
    gdp: core_audit.AuditBound
    noise_std: CalibrationCheck
    in_increment_mean: CalibrationCheck
    sampler: core_audit.SamplerTestResult
    significance: float
    flagged: bool
    reasons: tuple[str, ...]

    @property
    def audited_epsilons(self) -> tuple[float, ...]:
        """Best certified lower bound (one-run or Clopper-Pearson) at each delta."""
        return tuple(max(o.epsilon, c.epsilon) for o, c in zip(self.one_run, self.clopper_pearson))


# --------------------------------------------------------------------------- checks


def _check_mode(value: Any) -> str:
    return check_choice(value, "grad_sample_mode", _MODES)


def _check_deltas(deltas: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(check_delta(d, f"deltas[{i}]") for i, d in enumerate(deltas))
    if not checked:
        raise ValueError("deltas must be non-empty, got (); pass e.g. (1e-5, 0.01, 0.1).")
    return checked


def _check_significance(value: Any) -> float:
    level = check_positive(value, "significance")
    if level >= 1.0:
        raise ValueError(f"significance must be < 1, got {value!r}; pass e.g. 0.01.")
    return level


def _draw_included(count: int, seed: int, name: str) -> np.ndarray:
    """Each of ``count`` canaries in with probability 1/2; both sides must be non-empty."""
    included = np.random.default_rng(seed).random(count) < 0.5
    if included.all() or not included.any():
        raise ValueError(
            f"all {name}={count} canaries fell on one side ({int(included.sum())} in); "
            f"pass more {name} (hundreds or more give useful bounds) or another seed."
        )
    return included


def _seeds(seed: Optional[int], count: int) -> list[int]:
    entropy = None if seed is None else check_int(seed, "seed", 0)
    return [int(s) for s in np.random.SeedSequence(entropy).generate_state(count)]


# --------------------------------------------------------------------------- statistics


def _std_check(name: str, values: np.ndarray, expected: float, level: float) -> CalibrationCheck:
    """Std of zero-mean values, with the exact chi-square interval (``n`` degrees of freedom)."""
    n = values.size
    total = float(np.sum(np.square(values, dtype=np.float64)))
    low = math.sqrt(total / stats.chi2.ppf(1.0 - level / 2.0, n))
    high = math.sqrt(total / stats.chi2.ppf(level / 2.0, n))
    observed = math.sqrt(total / n)
    return CalibrationCheck(name, expected, observed, low, high, low <= expected <= high)


def _mean_check(name: str, values: np.ndarray, expected: float, level: float) -> CalibrationCheck:
    """Mean with the two-sided Student-t interval."""
    n = values.size
    mean = float(np.mean(values, dtype=np.float64))
    spread = float(np.std(values, ddof=1, dtype=np.float64)) if n > 1 else 0.0
    half = float(stats.t.ppf(1.0 - level / 2.0, max(n - 1, 1))) * spread / math.sqrt(n)
    low, high = mean - half, mean + half
    return CalibrationCheck(name, expected, mean, low, high, low <= expected <= high)


def _bound_reasons(
    label: str, deltas: Sequence[float], audited: Sequence[float], claimed: Sequence[float]
) -> list[str]:
    return [
        f"{label} eps {a:.3f} > claimed {c:.3f} at delta={d:g}"
        for d, a, c in zip(deltas, audited, claimed)
        if a > c
    ]


def _calibration_reasons(*checks: CalibrationCheck) -> list[str]:
    return [
        f"{c.name} {c.observed:.4g} (CI [{c.ci_low:.4g}, {c.ci_high:.4g}]) excludes the expected "
        f"{c.expected:.4g}"
        for c in checks
        if not c.ok
    ]


# --------------------------------------------------------------------------- canary task


class _LinearLoss(nn.Module):
    """``loss_i = sum(output_i)``: each example's gradient is its input (a linear loss)."""

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_example = output.reshape(output.shape[0], -1).sum(dim=1)
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()


@dataclasses.dataclass
class _Private:
    """What ``make_private`` returned for the canary task."""

    engine: PrivacyEngine
    model: nn.Module
    optimizer: Any
    criterion: Any
    loader: Any
    weight: torch.Tensor


def _features(included: np.ndarray, max_grad_norm: float, seed: int) -> torch.Tensor:
    """Rows: the background examples, then one Dirac row per included canary."""
    m = included.size
    background = torch.zeros(_NUM_BACKGROUND, m + _BACKGROUND_DIM)
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(_NUM_BACKGROUND, _BACKGROUND_DIM, generator=g)
    background[:, m:] = 2.0 * max_grad_norm * bg / bg.norm(dim=1, keepdim=True)
    ids = torch.from_numpy(np.flatnonzero(included))
    canaries = torch.zeros(ids.numel(), m + _BACKGROUND_DIM)
    canaries[torch.arange(ids.numel()), ids] = CANARY_NORM_FACTOR * max_grad_norm
    return torch.cat([background, canaries])


def _make_private(
    features: torch.Tensor, *, noise_multiplier: float, max_grad_norm: float,
    sample_rate: float, grad_sample_mode: str, accountant: str, seeds: Sequence[int],
) -> _Private:
    dataset = TensorDataset(features, torch.arange(features.shape[0]))
    loader = DPDataLoader(
        dataset, sample_rate=sample_rate, generator=torch.Generator().manual_seed(seeds[0])
    )
    model = nn.utils.skip_init(nn.Linear, features.shape[1], 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    engine = PrivacyEngine(accountant=accountant)
    parts = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=_LEARNING_RATE),
        data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        criterion=_LinearLoss("sum"), loss_reduction="sum", grad_sample_mode=grad_sample_mode,
        noise_generator=torch.Generator().manual_seed(seeds[1]),
    )
    wrapped, optimizer, *rest = parts
    criterion = rest[0] if len(rest) == 2 else _LinearLoss("sum")
    return _Private(engine, wrapped, optimizer, criterion, rest[-1], model.weight)


def _train_on(private: _Private, x: torch.Tensor, y: torch.Tensor) -> None:
    private.criterion(private.model(x), y).backward()
    private.optimizer.step()
    private.optimizer.zero_grad()


def _released(before: torch.Tensor, after: torch.Tensor, max_grad_norm: float) -> np.ndarray:
    """Released gradient in units of ``C``, from one SGD parameter change."""
    change = (after - before).to(torch.float64).reshape(-1).numpy()
    return -change / (_LEARNING_RATE * max_grad_norm)


# --------------------------------------------------------------------------- step audit


def _one_step(private: _Private, physical_batch_size: Optional[int]) -> None:
    if physical_batch_size is None:
        for x, y in private.loader:
            _train_on(private, x, y)
        return
    with BatchMemoryManager(
        data_loader=private.loader, max_physical_batch_size=physical_batch_size,
        optimizer=private.optimizer,
    ) as chunks:
        for x, y in chunks:
            _train_on(private, x, y)


def _step_scores(
    noise_multiplier: float, max_grad_norm: float, trials: int, grad_sample_mode: str,
    physical_batch_size: Optional[int], seed: Optional[int],
) -> tuple[np.ndarray, np.ndarray]:
    seeds = _seeds(seed, 4)
    included = _draw_included(trials, seeds[2], "trials")
    private = _make_private(
        _features(included, max_grad_norm, seeds[3]), noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, sample_rate=1.0, grad_sample_mode=grad_sample_mode,
        accountant="rdp", seeds=seeds,
    )
    before = private.weight.detach().clone()
    _one_step(private, physical_batch_size)
    scores = _released(before, private.weight.detach(), max_grad_norm)[:trials]
    return scores, included


def step_audit(
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    trials: int = 4000,
    grad_sample_mode: str = "hooks",
    physical_batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    significance: float = 0.01,
) -> StepAuditResult:
    """Audit one logical DP-SGD step (``q = 1``) through ``PrivacyEngine.make_private``.

    ``trials`` canaries, each in the batch with probability 1/2, go through one
    real step (``DPDataLoader`` at rate 1, the DP optimizer for
    ``grad_sample_mode``, ``BatchMemoryManager`` when ``physical_batch_size`` is
    given). A trial's score is its canary coordinate of the released gradient in
    units of ``C``: ``[in] + N(0, sigma^2)`` for the correct mechanism, which is
    ``1/sigma``-GDP. Flagged when the GDP bound on ``mu`` or a Clopper-Pearson
    bound exceeds that claim, when the std of out-scores is not ``sigma`` or the
    mean of in-scores not 1 (confidence intervals).

    Guarantee:
        For a correct implementation ``flagged`` is ``True`` with probability at
        most ``significance`` (split evenly over the GDP bound, one
        Clopper-Pearson bound per delta and the two calibration intervals).

    Args:
        noise_multiplier: ``sigma > 0``.
        max_grad_norm: Clipping bound ``C > 0``.
        trials: Number of canaries (trials), ``>= 4``.
        grad_sample_mode: ``"hooks"``, ``"ghost"`` or ``"functorch"``.
        physical_batch_size: Split the step into chunks of this size (``None``: no split).
        seed: Seed of the canaries, sampling and noise (``None``: fresh entropy).
        deltas: Deltas at which to compare audited and claimed epsilons.
        significance: Overall false-alarm level, ``0 < significance < 1``.

    Returns:
        The bounds, calibration checks and verdict.

    Raises:
        TypeError: On an argument of the wrong type.
        ValueError: On an invalid value (the message names it and the fix).
    """
    sigma = check_positive(noise_multiplier, "noise_multiplier")
    bound = check_positive(max_grad_norm, "max_grad_norm")
    mode, checked = _check_mode(grad_sample_mode), _check_deltas(deltas)
    level = _check_significance(significance) / (len(checked) + 3)
    physical = None if physical_batch_size is None else check_int(
        physical_batch_size, "physical_batch_size", 1)
    scores, included = _step_scores(
        sigma, bound, check_int(trials, "trials", 4), mode, physical, seed)
    return _step_result(scores, included, sigma, mode, physical, checked, level)


def _step_result(
    scores: np.ndarray, included: np.ndarray, sigma: float, mode: str,
    physical: Optional[int], deltas: tuple[float, ...], level: float,
) -> StepAuditResult:
    ins, outs = scores[included], scores[~included]
    claimed = core_audit.epsilon_at_deltas(1.0 / sigma, deltas)
    gdp = core_audit.gdp_bound(ins, outs, delta=deltas[0], significance=level)
    gdp_eps = core_audit.epsilon_at_deltas(gdp.mu or 0.0, deltas)
    cps = tuple(core_audit.clopper_pearson_bound(ins, outs, delta=d, significance=level)
                for d in deltas)
    out_std = _std_check("out-score std", outs, sigma, level)
    in_mean = _mean_check("in-score mean", ins, 1.0, level)
    reasons = _bound_reasons("GDP", deltas, gdp_eps, claimed)[:1]
    reasons += _bound_reasons("Clopper-Pearson", deltas, [c.epsilon for c in cps], claimed)
    reasons += _calibration_reasons(out_std, in_mean)
    return StepAuditResult(
        noise_multiplier=sigma, grad_sample_mode=mode, physical_batch_size=physical,
        num_in=int(ins.size), num_out=int(outs.size), deltas=deltas, claimed_mu=1.0 / sigma,
        claimed_epsilons=claimed, gdp=gdp, gdp_epsilons=gdp_eps, clopper_pearson=cps,
        out_std=out_std, in_mean=in_mean, significance=level * (len(deltas) + 3),
        flagged=bool(reasons), reasons=tuple(reasons),
    )


# --------------------------------------------------------------------------- run audit


def _logical_batches(private: _Private, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    taken = 0
    while taken < steps:
        for x, y in private.loader:
            yield x, y
            taken += 1
            if taken == steps:
                return


def _train_run(private: _Private, steps: int, m: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Train ``steps`` steps; return the ``[T, m]`` canary increments and the batches."""
    increments, batches = [], []
    before = private.weight.detach().clone()
    for x, y in _logical_batches(private, steps):
        _train_on(private, x, y)
        after = private.weight.detach().clone()
        increments.append(_released(before, after, 1.0)[:m])
        batches.append(y.numpy().copy())
        before = after
    return np.stack(increments), batches


def _run_bounds(
    scores: np.ndarray, included: np.ndarray, deltas: tuple[float, ...], level: float,
    num_guesses: int,
) -> tuple[tuple[core_audit.OneRunBound, ...], tuple[core_audit.AuditBound, ...]]:
    positive = num_guesses // 2
    r, v = core_audit.count_guesses(
        scores, included, num_positive=positive, num_negative=num_guesses - positive)
    one_run = tuple(core_audit.one_run_bound(included.size, r, v, delta=d, significance=level)
                    for d in deltas)
    ins, outs = scores[included], scores[~included]
    cps = tuple(core_audit.clopper_pearson_bound(ins, outs, delta=d, significance=level)
                for d in deltas)
    return one_run, cps


def run_audit(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    num_canaries: int = 1000,
    grad_sample_mode: str = "hooks",
    seed: Optional[int] = None,
    max_grad_norm: float = 1.0,
    accountant: str = "prv",
    num_guesses: Optional[int] = None,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    significance: float = 0.01,
) -> RunAuditResult:
    """Audit one Poisson-sampled training run of ``steps`` steps (one-run audit).

    ``num_canaries`` Dirac canaries, each in the data set with probability 1/2,
    train with background examples through ``make_private`` (a real
    ``DPDataLoader`` at ``sample_rate``, plain SGD, ``loss_reduction="sum"``).
    Each canary's per-step released coordinate ``x_t`` (units of ``C``) gives the
    score ``sum_t log(1 - q + q exp((2 x_t - 1) / (2 sigma^2)))`` (the likelihood
    ratio of "in" against "out"). Certified bounds: the one-run bound with the top
    and bottom ``num_guesses / 2`` scores guessed, and Clopper-Pearson over
    included vs excluded canaries (valid here because the canaries' coordinates,
    noise and Poisson draws are independent), both against the accountant's
    ``get_epsilon(delta)``. Also checked: excluded canaries' increments have std
    ``sigma``, included ones mean ``q``, and the batches pass the sampler test.

    Guarantee:
        For a correct implementation ``flagged`` is ``True`` with probability at
        most ``significance`` (split evenly over ``2 len(deltas) + 3`` statements:
        two bounds per delta, two calibration intervals, the sampler test).

    Args:
        noise_multiplier: ``sigma > 0``.
        sample_rate: Poisson rate ``q``, ``0 < q <= 1``.
        steps: Logical steps ``T >= 1``.
        num_canaries: ``m >= 4``.
        grad_sample_mode: ``"hooks"``, ``"ghost"`` or ``"functorch"``.
        seed: Seed of canaries, sampling and noise (``None``: fresh entropy).
        max_grad_norm: Clipping bound ``C > 0``.
        accountant: The engine's accountant kind (``"prv"``, ``"rdp"``, ...).
        num_guesses: Guesses of the one-run audit, fixed in advance (default ``m // 5``).
        deltas: Deltas at which to compare audited and claimed epsilons.
        significance: Overall false-alarm level, ``0 < significance < 1``.

    Returns:
        The bounds, calibration checks, sampler test and verdict.

    Raises:
        TypeError: On an argument of the wrong type.
        ValueError: On an invalid value (the message names it and the fix).
    """
    sigma = check_positive(noise_multiplier, "noise_multiplier")
    q, t = check_sample_rate(sample_rate), check_int(steps, "steps", 1)
    m, mode = check_int(num_canaries, "num_canaries", 4), _check_mode(grad_sample_mode)
    guesses = m // 5 if num_guesses is None else check_int(num_guesses, "num_guesses", 1)
    if guesses > m:
        raise ValueError(f"num_guesses must be <= num_canaries={m}, got {guesses}; guess less.")
    checked = _check_deltas(deltas)
    level = _check_significance(significance) / (2 * len(checked) + 3)
    bound = check_positive(max_grad_norm, "max_grad_norm")
    setting = _RunSetting(sigma, q, t, mode, accountant, checked, level, guesses)
    seeds = _seeds(seed, 4)
    included = _draw_included(m, seeds[2], "num_canaries")
    private = _make_private(
        _features(included, bound, seeds[3]), noise_multiplier=sigma, max_grad_norm=bound,
        sample_rate=q, grad_sample_mode=mode, accountant=accountant, seeds=seeds,
    )
    increments, batches = _train_run(private, t, m)
    claimed = tuple(private.engine.get_epsilon(d) for d in checked)
    sampler = core_audit.sampler_test(
        batches, len(private.loader.dataset), q, t, significance=level)
    return _run_result(increments / bound, included, sampler, claimed, setting)


@dataclasses.dataclass(frozen=True)
class _RunSetting:
    """The validated arguments of :func:`run_audit` that its result reports."""

    sigma: float
    q: float
    steps: int
    mode: str
    accountant: str
    deltas: tuple[float, ...]
    level: float
    guesses: int


def _run_result(
    increments: np.ndarray, included: np.ndarray, sampler: core_audit.SamplerTestResult,
    claimed: tuple[float, ...], s: _RunSetting,
) -> RunAuditResult:
    scores = core_audit.log_likelihood_ratio_scores(increments, s.q, s.sigma)
    one_run, cps = _run_bounds(scores, included, s.deltas, s.level, s.guesses)
    gdp = core_audit.gdp_bound(
        scores[included], scores[~included], delta=s.deltas[0], significance=s.level)
    noise_std = _std_check("excluded-canary increment std", increments[:, ~included], s.sigma,
                           s.level)
    in_mean = _mean_check("included-canary increment mean", increments[:, included], s.q, s.level)
    reasons = _bound_reasons("one-run", s.deltas, [b.epsilon for b in one_run], claimed)
    reasons += _bound_reasons("Clopper-Pearson", s.deltas, [c.epsilon for c in cps], claimed)
    reasons += _calibration_reasons(noise_std, in_mean)
    reasons += [f"sampler test: {sampler.reason}"] if not sampler.passed else []
    return RunAuditResult(
        noise_multiplier=s.sigma, sample_rate=s.q, steps=s.steps, num_canaries=included.size,
        num_included=int(included.sum()), accountant=s.accountant, grad_sample_mode=s.mode,
        deltas=s.deltas, claimed_epsilons=claimed, one_run=one_run, clopper_pearson=cps, gdp=gdp,
        noise_std=noise_std, in_increment_mean=in_mean, sampler=sampler,
        significance=s.level * (2 * len(s.deltas) + 3), flagged=bool(reasons),
        reasons=tuple(reasons),
    )


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dp_torch.audit",
        description="Canary audits of dp_torch (one step and one run); exit 1 when flagged.",
    )
    add_audit_arguments(parser, num_canaries=1000, trials=4000, accountant="prv",
                        significance=0.01, seed=None)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--grad-sample-mode", choices=_MODES, default="hooks")
    parser.add_argument("--physical-batch-size", type=int, default=None)
    parser.add_argument("--audit", choices=("step", "run", "both"), default="both")
    return parser


def _report(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    common = {"noise_multiplier": args.noise_multiplier, "max_grad_norm": args.max_grad_norm,
              "grad_sample_mode": args.grad_sample_mode, "seed": args.seed,
              "significance": args.significance}
    if args.audit in ("step", "both"):
        step = step_audit(trials=args.trials, physical_batch_size=args.physical_batch_size,
                          **common)
        report["step"] = {**dataclasses.asdict(step), "audited_epsilons": step.audited_epsilons}
    if args.audit in ("run", "both"):
        run = run_audit(sample_rate=args.sample_rate, steps=args.steps,
                        num_canaries=args.num_canaries, accountant=args.accountant, **common)
        report["run"] = {**dataclasses.asdict(run), "audited_epsilons": run.audited_epsilons}
    report["flagged"] = any(part["flagged"] for part in report.values())
    return report


def _text(report: dict[str, Any]) -> str:
    lines = []
    for name in ("step", "run"):
        if name in report:
            part = report[name]
            lines.append(f"{name} audit: {'FLAGGED' if part['flagged'] else 'ok'}")
            for d, a, c in zip(part["deltas"], part["audited_epsilons"], part["claimed_epsilons"]):
                lines.append(f"  delta={d:g}: audited eps >= {a:.3f}, claimed {c:.3f}")
            lines.extend(f"  reason: {r}" for r in part["reasons"])
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the audits from the command line and print the report.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 when no audit is flagged, 1 when one is (argparse exits 2 on bad arguments).
    """
    return run_audit_cli(argv, _parser(), _report, _text)


if __name__ == "__main__":
    sys.exit(main())
