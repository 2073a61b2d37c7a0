"""Ledger parity: both PrivacyEngines run the same schedule; ledgers and epsilons must agree.

The schedule: Poisson batches at rate ``q`` with virtual steps (logical batches
split into physical chunks of at most ``max_physical_batch_size``) for one epoch,
then a noise schedule step (``dp_torch.schedulers.ExponentialNoise``; in JAX the
injected ``noise_multiplier`` hyperparameter is set to the value the torch
scheduler produced) and a second epoch. Each engine's accountant must hold the
same history, and ``get_epsilon`` must agree to ``1e-12`` relative, for every
accountant.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch.utils.data import DataLoader, TensorDataset

import dp_jax
import dp_torch
from dp_torch.schedulers import ExponentialNoise
from dp_torch.utils.batch_memory_manager import BatchMemoryManager
from dpcore.accounting import GDPApproximationWarning, available_accountants

from conformance import tolerances
from conformance._cases import MLP, Case
from conformance._checks import jax_precision
from conformance._report import CheckResult

__all__ = ["ACCOUNTANTS", "DELTA", "run_ledger_checks"]

#: The accountants whose ledgers are compared.
ACCOUNTANTS = ("rdp", "prv", "pld", "gdp")
DELTA = 1e-5
_N, _BATCH, _PHYSICAL, _SIGMA, _GAMMA, _C = 24, 6, 3, 1.1, 0.7, 1.0


def _data(case: Case) -> tuple[np.ndarray, np.ndarray]:
    return case.make_data(_N, np.random.default_rng(7))


def _torch_run(case: Case, accountant: str, dtype: str) -> Any:
    x, y = _data(case)
    tx, ty = case.torch_batch(x, y, dtype)
    model = case.torch_model(dtype)
    engine = dp_torch.PrivacyEngine(accountant=accountant)
    loader = DataLoader(TensorDataset(tx, ty), batch_size=_BATCH)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader, noise_multiplier=_SIGMA, max_grad_norm=_C, poisson_sampling=True,
    )
    scheduler = ExponentialNoise(optimizer, gamma=_GAMMA)
    sigmas = []
    for _ in range(2):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=_PHYSICAL,
                                optimizer=optimizer) as physical:
            for bx, by in physical:
                optimizer.zero_grad()
                if len(bx):
                    case.torch_losses(model, bx, by).mean().backward()
                optimizer.step()
        sigmas.append(optimizer.noise_multiplier)
        scheduler.step()
    return engine, sigmas


def _jax_run(case: Case, accountant: str, dtype: str, sigmas: list[float]) -> Any:
    x, y = _data(case)
    data = case.jax_batch(x, y, dtype)
    model = case.torch_model(dtype)
    params = jax.tree_util.tree_map(jnp.asarray, case.convert(model.state_dict()))
    engine = dp_jax.PrivacyEngine(accountant=accountant)
    private = engine.make_private(
        loss_fn=case.jax_loss(), params=params, optimizer=optax.sgd(0.1), data=data,
        sample_rate=_BATCH / _N, noise_multiplier=_SIGMA, max_grad_norm=_C,
        max_physical_batch_size=_PHYSICAL, seed=0,
    )
    state = private.state
    for sigma in sigmas:
        state = _set_sigma(state, sigma)
        for logical in private.batches:
            state, _ = private.train_logical_step(state, logical)
    return engine


def _set_sigma(state: Any, sigma: float) -> Any:
    """Set the injected noise multiplier (what a noise schedule does in optax)."""
    dp_state = state.opt_state.dp_state
    old = dp_state.hyperparams["noise_multiplier"]
    hyper = dict(dp_state.hyperparams, noise_multiplier=jnp.asarray(sigma, old.dtype))
    return state._replace(opt_state=state.opt_state._replace(
        dp_state=dp_state._replace(hyperparams=hyper)))


def _epsilon(engine: Any) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GDPApproximationWarning)
        return float(engine.accountant.get_epsilon(DELTA))


def run_ledger_checks(dtype: str, accountants: tuple[str, ...] = ACCOUNTANTS,
                      case: Case = MLP) -> list[CheckResult]:
    """Run both engines on ``case`` for every accountant; compare ledgers and epsilons.

    Args:
        dtype: Model dtype (``"float32"`` or ``"float64"``).
        accountants: Registered accountant names.
        case: The model trained by both engines.

    Returns:
        For each accountant a ``ledger`` check (histories identical; the error is the
        largest difference of any recorded number) and an ``epsilon_<name>`` check.
    """
    unknown = [a for a in accountants if a not in available_accountants()]
    if unknown:
        raise ValueError(f"accountants {unknown} are not registered; see available_accountants().")
    out = []
    label = f"engines ({case.name})"
    with jax_precision(dtype):
        for name in accountants:
            torch_engine, sigmas = _torch_run(case, name, dtype)
            jax_engine = _jax_run(case, name, dtype, sigmas)
            out.append(_ledger_result(label, name, dtype, torch_engine.accountant.history,
                                      jax_engine.accountant.history))
            eps_t, eps_j = _epsilon(torch_engine), _epsilon(jax_engine)
            abs_err = abs(eps_j - eps_t)
            rel = abs_err / abs(eps_t) if eps_t else abs_err
            rtol = tolerances.rtol_for(f"epsilon_{name}", dtype)
            detail = "" if rel <= rtol else f"torch eps {eps_t!r} vs jax eps {eps_j!r}"
            out.append(CheckResult(label, f"epsilon_{name}", dtype, abs_err, rel, rtol,
                                   rel <= rtol, detail))
    return out


def _ledger_result(label: str, name: str, dtype: str, torch_history: list,
                   jax_history: list) -> CheckResult:
    a = np.asarray(torch_history, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(jax_history, dtype=np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        err = float("inf")
    else:
        err = float(np.max(np.abs(a - b), initial=0.0))
    ok = err == 0.0
    detail = "" if ok else f"torch ledger {torch_history} vs jax ledger {jax_history}"
    return CheckResult(label, f"ledger_{name}", dtype, err, err, tolerances.EXACT, ok, detail)
