"""Schedulers for the clipping bound of a DP optimizer (like torch's LR schedulers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dp_torch.optimizers.perlayeroptimizer import DPPerLayerOptimizer
from dp_torch.schedulers.noise_scheduler import (
    _check_positive_int,
    _check_positive_real,
    _EpochScheduler,
    _state_without,
)

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
        """The bound for epoch ``self.last_epoch`` (implemented by subclasses)."""
        raise NotImplementedError

    def _next_value(self) -> float:
        return self.get_max_grad_norm()


class ExponentialGradClip(_GradClipScheduler):
    """Multiply the bound by ``gamma`` every epoch: ``C_t = C_0 * gamma**t``."""

    def __init__(self, optimizer: Any, *, gamma: float, last_epoch: int = -1) -> None:
        """Create the scheduler (it calls ``step()`` once).

        Args:
            optimizer: The DP optimizer.
            gamma: Multiplicative factor per epoch (``> 0``).
            last_epoch: Index of the last epoch.
        """
        self.gamma = _check_positive_real(gamma, "gamma")
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        """Previous bound times ``gamma`` (unchanged at epoch 0)."""
        if self.last_epoch == 0:
            return self.optimizer.max_grad_norm
        return self.optimizer.max_grad_norm * self.gamma


class LambdaGradClip(_GradClipScheduler):
    """Set the bound to ``base * scheduler_function(epoch)`` (factors do not accumulate).

    ``base`` is the optimizer's bound when the scheduler is created. The function
    is not part of :meth:`state_dict`; re-create the scheduler with it before
    loading.
    """

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
        if not callable(scheduler_function):
            raise TypeError(
                "scheduler_function must be callable (epoch -> factor), got "
                f"{scheduler_function!r}."
            )
        self.scheduler_function = scheduler_function
        self.base_max_grad_norm = getattr(optimizer, "max_grad_norm", None)
        super().__init__(optimizer, last_epoch=last_epoch)

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer and ``scheduler_function``."""
        return _state_without(self, "optimizer", "scheduler_function")

    def get_max_grad_norm(self) -> float:
        """``base_max_grad_norm * scheduler_function(last_epoch)``."""
        return self.base_max_grad_norm * self.scheduler_function(self.last_epoch)


class StepGradClip(_GradClipScheduler):
    """Multiply the bound by ``gamma`` every ``step_size`` epochs.

    ``C_t = C_0 * gamma ** (t // step_size)``.
    """

    def __init__(
        self, optimizer: Any, *, step_size: int, gamma: float, last_epoch: int = -1
    ) -> None:
        """Create the scheduler (it calls ``step()`` once).

        Args:
            optimizer: The DP optimizer.
            step_size: Period in epochs (``>= 1``).
            gamma: Multiplicative factor (``> 0``).
            last_epoch: Index of the last epoch.
        """
        self.step_size = _check_positive_int(step_size, "step_size")
        self.gamma = _check_positive_real(gamma, "gamma")
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        """Previous bound, times ``gamma`` at positive multiples of ``step_size``."""
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self.optimizer.max_grad_norm
        return self.gamma * self.optimizer.max_grad_norm
