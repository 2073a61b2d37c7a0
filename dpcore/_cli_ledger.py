"""Epsilon of a whole privacy ledger under each accountant, for ``dpcore epsilon``.

A ledger file is what :func:`dpcore.ledger.save_ledger` writes (for a
``dp_torch`` or ``dp_jax`` run: ``save_ledger(engine.accountant, "run.json")``);
the JSON of an accountant's ``state_dict()`` (``{"history": [...], "mechanism":
...}``) is read too. A command-line schedule is a ledger of one entry, so both
forms of ``dpcore epsilon`` print through the same functions.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from dpcore.accounting import Accountant
from dpcore.accounting.gdp import GDPApproximationWarning
from dpcore.ledger import Ledger

__all__ = [
    "accountant_epsilon", "format_table", "ledger_header", "read_ledger", "reaccount", "report",
]


def read_ledger(path: str | os.PathLike[str]) -> Ledger:
    """Read a ledger file, or the JSON of an accountant's ``state_dict()``.

    Raises:
        ValueError: If the file cannot be read or holds neither form; the
            message names ``--ledger`` and the path.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if isinstance(data, Mapping) and "format" not in data and "history" in data:
            return Ledger(entries=tuple(_entry(e) for e in data["history"]),
                          mechanism=data.get("mechanism"))
        return Ledger.from_dict(data)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"--ledger {os.fspath(path)!r} cannot be re-accounted: {err} (write it with "
            f"dpcore.ledger.save_ledger(accountant, path))"
        ) from None


def _entry(item: Any) -> Any:
    return tuple(item) if isinstance(item, list) else item


def accountant_epsilon(accountant: Accountant, delta: float) -> tuple[float, str]:
    """``(epsilon, note)`` of ``accountant``'s history at ``delta``; warnings become the note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if accountant.mechanism() == "rdp":
            eps, alpha = accountant.get_privacy_spent(delta=delta)
            note = f"best alpha {alpha:g}"
        else:
            eps, note = accountant.get_epsilon(delta), "upper bound"
    for item in caught:
        if issubclass(item.category, GDPApproximationWarning):
            note = "approximation; may under-report" + (
                " (certified under-report)" if "at least" in str(item.message) else ""
            )
        else:
            note = f"{note}; warning: {item.message}"
    return float(eps), note


def reaccount(ledger: Ledger, kinds: Sequence[str], delta: float) -> dict[str, dict[str, Any]]:
    """``{kind: {"epsilon": ..., "note": ...}}`` for the ledger under each accountant kind."""
    rows = {}
    for kind in kinds:
        eps, note = accountant_epsilon(ledger.to_accountant(kind), delta)
        rows[kind] = {"epsilon": eps, "note": note}
    return rows


def report(ledger: Ledger, rows: Mapping[str, Any], delta: float, source: str | None) -> dict:
    """The JSON document of ``dpcore epsilon --json``."""
    return {
        "ledger": source,
        "mechanism": ledger.mechanism,
        "entries": ledger.to_dict()["entries"],
        "total_steps": ledger.total_steps,
        "delta": delta,
        "epsilon": dict(rows),
    }


def format_table(header: str, rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The text table of ``dpcore epsilon``: a header, then one row per accountant."""
    lines = [header, f"{'accountant':<11}{'epsilon':>12}  note"]
    lines += [f"{kind:<11}{row['epsilon']:>12.6f}  {row['note']}" for kind, row in rows.items()]
    return "\n".join(lines)


def ledger_header(ledger: Ledger, source: str, delta: float) -> str:
    """Header lines naming the file, who recorded it, and its entries."""
    recorded = f" (recorded with {ledger.mechanism})" if ledger.mechanism else ""
    lines = [f"ledger {source}{recorded}: {len(ledger.entries)} entries, "
             f"{ledger.total_steps} steps, delta={delta:g}"]
    lines += [f"  noise_multiplier={nm!r} sample_rate={q!r} steps={n}"
              for nm, q, n in ledger.entries]
    return "\n".join(lines)
