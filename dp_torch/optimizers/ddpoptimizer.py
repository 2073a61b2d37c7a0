"""``DistributedDPOptimizer``: DP-SGD data-parallel across ``torch.distributed`` ranks.

Each rank clips its own examples (as :class:`~dp_torch.optimizers.DPOptimizer`);
:meth:`DistributedDPOptimizer.add_noise` then adds the Gaussian noise on rank 0
only and all-reduces (sums) the ranks' clipped sums, so every rank holds
``sum over all ranks' examples of the clipped gradients + N(0, (sigma * C)**2)``,
with the noise in it exactly once. ``scale_grad`` divides by the *global*
expected batch size; the step hook (accountant) fires on every rank once per
logical step, after the all-reduce succeeded. See :mod:`dp_torch.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dp_torch.distributed import DistributedStepError, all_reduce_sum, require_process_group
from dp_torch.optimizers import _mixed_precision as mp
from dp_torch.optimizers.optimizer import (
    DPOptimizer,
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
    _wide_device,
)

__all__ = ["DistributedDPOptimizer"]


class DistributedDPOptimizer(DPOptimizer):
    """:class:`~dp_torch.optimizers.DPOptimizer` for data-parallel training (Opacus' name).

    One logical step on ``W`` ranks: every rank clips and sums its local examples
    (``p.summed_grad``, through ``BatchMemoryManager`` chunks if any); at the last
    chunk rank 0 adds ``N(0, (noise_multiplier * max_grad_norm)**2)`` to its sum,
    one all-reduce (sum) combines the ranks' sums into ``p.grad`` on every rank,
    ``"mean"`` divides by ``expected_batch_size``, the step hook fires, and the
    wrapped optimizer steps. The update equals the single-process
    ``DPOptimizer`` update on the union of the ranks' batches (same noise when
    rank 0's generator is the single process's), up to float summation order.

    Why rank 0 adds the noise: the noise must be in the sum exactly once, and in
    secure mode it comes from OS entropy, which ranks cannot share through a
    seed. Only rank 0's ``generator`` is used (the others' are never advanced).

    The sums, the noise and the all-reduce are float32 or wider whatever the
    model's dtype. Under a ``GradScaler`` the ranks agree on refusing a step
    whose scaled gradients overflowed on any of them (one extra all-reduce of a
    flag per step).

    Secure mode: rank 0's float64 noise is added to its float64 sum, the ranks'
    sums are all-reduced in **float64**, and the total is rounded to the
    parameter dtype once, as in the single-process hardened mechanism (twice the
    communication of a float32 all-reduce).

    Where this differs from Opacus 1.6 and why: ``docs/opacus_differences.md``.

    Arguments are those of :class:`~dp_torch.optimizers.DPOptimizer`, with the
    **global** ``expected_batch_size`` ``int(N * q)``; ``generator`` is used on
    rank 0 only.

    Attributes:
        rank: This process's rank.
        world_size: Number of ranks.
    """

    def _check_environment(self) -> None:
        """Refuse to start without a process group; record :attr:`rank` and :attr:`world_size`.

        Raises:
            RuntimeError: If no process group is initialised.
        """
        require_process_group(type(self).__name__)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _local_contribution(self, p: torch.Tensor, std: float) -> torch.Tensor:
        """This rank's share of the global sum: ``p.summed_grad`` (+ the noise on rank 0)."""
        summed = p.summed_grad
        if self.secure_mode:
            wide = summed.to(device=_wide_device(summed.device), dtype=torch.float64)
            if self.rank == 0:
                wide = wide + _generate_noise(std, summed, self.generator, True).to(wide.device)
            return wide
        if self.rank == 0:
            noise = _generate_noise(std, summed, self.generator, False)
            return summed + noise.to(device=summed.device, dtype=summed.dtype)
        return summed

    def add_noise(self) -> None:
        """Noise on rank 0, then one all-reduce (sum) of all ranks' sums into ``p.grad``.

        Raises:
            ValueError: If ``p.summed_grad`` is missing or was already used by a
                step (``zero_grad()`` not called); nothing is changed then.
            DistributedStepError: If the all-reduce fails (a peer crashed or timed
                out); ``p.grad`` is then cleared on this rank and nothing else
                changes, so no partial update can be applied.
        """
        params = self.params
        for p in params:
            summed = getattr(p, "summed_grad", None)
            if summed is None:
                raise ValueError(
                    "p.summed_grad is not set; call clip_and_accumulate() before add_noise()."
                )
            _check_processed_flag(summed)
        std = self._noise_std()
        contributions = [self._local_contribution(p, std) for p in params]
        try:
            totals = all_reduce_sum(contributions)
        except DistributedStepError:
            for p in params:
                p.grad = None
                _mark_as_processed(p.summed_grad)
            raise
        for p, total in zip(params, totals):
            mp.set_grad(p, total.to(device=p.device, dtype=mp.accumulation_dtype(p)))
            _mark_as_processed(p.summed_grad)

    def _overflow_on_any_rank(self, overflow: bool) -> bool:
        """Whether a GradScaler overflow happened on any rank (all-reduce of the flags)."""
        device = self.params[0].device if self.params else torch.device("cpu")
        flag = torch.tensor([1.0 if overflow else 0.0], device=device)
        return bool(all_reduce_sum([flag])[0].item() > 0)
