"""Checks shared by the tests of the runnable digits examples."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest

__all__ = ["BAD_ARGUMENTS", "check_refused", "check_result_line"]

#: Command lines every digits example refuses (one bad option each, named first).
BAD_ARGUMENTS = [["--epsilon", "-1"], ["--epochs", "0"], ["--batch-size", "5000"], ["--lr", "0"]]


def check_result_line(out: str, label: str, result: dict[str, Any], epochs: int) -> None:
    """The last printed line is ``label``'s result line and agrees with the returned figures.

    Args:
        out: The captured stdout.
        label: The line's label, e.g. ``"dp_torch digits"``.
        result: What ``main`` returned.
        epochs: The epochs the run should report.
    """
    last = out.strip().splitlines()[-1]
    pattern = (rf"^{re.escape(label)}: test accuracy (\d\.\d{{3}}) at epsilon "
               r"(\d+\.\d{2}) \(delta 1e-05\)$")
    match = re.match(pattern, last)
    assert match, f"unexpected last line: {last!r}"
    assert 0.0 <= result["accuracy"] <= 1.0
    assert math.isfinite(result["epsilon"]) and 0.0 < result["epsilon"] <= 3.0
    assert float(match.group(1)) == pytest.approx(result["accuracy"], abs=5e-4)
    assert float(match.group(2)) == pytest.approx(result["epsilon"], abs=5e-3)
    assert result["epochs"] == epochs


def check_refused(main: Callable[[Sequence[str]], Any], argv: list[str], err: Callable[[], str]) -> None:
    """``main(argv)`` exits with a message on stderr that names the bad option ``argv[0]``."""
    with pytest.raises(SystemExit):
        main(argv)
    assert argv[0] in err()
