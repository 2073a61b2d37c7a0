"""Schedulers for the noise multiplier of a DP optimizer (like torch's LR schedulers)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

__all__ = ["ExponentialNoise", "LambdaNoise", "StepNoise", "_NoiseScheduler"]


def _check_positive_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_last_epoch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < -1:
        raise ValueError(f"last_epoch must be an integer >= -1, got {value!r}.")
    return int(value)


def _state_without(obj: object, *excluded: str) -> dict[str, Any]:
    return {k: v for k, v in obj.__dict__.items() if k not in excluded}


class _EpochScheduler:
    """Shared base: sets one optimizer attribute once per :meth:`step` (epoch).

    Subclasses name the attribute (``_attribute``), say what they are in errors
    (``_kind``, ``_hint``) and compute the next value in :meth:`_next_value`. As
    with torch LR schedulers the constructor calls :meth:`step` once
    (``last_epoch`` becomes 0 and the value is left as it is).
    """

    _attribute: str = ""
    _kind: str = ""
    _hint: str = ""

    def __init__(self, optimizer: Any, *, last_epoch: int = -1) -> None:
        if not hasattr(optimizer, self._attribute):
            raise ValueError(
                f"{self._kind} require your optimizer to have a .{self._attribute} attr; got "
                f"{type(optimizer).__name__}. {self._hint}"
            )
        self._check_optimizer(optimizer)
        self.optimizer = optimizer
        self.last_epoch = _check_last_epoch(last_epoch)
        self.step()

    def _check_optimizer(self, optimizer: Any) -> None:
        """Refuse optimizers the schedule cannot serve (none by default)."""

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer (and, for lambdas, the function)."""
        return _state_without(self, "optimizer")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore attributes from :meth:`state_dict`.

        Args:
            state_dict: A dict returned by :meth:`state_dict`.
        """
        self.__dict__.update(state_dict)

    def _next_value(self) -> float:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set the scheduled optimizer attribute."""
        self.last_epoch += 1
        setattr(self.optimizer, self._attribute, self._next_value())


    def _scheduled(self) -> float:
        """The value for epoch ``self.last_epoch`` under the schedule (given by a subclass)."""
        raise NotImplementedError


class _Exponential(_EpochScheduler):
    """Schedule: the previous value times ``gamma`` every epoch (unchanged at epoch 0)."""

    def __init__(self, optimizer: Any, *, gamma: float, last_epoch: int = -1) -> None:
        """Create the scheduler (it calls ``step()`` once).

        Args:
            optimizer: The DP optimizer.
            gamma: Multiplicative factor per epoch (``> 0``).
            last_epoch: Index of the last epoch.
        """
        self.gamma = _check_positive_real(gamma, "gamma")
        super().__init__(optimizer, last_epoch=last_epoch)

    def _scheduled(self) -> float:
        current = getattr(self.optimizer, self._attribute)
        return current if self.last_epoch == 0 else current * self.gamma


class _Step(_EpochScheduler):
    """Schedule: the previous value, times ``gamma`` at positive multiples of ``step_size``."""

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

    def _scheduled(self) -> float:
        current = getattr(self.optimizer, self._attribute)
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return current
        return self.gamma * current


class _Lambda(_EpochScheduler):
    """Schedule: ``base * function(epoch)``, ``base`` the value when the scheduler is created.

    The function is kept under the attribute ``_function_name`` (Opacus' argument
    name) and left out of :meth:`state_dict` (a lambda cannot be pickled).
    """

    _function_name: str = ""

    def _set_function(self, optimizer: Any, function: Callable[[int], float]) -> None:
        """Keep ``function`` and the optimizer's current value as ``base_<attribute>``."""
        if not callable(function):
            raise TypeError(
                f"{self._function_name} must be callable (epoch -> factor), got {function!r}."
            )
        setattr(self, self._function_name, function)
        setattr(self, f"base_{self._attribute}", getattr(optimizer, self._attribute, None))

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer and the function."""
        return _state_without(self, "optimizer", self._function_name)

    def _scheduled(self) -> float:
        base = getattr(self, f"base_{self._attribute}")
        return base * getattr(self, self._function_name)(self.last_epoch)


class _NoiseScheduler(_EpochScheduler):
    """Base class: changes ``optimizer.noise_multiplier`` once per :meth:`step` (epoch).

    Works with any optimizer that has a ``noise_multiplier`` attribute (every
    ``DPOptimizer``). The accountant reads the multiplier at each optimizer step,
    so a schedule is accounted exactly. As with torch LR schedulers the
    constructor calls :meth:`step` once (``last_epoch`` becomes 0 and the
    multiplier is left as it is).

    Args:
        optimizer: The DP optimizer.
        last_epoch: Index of the last epoch (``-1`` to start).
    """

    _attribute = "noise_multiplier"
    _kind = "NoiseSchedulers"
    _hint = "Wrap it in a dp_torch DPOptimizer (make_private does this for you)."

    def get_noise_multiplier(self) -> float:
        """The multiplier for epoch ``self.last_epoch``."""
        return self._scheduled()

    def _next_value(self) -> float:
        return self.get_noise_multiplier()


class ExponentialNoise(_NoiseScheduler, _Exponential):
    """Multiply the noise multiplier by ``gamma`` every epoch: ``sigma_t = sigma_0 * gamma**t``."""


class LambdaNoise(_NoiseScheduler, _Lambda):
    """Set the multiplier to ``base * noise_lambda(epoch)`` (factors do not accumulate).

    ``base`` is the optimizer's multiplier when the scheduler is created. The
    function is not part of :meth:`state_dict` (like torch's ``LambdaLR``, a
    lambda cannot be pickled); re-create the scheduler with it before loading.
    """

    _function_name = "noise_lambda"

    def __init__(
        self,
        optimizer: Any,
        *,
        noise_lambda: Callable[[int], float],
        last_epoch: int = -1,
    ) -> None:
        """Create the scheduler (it calls ``step()`` once).

        Args:
            optimizer: The DP optimizer.
            noise_lambda: Epoch -> multiplicative factor.
            last_epoch: Index of the last epoch.
        """
        self._set_function(optimizer, noise_lambda)
        super().__init__(optimizer, last_epoch=last_epoch)


class StepNoise(_NoiseScheduler, _Step):
    """Multiply the multiplier by ``gamma`` every ``step_size`` epochs.

    ``sigma_t = sigma_0 * gamma ** (t // step_size)``.
    """
