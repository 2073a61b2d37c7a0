"""The cost rule of mixed ghost clipping: Gram form or materialised per-example gradient (internal).

A layer whose per-example weight gradient is a sum over ``T`` positions of outer products
``g_t a_t^T`` (``a_t`` of size ``D``, ``g_t`` of size ``O``) has two ways to its norm:

* the *Gram form* ``||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)``: two ``T x T``
  Gram matrices per example, ``T^2 (D + O)`` multiply-adds, ``2 T^2`` numbers;
* the *materialised* gradient: ``T D O`` multiply-adds, ``D O`` numbers per example.

Neither wins everywhere (long sequences favour materialising, wide layers the Gram form),
so, as in mixed ghost clipping (Bu et al. 2023), each call takes the cheaper one. Cheaper
means the smaller product ``flops x memory``: the geometric mean of the two ratios, so a
route that is much lighter in memory may cost somewhat more arithmetic and vice versa, and
on a lopsided shape both measures agree anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["GRAM", "PER_EXAMPLE", "RouteCost", "choose_route", "outer_product_costs"]

GRAM = "gram"
PER_EXAMPLE = "per_example"

#: ``None`` picks per call by :func:`choose_route`; :data:`GRAM` or :data:`PER_EXAMPLE` force
#: one route in every norm sampler that uses this rule (tests use it to cover both).
FORCE_ROUTE: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RouteCost:
    """Estimated cost of one route for a whole batch.

    Attributes:
        flops: Multiply-adds (or element copies) it performs.
        memory: Numbers it holds in temporaries at its peak.
    """

    flops: float
    memory: float


def outer_product_costs(batch: int, steps: int, d_in: int, d_out: int) -> tuple[RouteCost, RouteCost]:
    """``(gram, per_example)`` costs for ``batch`` sums of ``steps`` outer products ``d_out x d_in``."""
    gram = RouteCost(flops=batch * steps * steps * (d_in + d_out), memory=2 * batch * steps * steps)
    per_example = RouteCost(flops=batch * steps * d_in * d_out, memory=batch * d_in * d_out)
    return gram, per_example


def choose_route(gram: RouteCost, per_example: RouteCost) -> str:
    """:data:`GRAM` or :data:`PER_EXAMPLE`: the route with the smaller ``flops x memory``.

    Args:
        gram: Cost of the Gram form.
        per_example: Cost of materialising the per-example gradients.

    Returns:
        The chosen route (:data:`FORCE_ROUTE` when that is set); a tie goes to the Gram form.
    """
    if FORCE_ROUTE is not None:
        return FORCE_ROUTE
    return GRAM if gram.flops * gram.memory <= per_example.flops * per_example.memory else PER_EXAMPLE
