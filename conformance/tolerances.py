"""Every tolerance of the conformance suite, derived from the dtype, with the reasoning.

How an error is measured. Each compared tensor (one parameter leaf, one vector of
norms, ...) is judged as a whole: its error is ``max|a - e| / max|e|``, the largest
absolute difference relative to the tensor's own magnitude (its infinity norm).
This is a relative tolerance with an absolute floor proportional to the tensor's
scale: a coordinate that is tiny because of cancellation (a gradient entry near
zero) is held to the accuracy of the tensor's large entries, which is what the
arithmetic can deliver, and not to an impossible elementwise relative accuracy.

Why these numbers. Both backends evaluate the same real-valued function with
different kernels (torch's hooks and einsums vs JAX's vmap of autodiff; NCHW vs
NHWC convolutions; different summation orders). Each result is a sum or product
chain of ``K`` rounded operations, so its forward error is about ``c * K * u``
relative to the magnitudes involved (worst case; ``sqrt(K) * u`` typically), with
``u`` the unit roundoff and ``c`` the condition of the computation. Our models are
small (reductions of at most a few hundred terms, depth <= 6 layers) and the inputs
are O(1), so ``K * c`` stays below about ``1e3`` to ``1e4``:

* float64, ``u = 1.1e-16``: ``1e4 * u ~ 1e-12``; we allow ``1e-10``, a further
  factor of 100 for the softmax / LSTM / attention Jacobians (conditions up to 1e2
  and more), and still 9 orders of magnitude below any real bug (a clip factor
  off by 1e-3, a wrong denominator, a transposed kernel all give errors >= 1e-4).
* float32, ``u = 6.0e-8``: ``K * c ~ 1e2`` gives ``6e-6``; we allow ``1e-5`` per
  single evaluation (``~170 u``), two orders of magnitude below the smallest
  injected discrepancy (1e-3).

Clip factors and everything after them inherit the norm's relative error (the map
``n -> C / (n + 1e-6)`` has condition 1), so they use the same tolerance. The noised
update adds the *same* float64 noise, rounded once to the dtype in both backends, so
it adds at most one rounding: same tolerance.

Trajectories. After ``T`` DP-SGD steps the parameter error is the sum of each step's
rounding error (``~ rtol`` of the update's scale), propagated through later steps
by the map ``theta -> theta - lr * g(theta)``, whose Lipschitz constant is
``1 + lr * L`` with the loss curvature ``L``; clipping bounds the update so
``lr * L`` is O(0.1) here. Linear growth is ``T * rtol``; the compounding factor
``(1 + lr L)**T`` stays small for ``T = 20`` because clipping bounds each update.
We use ``rtol_trajectory = steps * rtol`` (``2e-9`` and ``2e-4`` for 20 steps),
measured relative to the parameter scale; the measured errors are at the level of
a few ulp (``< 1e-15`` and ``< 1e-6``), far inside it.

Accounting is done in float64 by the shared :mod:`dpcore` code in both backends,
independent of the model dtype: epsilons must agree to ``1e-12`` relative (the same
float64 code on the same history can differ only by the summation order of the
backends' step lists, a few ulp; in practice they are bit-identical), ledgers and
batch indices exactly.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EPSILON_RTOL",
    "LEAF_FLOOR",
    "EXACT",
    "TRAJECTORY_STEPS",
    "rtol_for",
    "unit_roundoff",
]

#: Relative tolerance on epsilon (dtype-independent: accounting is float64 numpy).
EPSILON_RTOL = 1e-12
#: Ledgers and batch indices must be identical.
EXACT = 0.0
#: A tensor smaller than this fraction of the largest tensor of the same check is
#: measured against that fraction of the largest magnitude: its entries are the
#: result of cancellation (e.g. the key-projection bias of attention has an exactly
#: zero gradient, softmax being shift-invariant, so both backends return rounding
#: noise of size ``u * scale``). A real discrepancy (relative 1e-3 or more of every
#: tensor) is still caught.
LEAF_FLOOR = 0.1
#: Length of the end-to-end trajectory check.
TRAJECTORY_STEPS = 20

# Per-evaluation relative tolerances: ~1e6 u in float64, ~170 u in float32 (see above).
_BASE = {"float64": 1e-10, "float32": 1e-5}

#: Checks that are one evaluation of the model / clipping / noise pipeline.
_SINGLE_EVALUATION = (
    "per_example_grads",
    "per_example_norms",
    "clip_factors",
    "clipped_sum_flat",
    "clipped_sum_per_layer",
    "noised_update",
)


def unit_roundoff(dtype: str) -> float:
    """``u = eps / 2`` of a float dtype name (``"float32"`` or ``"float64"``)."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2.0


def _check_dtype(dtype: str) -> str:
    if dtype not in _BASE:
        raise ValueError(f'dtype must be "float32" or "float64", got {dtype!r}.')
    return dtype


def rtol_for(check: str, dtype: str, *, steps: int = TRAJECTORY_STEPS) -> float:
    """The normwise relative tolerance of one check in one dtype.

    Args:
        check: A check name (``"per_example_grads"``, ..., ``"trajectory"``,
            ``"batch_indices"``, ``"ledger"``, ``"epsilon_<accountant>"``).
        dtype: ``"float32"`` or ``"float64"``.
        steps: Trajectory length (only for ``"trajectory"``).

    Returns:
        The tolerance (``0.0`` for the exact checks).

    Raises:
        ValueError: For an unknown check or dtype.
    """
    base = _BASE[_check_dtype(dtype)]
    if check in _SINGLE_EVALUATION:
        return base
    if check == "trajectory":
        return base * steps
    if check in ("batch_indices", "ledger") or check.startswith("ledger_"):
        return EXACT
    if check.startswith("epsilon"):
        return EPSILON_RTOL
    raise ValueError(f"check {check!r} has no tolerance; add it to conformance/tolerances.py.")
