"""Mixed precision in the DP optimizers: float32 accumulation and ``torch.amp.GradScaler``.

Whatever the model's dtype, per-example norms, clip factors, clipped sums, noise and
accumulators are float32 (or float64 for a float64 model). A bfloat16 or float16
parameter gets its gradient rounded to its dtype once, when it is written to ``p.grad``.

A ``GradScaler`` multiplies the loss by a scale ``S`` before the backward pass, so every
per-example gradient arrives multiplied by ``S``. ``GradScaler.step`` hands a DP
optimizer ``S`` and the result of its own inf/NaN check (as the attributes
``grad_scale`` and ``found_inf``, because the optimizer declares
``_step_supports_amp_scaling``) instead of unscaling ``p.grad``, which a DP step does not
read. The optimizer divides ``S`` out of the per-example norms and the clipped sum, so
the loss scale changes neither which examples are clipped nor the noise.

A step whose scaled gradients overflowed is refused (:class:`LossScaleError`), never
skipped: whether a step is skipped would depend on the batch without noise (an example
whose scaled gradient overflows would be seen in the update's absence), and the
scaler's reaction to it (a smaller scale) would carry that dependence into later steps.
Without overflows the scale only grows every ``growth_interval`` steps, which does not
depend on the data.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from dp_torch.grad_sample._clipped_sum import compute_dtype

__all__ = ["LossScale", "LossScaleError"]

#: Attribute holding a narrow parameter's noised sum in float32 between ``add_noise``
#: and ``scale_grad``, so that its gradient is rounded to the parameter's dtype once.
_WIDE_GRAD = "_dp_wide_grad"


class LossScaleError(ValueError):
    """A ``GradScaler`` step that a DP optimizer cannot take correctly; nothing was changed."""


class LossScale(NamedTuple):
    """The loss scale of the current step, as ``GradScaler.step`` handed it over.

    Attributes:
        inverse: ``1 / S``.
        found_inf: Whether the scaler's own check found an inf/NaN in ``p.grad``.
    """

    inverse: float
    found_inf: bool


def accumulation_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s clipped sum and noise: float32, or ``p``'s dtype when wider (the
    rule per-example quantities follow everywhere, :func:`~dp_torch.grad_sample._clipped_sum.compute_dtype`)."""
    return compute_dtype(p)


def set_grad(p: torch.Tensor, wide: torch.Tensor) -> None:
    """``p.grad = wide`` in ``p``'s dtype; a narrower ``p`` keeps ``wide`` for :func:`scaled_grad`."""
    wide = wide.view_as(p)
    if wide.dtype == p.dtype:
        p.grad = wide
        return
    p.grad = wide.to(p.dtype)
    setattr(p, _WIDE_GRAD, wide)


def drop_wide_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    """Remove and return the float32 gradient :func:`set_grad` kept for ``p`` (``None`` if none)."""
    wide = getattr(p, _WIDE_GRAD, None)
    if wide is not None:
        delattr(p, _WIDE_GRAD)
    return wide


def divide_grad(p: torch.Tensor, denominator: int) -> None:
    """``p.grad /= denominator``, from the float32 value when ``p`` is narrower (one rounding)."""
    wide = drop_wide_grad(p)
    if wide is None:
        p.grad /= denominator
    else:
        p.grad = (wide / denominator).to(p.dtype)


def read_loss_scale(optimizer: Any) -> Optional[LossScale]:
    """The loss scale ``GradScaler.step`` set on ``optimizer``, or ``None`` outside a scaler step.

    Raises:
        LossScaleError: If ``scaler.unscale_(optimizer)`` was called before
            ``scaler.step(optimizer)`` (the scale is then not handed over, while the
            per-example gradients are still scaled).
    """
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return None
    scale = getattr(optimizer, "grad_scale", None)
    if scale is None:
        raise LossScaleError(
            "scaler.unscale_(optimizer) was called before scaler.step(optimizer): it unscales "
            "p.grad, which a DP step replaces, and leaves the per-example gradients scaled by a "
            "loss scale the optimizer is then not told. Remove the unscale_ call (the DP "
            "optimizer's per-example clipping replaces clip_grad_norm_ on p.grad)."
        )
    return LossScale(inverse=1.0 / float(scale), found_inf=bool(float(found_inf) > 0))


def forget_loss_scale(optimizer: Any) -> None:
    """Remove what ``GradScaler.step`` set on ``optimizer`` (it does so itself only after a step)."""
    for name in ("grad_scale", "found_inf"):
        if name in vars(optimizer):
            delattr(optimizer, name)


def overflow_message(scale: LossScale) -> str:
    """Why a step with overflowed scaled gradients is refused, and how to fix it."""
    return (
        f"Gradients scaled by the GradScaler's loss scale {1.0 / scale.inverse:g} overflowed "
        f"(the scaler's check of p.grad found inf/NaN: {scale.found_inf}; otherwise a "
        "per-example gradient is not finite). A DP step cannot skip this batch: the skip would "
        "reveal the batch without noise, and the smaller scale the scaler would choose next "
        "would carry it into later steps. Nothing was updated or accounted. Call "
        "optimizer.zero_grad() and use a smaller fixed scale, e.g. GradScaler(init_scale=2.0**8, "
        "growth_interval=2**31 - 1) or scaler.update(new_scale=...), or train in bfloat16 "
        "(torch.autocast(dtype=torch.bfloat16) needs no loss scaling)."
    )


def ghost_message(used: Optional[float], stepped: Optional[float]) -> str:
    """Why a ghost-clipping step refuses a loss scale other than its backward pass's."""
    def said(scale: Optional[float]) -> str:
        return "no GradScaler" if scale is None else f"loss scale {scale:g}"

    return (
        f"The ghost-clipping backward pass ran with {said(used)} but this step has "
        f"{said(stepped)}: p.grad holds the clipped sum times the backward pass's scale, so "
        "dividing by another one would change the clipping's scale. Pass the GradScaler to the "
        "loss's backward (loss.backward(scaler=scaler); GradScaler.scale accepts only tensors), "
        "then call scaler.step(optimizer) and scaler.update(), or use neither."
    )
