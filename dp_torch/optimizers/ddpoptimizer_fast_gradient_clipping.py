"""Ghost (fast gradient) clipping for data-parallel training (Opacus' module of the same name)."""

from __future__ import annotations

from dp_torch.optimizers.ddpoptimizer import DistributedDPOptimizer
from dp_torch.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

__all__ = ["DistributedDPOptimizerFastGradientClipping"]


class DistributedDPOptimizerFastGradientClipping(
    DPOptimizerFastGradientClipping, DistributedDPOptimizer
):
    """Ghost clipping under DDP: local clipped sums, noise once on rank 0, one all-reduce.

    On each rank the ghost-clipping backward pass leaves the clipped sum of the
    rank's examples in ``p.grad``; :meth:`accumulate` folds it into
    ``p.summed_grad`` (over ``BatchMemoryManager`` chunks too), and at the end of
    the logical step :meth:`~dp_torch.optimizers.DistributedDPOptimizer.add_noise`
    adds the noise on rank 0 and all-reduces the sums. Arguments are those of
    :class:`~dp_torch.optimizers.DPOptimizerFastGradientClipping`, with the global
    ``expected_batch_size``.

    With a plain ``DistributedDataParallel`` model, ``make_private`` replaces DDP's
    gradient all-reduce by a local no-op hook, so the per-rank clipped sums are not
    averaged by DDP on top of the optimizer's all-reduce, and the first (norm) pass
    never communicates anything.
    """
