"""``DPOptimizerFastGradientClipping``: the optimizer for ghost clipping.

In ghost (fast gradient) clipping the loss's backward pass already
leaves the *clipped sum* over the batch's examples in ``p.grad``; this optimizer
only accumulates it, adds the noise once per logical step, scales and steps.
"""

from __future__ import annotations

import torch

from dp_torch.optimizers import _mixed_precision as mp
from dp_torch.optimizers.optimizer import DPOptimizer, LossScaleError, _check_processed_flag
from dp_torch.utils.fast_gradient_clipping_utils import GHOST_LOSS_SCALE

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
    the parameters' dtype. With a ``torch.amp.GradScaler``, pass it to the loss's
    backward (``loss.backward(scaler=scaler)``, see
    :meth:`~dp_torch.utils.fast_gradient_clipping_utils.DPTensorFastGradientClipping.backward`):
    the pass divides the scale out of the per-example norms, and ``scaler.step(optimizer)``
    divides it out of ``p.grad``. A step whose scale differs from the one the backward
    pass used (or a scaler step after a backward pass without the scaler, and the
    reverse) is refused (:class:`~dp_torch.optimizers.LossScaleError`), as is one whose
    scaled gradients overflowed; nothing is changed then.
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
            LossScaleError: If the loss scale of this step differs from the one the
                backward pass ran at, or the scaled gradients overflowed; nothing is
                changed then.
        """
        self._accumulate(share_grad=False)

    def _accumulate(self, share_grad: bool) -> None:
        """:meth:`accumulate`; with ``share_grad`` a first contribution may be ``p.grad`` itself."""
        inverse = self._checked_inverse_scale()
        params = self.params
        for p in params:
            _check_processed_flag(getattr(p, "summed_grad", None))
        for p in params:
            summed = getattr(p, "summed_grad", None)
            contribution = self._contribution(p, inverse, shared=share_grad and summed is None)
            p.summed_grad = contribution if summed is None else summed + contribution

    @staticmethod
    def _contribution(p: torch.Tensor, inverse: float, shared: bool) -> torch.Tensor:
        """``p.grad / S`` in the accumulation dtype (zeros without a ``p.grad``).

        With ``shared`` an unscaled ``p.grad`` of that dtype is returned itself rather than
        copied; only for a step that adds the noise next, which gives ``p`` a new ``p.grad``.
        """
        grad, dtype = p.grad, mp.accumulation_dtype(p)
        if grad is None:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if shared and inverse == 1.0 and grad.dtype == dtype:
            return grad.detach()
        return grad.detach().to(dtype, copy=True).mul_(inverse)

    def _checked_inverse_scale(self) -> float:
        """``1 / S`` of this step's loss scale (1 without a scaler), once it is known to be the
        scale the ghost backward pass ran at and nothing overflowed."""
        used = getattr(self, GHOST_LOSS_SCALE, None)
        scale = self._loss_scale
        stepped = None if scale is None else 1.0 / scale.inverse
        if used != stepped:
            raise LossScaleError(mp.ghost_message(used, stepped))
        if scale is not None and scale.found_inf:
            raise LossScaleError(mp.overflow_message(scale))
        return 1.0 if scale is None else scale.inverse

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
        """The first phase of ``pre_step``: ``p.grad`` is already clipped, so only accumulate.

        When this step adds the noise (it is not signalled as skipped), ``p.summed_grad`` may
        take ``p.grad`` itself instead of a copy: the noise phase replaces ``p.grad`` next.
        """
        self._accumulate(share_grad=not self._check_skip_next_step(pop_next=False))
