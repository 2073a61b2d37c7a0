"""conformance: proof that dp_torch and dp_jax compute the same DP-SGD.

Paired torch / flax cases (MLP, CNN, embedding + LSTM, transformer block,
embedding bag), checked in float64 and float32 for per-example gradients, norms,
clip factors, clipped sums (flat and per-layer), the noised update with a shared
``dpcore`` noise source, Poisson batch indices, the engines' ledgers and epsilon
for every accountant, and a 20-step DP-SGD trajectory. ``python -m conformance``
prints the parity table; :func:`compare` checks a user's own model pair.
"""

from conformance._cases import CASES
from conformance._cases import Case
from conformance._cases import ParamMap
from conformance._cases import get_case
from conformance._checks import Settings
from conformance._checks import run_case
from conformance._engines import run_ledger_checks
from conformance._report import CheckResult
from conformance._runner import Report
from conformance._runner import run_conformance
from conformance.compare import CompareReport
from conformance.compare import compare

__all__ = [
    "CASES",
    "Case",
    "CheckResult",
    "CompareReport",
    "ParamMap",
    "Report",
    "Settings",
    "compare",
    "get_case",
    "run_case",
    "run_conformance",
    "run_ledger_checks",
]
