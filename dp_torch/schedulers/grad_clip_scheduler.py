"""Schedulers for the clipping bound of a DP optimizer (like torch's LR schedulers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dp_torch.optimizers.perlayeroptimizer import DPPerLayerOptimizer
from dp_torch.schedulers.noise_scheduler import _EpochScheduler, _Exponential, _Lambda, _Step

__all__ = ["ExponentialGradClip", "LambdaGradClip", "StepGradClip", "_GradClipScheduler"]


class _GradClipScheduler(_EpochScheduler):
    """Base class: changes ``optimizer.max_grad_norm`` once per :meth:`step` (epoch).

    The noise std is ``noise_multiplier * max_grad_norm``, so the noise follows
    the bound and the privacy guarantee is unchanged. A
    :class:`~dp_torch.optimizers.DPPerLayerOptimizer` is refused: its
    ``max_grad_norm`` is derived from one bound per parameter, and scaling it
    alone would decouple the noise from the clipping. The constructor calls
    :meth:`step` once (``last_epoch`` becomes 0, the bound is left as it is).

    Args:
        optimizer: The DP optimizer.
        last_epoch: Index of the last epoch (``-1`` to start).
    """

    _attribute = "max_grad_norm"
    _kind = "GradClipSchedulers"
    _hint = "Wrap it in a dp_torch DPOptimizer."

    def _check_optimizer(self, optimizer: Any) -> None:
        if isinstance(optimizer, DPPerLayerOptimizer):
            raise ValueError(
                "GradClipSchedulers do not support per-layer clipping (DPPerLayerOptimizer): "
                "its max_grad_norm is sqrt(sum C_i**2) over one bound per parameter. Scale "
                "optimizer.max_grad_norms yourself, or use flat clipping."
            )

    def get_max_grad_norm(self) -> float:
        """The bound for epoch ``self.last_epoch``."""
        return self._scheduled()

    def _next_value(self) -> float:
        return self.get_max_grad_norm()


class ExponentialGradClip(_GradClipScheduler, _Exponential):
    """Multiply the bound by ``gamma`` every epoch: ``C_t = C_0 * gamma**t``."""


class LambdaGradClip(_GradClipScheduler, _Lambda):
    """Set the bound to ``base * scheduler_function(epoch)`` (factors do not accumulate).

    ``base`` is the optimizer's bound when the scheduler is created. The function
    is not part of :meth:`state_dict`; re-create the scheduler with it before
    loading.
    """

    _function_name = "scheduler_function"

    def __init__(
        self,
        optimizer: Any,
        *,
        scheduler_function: Callable[[int], float],
        last_epoch: int = -1,
    ) -> None:
        """Create the scheduler (it calls ``step()`` once).

        Args:
            optimizer: The DP optimizer.
            scheduler_function: Epoch -> multiplicative factor.
            last_epoch: Index of the last epoch.
        """
        self._set_function(optimizer, scheduler_function)
        super().__init__(optimizer, last_epoch=last_epoch)


class StepGradClip(_GradClipScheduler, _Step):
    """Multiply the bound by ``gamma`` every ``step_size`` epochs.

    ``C_t = C_0 * gamma ** (t // step_size)``.
    """
