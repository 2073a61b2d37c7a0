"""Check results, the normwise error measure, and the markdown parity table."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from conformance.tolerances import LEAF_FLOOR

__all__ = ["CheckResult", "leaf_errors", "markdown_table", "result_from_leaves"]


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One cell of the parity table.

    Attributes:
        case: Case name.
        check: Check name (see :mod:`conformance.tolerances`).
        dtype: ``"float32"`` or ``"float64"``.
        max_abs: Largest absolute difference over every compared tensor.
        max_rel: Largest normwise relative difference ``max|a - e| / max|e|``.
        rtol: The tolerance applied to ``max_rel``.
        passed: Whether every compared tensor is within ``rtol``.
        detail: Where the first disagreement is (empty when it passed).
    """

    case: str
    check: str
    dtype: str
    max_abs: float
    max_rel: float
    rtol: float
    passed: bool
    detail: str = ""


def leaf_errors(actual: Any, expected: Any, *, floor: float = 0.0) -> tuple[float, float]:
    """``(max|a - e|, max|a - e| / max(max|e|, floor))`` of one tensor, in float64.

    Shapes must agree; a NaN anywhere gives infinite errors.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    diff = np.abs(a - e)
    if not np.all(np.isfinite(diff)):
        return float("inf"), float("inf")
    abs_err = float(diff.max())
    scale = max(float(np.abs(e).max()), floor)
    if abs_err == 0.0:
        return 0.0, 0.0
    return abs_err, abs_err / max(scale, np.finfo(np.float64).tiny)


def result_from_leaves(
    case: str, check: str, dtype: str, rtol: float,
    leaves: Sequence[tuple[str, Any, Any]],
) -> CheckResult:
    """Compare named ``(name, actual, expected)`` tensors; name the first one out of tolerance.

    A tensor much smaller than the largest of the check (a gradient that is zero in
    exact arithmetic, such as the key bias of attention) is measured against
    ``LEAF_FLOOR`` times that largest magnitude (see :mod:`conformance.tolerances`).
    """
    max_abs = max_rel = 0.0
    detail = ""
    scales = [float(np.max(np.abs(np.asarray(e, dtype=np.float64)), initial=0.0))
              for _, _, e in leaves]
    floor = LEAF_FLOOR * max(scales, default=0.0)
    for name, actual, expected in leaves:
        abs_err, rel_err = leaf_errors(actual, expected, floor=floor)
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
        if not rel_err <= rtol and not detail:
            shapes = f"{np.shape(actual)} vs {np.shape(expected)}"
            detail = f"{name}: rel err {rel_err:.2e} > {rtol:.0e} (shapes {shapes})"
    return CheckResult(case, check, dtype, max_abs, max_rel, rtol, not detail, detail)


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def markdown_table(results: Iterable[CheckResult], dtypes: Sequence[str]) -> str:
    """The parity table: one row per (case, check), error columns per dtype.

    Each dtype gets ``max abs`` / ``max rel`` columns and the row a pass mark; a
    failing row lists where it failed under the table.
    """
    results = list(results)
    rows: dict[tuple[str, str], dict[str, CheckResult]] = {}
    for r in results:
        rows.setdefault((r.case, r.check), {})[r.dtype] = r
    header = ["case", "check"]
    for d in dtypes:
        header += [f"{d} max abs", f"{d} max rel", f"{d} rtol"]
    header.append("status")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (case, check), by_dtype in rows.items():
        cells = [case, check]
        ok = True
        for d in dtypes:
            r = by_dtype.get(d)
            if r is None:
                cells += ["-", "-", "-"]
                continue
            cells += [_fmt(r.max_abs), _fmt(r.max_rel), _fmt(r.rtol)]
            ok = ok and r.passed
        cells.append("pass" if ok else "**FAIL**")
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in results if not r.passed]
    if failures:
        lines.append("")
        lines.append(f"{len(failures)} mismatch(es):")
        for r in failures:
            lines.append(f"- {r.case} / {r.check} / {r.dtype}: {r.detail}")
    else:
        lines.append("")
        lines.append(f"All {len(results)} checks pass.")
    return "\n".join(lines) + "\n"
