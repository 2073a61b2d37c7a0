"""``DPOptimizerFastGradientClipping``: the optimizer for ghost clipping.

In ghost (fast gradient) clipping the model's double backward pass already
leaves the *clipped sum* over the batch's examples in ``p.grad``; this optimizer
only accumulates it, adds the noise once per logical step, scales and steps.
"""

from __future__ import annotations

import torch

from dp_torch.optimizers import _mixed_precision as mp
from dp_torch.optimizers.optimizer import DPOptimizer, LossScaleError, _check_processed_flag

__all__ = ["DPOptimizerFastGradientClipping"]


class DPOptimizerFastGradientClipping(DPOptimizer):
    """:class:`~dp_torch.optimizers.DPOptimizer` for ghost clipping (``grad_sample_mode="ghost"``).

    Expects ``p.grad`` to hold the sum over the batch's examples of the gradients
    clipped to ``max_grad_norm`` (as the ghost-clipping module computes it). A
    step adds ``p.grad`` to ``p.summed_grad`` (:meth:`accumulate`); unless the
    step is signalled as skipped it then adds ``N(0, (sigma * C)**2)`` once,
    divides by ``expected_batch_size`` for ``"mean"``, calls the step hook and the
    wrapped optimizer. A parameter whose ``p.grad`` is ``None`` (nothing sampled)
    contributes zero; the step, noise and hook still happen.

    ``clip_and_accumulate`` does nothing (clipping happened in the backward pass)
    and ``accumulated_iterations`` is always 1, as in Opacus. Arguments are those
    of :class:`~dp_torch.optimizers.DPOptimizer`; ``max_grad_norm`` is the bound
    the backward pass clipped to, and here it only scales the noise.

    Mixed precision: ``p.summed_grad`` and the noise are float32 or wider whatever
    the parameters' dtype. A ``torch.amp.GradScaler`` is refused
    (:class:`~dp_torch.optimizers.LossScaleError` at ``scaler.step``): the backward
    pass clips before the loss scale could be divided out; use bfloat16 autocast,
    which needs no loss scale.
    """

    @property
    def accumulated_iterations(self) -> int:
        """Always 1: ``p.grad`` already sums every backward pass since ``zero_grad``."""
        return 1

    def _get_flat_grad_sample(self, p: torch.Tensor) -> None:
        """Ghost clipping keeps no per-sample gradients: returns ``None``."""
        return None

    @property
    def grad_samples(self) -> list[None]:
        """``None`` for every parameter (no per-sample gradients in ghost mode)."""
        return [None for _ in self.params]

    def clip_and_accumulate(self) -> None:
        """Does nothing: ``p.grad`` is already clipped and summed (see :meth:`accumulate`)."""

    def accumulate(self) -> None:
        """Add ``p.grad`` (the clipped sum of this backward pass) to ``p.summed_grad``.

        Raises:
            ValueError: If ``p.summed_grad`` was already used by a noise-adding step
                (``zero_grad()`` was not called); nothing is changed then.
            LossScaleError: In a ``GradScaler`` step; nothing is changed then.
        """
        if self._loss_scale is not None:
            raise LossScaleError(mp.ghost_message())
        params = self.params
        for p in params:
            _check_processed_flag(getattr(p, "summed_grad", None))
        for p in params:
            grad, dtype = p.grad, mp.accumulation_dtype(p)
            contribution = (
                torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                if grad is None
                else grad.detach().to(dtype, copy=True)
            )
            summed = getattr(p, "summed_grad", None)
            p.summed_grad = contribution if summed is None else summed + contribution

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear ``p.grad`` and (unless the last step was skipped) ``p.summed_grad``.

        Args:
            set_to_none: Set ``p.grad`` to ``None`` instead of zeroing it.
        """
        for p in self.params:
            mp.drop_wide_grad(p)
            if not self._is_last_step_skipped:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)

    def _accumulate_batch(self) -> None:
        """The first phase of ``pre_step``: ``p.grad`` is already clipped, so only accumulate."""
        self.accumulate()
