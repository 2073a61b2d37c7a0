"""The one tolerance helper of the test suite: compare nested structures of numbers.

Works on scalars, numpy arrays (and anything ``np.asarray`` accepts, such as
framework tensors moved to host), and nested dicts, lists and tuples of them.
A failure names the path of the first leaf that disagrees and its largest
absolute and relative error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["assert_close", "rel_err"]


def rel_err(actual: Any, expected: Any) -> float:
    """Largest relative error ``|a - e| / max(|e|, tiny)`` over all elements."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    denom = np.maximum(np.abs(e), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(a - e) / denom)) if a.size else 0.0


def _leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key], f"{path}/{key}")]
    if isinstance(tree, (list, tuple)):
        return [leaf for i, sub in enumerate(tree) for leaf in _leaves(sub, f"{path}[{i}]")]
    return [(path or "<root>", tree)]


def assert_close(actual: Any, expected: Any, *, rtol: float, atol: float = 0.0) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` leaf by leaf.

    Args:
        actual: The value under test (nested structure of numbers or arrays).
        expected: The oracle, with the same structure.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
    """
    got, want = _leaves(actual), _leaves(expected)
    assert [p for p, _ in got] == [p for p, _ in want], (
        f"structures differ: {[p for p, _ in got]} vs {[p for p, _ in want]}"
    )
    for (path, a), (_, e) in zip(got, want):
        a_arr = np.asarray(a, dtype=np.float64)
        e_arr = np.asarray(e, dtype=np.float64)
        assert a_arr.shape == e_arr.shape, f"{path}: shape {a_arr.shape} != {e_arr.shape}"
        both_inf = np.isinf(a_arr) & np.isinf(e_arr) & (np.sign(a_arr) == np.sign(e_arr))
        diff = np.where(both_inf, 0.0, np.abs(a_arr - e_arr))
        bad = ~(diff <= atol + rtol * np.abs(np.where(both_inf, 0.0, e_arr)))
        if np.any(bad):
            raise AssertionError(
                f"{path}: {int(bad.sum())} of {a_arr.size} elements differ; "
                f"max abs err {float(np.nanmax(diff)):.3e}, max rel err {rel_err(a_arr, e_arr):.3e} "
                f"(rtol={rtol}, atol={atol}); first actual={a_arr.ravel()[bad.ravel()][0]!r}, "
                f"expected={e_arr.ravel()[bad.ravel()][0]!r}"
            )
