"""Run every check and build the parity report."""

from __future__ import annotations

import time
from collections.abc import Sequence

from conformance._cases import CASES, get_case
from conformance._checks import Settings, run_case
from conformance._engines import ACCOUNTANTS, run_ledger_checks
from conformance._report import CheckResult, markdown_table

__all__ = ["DTYPES", "Report", "run_conformance"]

DTYPES = ("float64", "float32")


class Report:
    """The results of a conformance run.

    Attributes:
        results: Every :class:`~conformance._report.CheckResult`.
        dtypes: The dtypes run.
        seconds: Wall time of the run.
    """

    def __init__(self, results: list[CheckResult], dtypes: Sequence[str], seconds: float):
        self.results = results
        self.dtypes = tuple(dtypes)
        self.seconds = seconds

    @property
    def passed(self) -> bool:
        """Whether every check is within tolerance."""
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        """The checks out of tolerance."""
        return [r for r in self.results if not r.passed]

    def markdown(self) -> str:
        """The parity table as markdown."""
        return markdown_table(self.results, self.dtypes)

    def summary(self) -> str:
        """One line: how many checks passed, and the first failure."""
        n, bad = len(self.results), self.failures
        if not bad:
            return f"conformance: all {n} checks pass ({self.seconds:.0f} s)"
        first = bad[0]
        return (f"conformance: {len(bad)} of {n} checks FAIL; first: {first.case} / "
                f"{first.check} / {first.dtype}: {first.detail}")


def run_conformance(
    cases: Sequence[str] | None = None,
    dtypes: Sequence[str] = DTYPES,
    *,
    trajectory: bool = True,
    ledger: bool = True,
    accountants: Sequence[str] = ACCOUNTANTS,
    settings: Settings | None = None,
) -> Report:
    """Run the conformance checks.

    Args:
        cases: Case names (default: all of :data:`conformance.CASES`).
        dtypes: ``"float64"`` and/or ``"float32"``.
        trajectory: Include the end-to-end trajectories.
        ledger: Include the engine ledger / epsilon checks.
        accountants: Accountants of the ledger checks.
        settings: Sizes and hyperparameters.

    Returns:
        A :class:`Report`.

    Raises:
        ValueError: For an unknown case or dtype.
    """
    selected = list(CASES) if cases is None else [get_case(c) for c in cases]
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtypes must be drawn from {DTYPES}, got {d!r}.")
    start = time.perf_counter()
    results: list[CheckResult] = []
    for case in selected:
        for dtype in dtypes:
            results += run_case(case, dtype, settings, trajectory=trajectory)
    if ledger:
        for dtype in dtypes:
            results += run_ledger_checks(dtype, tuple(accountants))
    return Report(results, dtypes, time.perf_counter() - start)
