"""Per-layer clipping for data-parallel training (Opacus' ``ddp_perlayeroptimizer``).

:class:`SimpleDistributedPerLayerOptimizer` clips each parameter of each example
to its own bound ``C_i`` on the rank that holds the example
(:class:`~dp_torch.optimizers.DPPerLayerOptimizer`), then adds the noise
``N(0, (sigma * sqrt(sum_i C_i**2))**2)`` once, on rank 0, and all-reduces the
ranks' sums (:class:`~dp_torch.optimizers.DistributedDPOptimizer`).
"""

from __future__ import annotations

from dp_torch.optimizers.ddpoptimizer import DistributedDPOptimizer
from dp_torch.optimizers.perlayeroptimizer import DPPerLayerOptimizer

__all__ = ["DistributedPerLayerOptimizer", "SimpleDistributedPerLayerOptimizer"]


class SimpleDistributedPerLayerOptimizer(DPPerLayerOptimizer, DistributedDPOptimizer):
    """Per-layer clipping on each rank, noise once on rank 0, one all-reduce per logical step.

    Arguments are those of :class:`~dp_torch.optimizers.DPPerLayerOptimizer`
    (``max_grad_norm`` is the list of per-parameter bounds) with the global
    ``expected_batch_size`` of :class:`~dp_torch.optimizers.DistributedDPOptimizer`.
    The update equals the single-process ``DPPerLayerOptimizer`` update on the
    union of the ranks' batches.
    """


class DistributedPerLayerOptimizer(SimpleDistributedPerLayerOptimizer):
    """Opacus' name for per-layer clipping under DDP; same update as the simple variant.

    Opacus' ``DistributedPerLayerOptimizer`` clips and noises each parameter inside
    its backward hook to overlap the work with the backward pass, and it is not
    usable through ``make_private``. Here it computes exactly the update of
    :class:`SimpleDistributedPerLayerOptimizer` (clipping, noise and the single
    all-reduce all happen at ``step()``), so the two names are interchangeable.
    """
