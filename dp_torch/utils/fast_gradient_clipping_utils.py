"""The loss wrapper of fast gradient / ghost clipping (mirrors Opacus' module of the same name).

``DPLossFastGradientClipping`` wraps a criterion; calling it returns a
:class:`DPTensorFastGradientClipping` whose ``backward()`` runs the two passes:

1. backward of the reduced loss, during which the model's hooks compute the per-example
   gradient norms (the parameter gradients are *not* computed by autograd: it is asked
   only for the gradients at the hooked layer outputs, which skips every weight-gradient
   product); the hooks keep each layer's inputs and output gradients;
2. ``c_i = min(1, C / (norm_i + 1e-6))`` (0 for a non-finite norm), and each layer's share
   of ``sum_i c_i grad_i`` from the kept tensors, with the output gradients scaled row by
   row by ``c`` (book-keeping: no second backward pass).

Afterwards every trainable ``p.grad`` has been *increased* by the clipped sum
``sum_i c_i grad_i`` (not averaged; the optimizer adds the noise once and divides by the
expected batch size for ``"mean"``).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Optional, Sequence

import torch

from dp_torch.grad_sample.grad_sample_module_fast_gradient_clipping import clipping_coefficients

__all__ = ["GHOST_LOSS_SCALE", "DPLossFastGradientClipping", "DPTensorFastGradientClipping"]

#: Attribute set on the optimizer by each ghost backward pass: the ``GradScaler`` scale the
#: pass ran at (``None`` without a scaler), checked by the ghost optimizer's step.
GHOST_LOSS_SCALE = "_dp_ghost_loss_scale"

_REDUCTIONS = ("mean", "sum")


def _check_reduction(value: Any, name: str) -> None:
    if value not in _REDUCTIONS:
        raise ValueError(f"{name} must be 'mean' or 'sum', got {value!r}.")


class DPTensorFastGradientClipping:
    """A per-example loss whose ``backward()`` performs the clipped backward.

    It behaves like the reduced loss for logging: ``item()``, ``detach()``, ``float()``,
    and arithmetic with numbers and other such losses (applied per example).

    Attributes:
        module: The ghost-clipping module (or hooks object).
        optimizer: The optimizer (kept for Opacus compatibility).
        loss_per_sample: The per-example losses ``[B]``.
        loss_reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, module: Any, optimizer: Any, loss_per_sample: torch.Tensor, loss_reduction: str = "mean"):
        """Wrap per-example losses.

        Args:
            module: A ``GradSampleModuleFastGradientClipping`` (or the hooks variant).
            optimizer: The DP optimizer.
            loss_per_sample: Per-example losses, shape ``[B]``.
            loss_reduction: ``"mean"`` or ``"sum"``.

        Raises:
            ValueError: If ``loss_reduction`` is invalid or ``loss_per_sample`` is not 1-d.
        """
        _check_reduction(loss_reduction, "loss_reduction")
        if not isinstance(loss_per_sample, torch.Tensor) or loss_per_sample.dim() != 1:
            shape = tuple(loss_per_sample.shape) if isinstance(loss_per_sample, torch.Tensor) else type(loss_per_sample)
            raise ValueError(
                f"loss_per_sample must be a 1-d tensor [batch], got {shape}; reduce the "
                "criterion's output to one loss per example."
            )
        self.module = module
        self.optimizer = optimizer
        self.loss_per_sample = loss_per_sample
        self.loss_reduction = loss_reduction

    # ------------------------------------------------------------------ tensor-like

    def _reduced(self) -> torch.Tensor:
        if self.loss_reduction == "mean":
            return self.loss_per_sample.mean()
        return self.loss_per_sample.sum()

    def detach(self) -> torch.Tensor:
        """The reduced loss as a detached scalar tensor."""
        return self._reduced().detach()

    def item(self) -> float:
        """The reduced loss as a Python float."""
        return self.detach().item()

    def __float__(self) -> float:
        return self.item()

    @property
    def shape(self) -> torch.Size:
        """Shape of the reduced loss (a scalar)."""
        return torch.Size([])

    def _new(self, loss_per_sample: torch.Tensor) -> "DPTensorFastGradientClipping":
        return DPTensorFastGradientClipping(self.module, self.optimizer, loss_per_sample, self.loss_reduction)

    def _operand(self, other: Any, op: str) -> Any:
        if isinstance(other, DPTensorFastGradientClipping):
            if other.loss_reduction != self.loss_reduction:
                raise ValueError(
                    f"Cannot {op} losses with different reductions: {self.loss_reduction!r} vs "
                    f"{other.loss_reduction!r}."
                )
            return other.loss_per_sample
        if isinstance(other, torch.Tensor) and other.dim() == 0 and other.requires_grad:
            raise ValueError(
                f"Cannot {op} a tensor that requires grad to per-example losses: its gradient (e.g. "
                "a weight penalty's) would be multiplied by each example's clip factor and escape "
                "the per-example norms. Pass the penalty as the optimizer's weight_decay, or "
                "detach the tensor."
            )
        if isinstance(other, numbers.Number) or (isinstance(other, torch.Tensor) and other.dim() == 0):
            return other
        raise TypeError(
            f"Cannot {op} a DPTensorFastGradientClipping and {type(other).__name__}; use a number, "
            "a 0-d tensor or another DPTensorFastGradientClipping."
        )

    def __add__(self, other: Any) -> "DPTensorFastGradientClipping":
        return self._new(self.loss_per_sample + self._operand(other, "add"))

    __radd__ = __add__

    def __sub__(self, other: Any) -> "DPTensorFastGradientClipping":
        return self._new(self.loss_per_sample - self._operand(other, "subtract"))

    def __rsub__(self, other: Any) -> "DPTensorFastGradientClipping":
        return self._new(self._operand(other, "subtract") - self.loss_per_sample)

    def __mul__(self, other: Any) -> "DPTensorFastGradientClipping":
        return self._new(self.loss_per_sample * self._operand(other, "multiply"))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> "DPTensorFastGradientClipping":
        return self._new(self.loss_per_sample / self._operand(other, "divide"))

    def __neg__(self) -> "DPTensorFastGradientClipping":
        return self._new(-self.loss_per_sample)

    def __repr__(self) -> str:
        return (
            f"DPTensorFastGradientClipping(loss_reduction={self.loss_reduction}, "
            f"shape={tuple(self.loss_per_sample.shape)})"
        )

    def __str__(self) -> str:
        return f"DPTensorFastGradientClipping({self.item():.4f})"

    # ------------------------------------------------------------------ the clipped backward

    def _first_pass_inputs(self) -> list:
        take = getattr(self.module, "take_output_edges", None)
        edges = take() if take is not None else []
        if edges:
            return edges
        return [p for p in self.module._module.parameters() if p.requires_grad]

    def _sync_bound(self) -> None:
        """Clip to the optimizer's current bound, the one its noise is scaled by.

        A grad-clip scheduler (or a user) changes ``optimizer.max_grad_norm``; the
        module must clip to that same bound, or the noise would no longer match
        the sensitivity of the clipped sum.
        """
        bound = getattr(self.optimizer, "max_grad_norm", None)
        if bound is not None and bound != self.module.max_grad_norm:
            self.module.max_grad_norm = float(bound)

    def backward(self, scaler: Optional[Any] = None) -> None:
        """One backward pass for the per-example norms, then ``p.grad += sum_i c_i grad_i``.

        The clipped sum is formed from the activations and output gradients the pass kept
        (book-keeping; no second backward pass).

        Args:
            scaler: A ``torch.amp.GradScaler`` for float16 training (``GradScaler.scale``
                accepts only tensors, so pass the scaler here instead of calling
                ``scaler.scale(loss)``). The pass runs on the scaled loss; the scale ``S`` is
                divided out of the per-example norms, so it changes no clip factor, and
                ``p.grad`` receives ``S`` times the clipped sum, which ``scaler.step(optimizer)``
                divides out (the optimizer refuses a step whose scale differs from the one used
                here). Then ``scaler.step(optimizer)`` and ``scaler.update()`` as usual.

        Raises:
            ValueError: If the number of clip factors differs from the number of losses.
            LossScaleError: With ``scaler``, if a scaled per-example gradient overflowed
                (nothing is added to ``p.grad``; call ``optimizer.zero_grad()`` and use a
                smaller fixed scale, see :mod:`dp_torch.optimizers`).
        """
        scaled = scaler is not None and scaler.is_enabled()
        setattr(self.optimizer, GHOST_LOSS_SCALE, float(scaler.get_scale()) if scaled else None)
        guard = getattr(self.module, "collective_guard", contextlib.nullcontext)
        with guard():
            self._clipped_backward(scaler if scaled else None)

    def _clipped_backward(self, scaler: Optional[Any]) -> None:
        """The norm pass, the clip factors, then the clipped sum from the kept tensors."""
        losses = self.loss_per_sample
        inputs = self._first_pass_inputs()
        if not (inputs and losses.requires_grad):
            return
        reduced, scale, pass_context = self._first_pass_loss(scaler)
        with pass_context:
            torch.autograd.grad(reduced, inputs, allow_unused=True)
        self._sync_bound()
        coef = self._clip_factors(scale)
        if coef.shape != losses.shape:
            raise ValueError(
                f"Got {coef.shape[0] if coef.dim() else coef} clip factors for {losses.shape[0]} "
                "per-example losses; the criterion's output must have one loss per example of the "
                "model's batch (for sequence losses pass shape=logits.shape)."
            )
        self.module.add_clipped_sum(coef)

    def _first_pass_loss(self, scaler: Optional[Any]) -> tuple[torch.Tensor, float, Any]:
        """The loss the norm pass differentiates, its loss scale, and the context to run it in.

        Without a ``GradScaler`` or float16 parameters, and with a module that offers
        ``summed_loss_pass``, the pass differentiates the sum of the per-example losses (its
        output gradients are then the per-example ones, kept without a rescaled copy).
        Otherwise it is the (scaled) reduced loss: float16 has little headroom, and a
        scaler's scale was chosen for that loss.
        """
        summed = getattr(self.module, "summed_loss_pass", None)
        half = any(p.dtype == torch.float16 for p in getattr(self.module, "trainable_parameters", ()))
        if scaler is None and summed is not None and not half:
            return self.loss_per_sample.sum(), 1.0, summed()
        reduced = self._reduced()
        if scaler is None:
            return reduced, 1.0, contextlib.nullcontext()
        return scaler.scale(reduced), float(scaler.get_scale()), contextlib.nullcontext()

    def _clip_factors(self, scale: float) -> torch.Tensor:
        """Clip factors of the unscaled norms; a loss-scaled pass must not overflow."""
        if scale == 1.0:
            return self.module.get_clipping_coef()
        norms = self.module.per_sample_gradient_norms
        if not bool(torch.isfinite(norms).all()):
            self.module.discard_clipped_sum()
            from dp_torch.optimizers import _mixed_precision as mp

            raise mp.LossScaleError(mp.overflow_message(mp.LossScale(inverse=1.0 / scale, found_inf=False)))
        return clipping_coefficients(norms / scale, self.module.max_grad_norm)


class DPLossFastGradientClipping:
    """Wraps a criterion for fast gradient / ghost clipping (Opacus-compatible).

    Example:
        >>> criterion = DPLossFastGradientClipping(gsm, optimizer, nn.CrossEntropyLoss())
        >>> loss = criterion(gsm(x), y)
        >>> loss.backward()
        >>> optimizer.step()
    """

    def __init__(self, module: Any, optimizer: Any, criterion: Any, loss_reduction: str = "mean"):
        """Check that the reductions agree and keep the parts.

        Args:
            module: A ``GradSampleModuleFastGradientClipping`` (or the hooks variant).
            optimizer: The DP optimizer (its ``loss_reduction``, if it has one, must agree).
            criterion: A loss module with a ``reduction`` attribute, or a function accepting
                ``reduction="none"`` (e.g. ``torch.nn.functional.cross_entropy``).
            loss_reduction: ``"mean"`` or ``"sum"``.

        Raises:
            ValueError: If ``loss_reduction`` is invalid or disagrees with the module's,
                the optimizer's or the criterion's.
            TypeError: If ``module`` is not a ghost-clipping module or ``criterion`` not callable.
        """
        _check_reduction(loss_reduction, "loss_reduction")
        if not hasattr(module, "get_clipping_coef"):
            raise TypeError(
                f"module must be a GradSampleModuleFastGradientClipping, got {type(module).__name__}; "
                "wrap the model with grad_sample_mode='ghost'."
            )
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}.")
        seen = {"module": getattr(module, "loss_reduction", loss_reduction),
                "optimizer": getattr(optimizer, "loss_reduction", loss_reduction),
                "criterion": getattr(criterion, "reduction", loss_reduction)}
        for name, value in seen.items():
            if value != loss_reduction:
                raise ValueError(
                    f"loss_reduction must be the same across the module, the optimizer, the "
                    f"criterion and this wrapper: {name} has {value!r}, loss_reduction={loss_reduction!r}."
                )
        self.module = module
        self.optimizer = optimizer
        self.criterion = criterion
        self.loss_reduction = loss_reduction

    def _unreduced(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if hasattr(self.criterion, "reduction"):
            old = self.criterion.reduction
            self.criterion.reduction = "none"
            try:
                return self.criterion(*args, **kwargs)
            finally:
                self.criterion.reduction = old
        return self.criterion(*args, reduction="none", **kwargs)

    def _per_example(self, losses: torch.Tensor, args: tuple, kwargs: dict,
                     shape: Optional[Sequence[int]]) -> torch.Tensor:
        if shape is not None and losses.dim() == 1 and losses.shape[0] == shape[0] * shape[1]:
            losses = losses.view(shape[0], shape[1])
            ignore_index = getattr(self.criterion, "ignore_index", None)
            target = kwargs.get("target", args[1] if len(args) > 1 else None)
            if self.loss_reduction == "mean" and ignore_index is not None and isinstance(target, torch.Tensor):
                valid = (target.reshape(shape[0], shape[1]) != ignore_index).sum(dim=1).clamp(min=1)
                return losses.sum(dim=1) / valid.to(losses.dtype)
        if losses.dim() == 0:
            raise ValueError(
                "The criterion returned a scalar with reduction='none'; it must return one loss per "
                "example (or per element)."
            )
        if losses.dim() == 1:
            return losses
        flat = losses.reshape(losses.shape[0], -1)
        return flat.mean(dim=1) if self.loss_reduction == "mean" else flat.sum(dim=1)

    def __call__(
        self, *args: Any, shape: Optional[Sequence[int]] = None, **kwargs: Any
    ) -> DPTensorFastGradientClipping:
        """Compute per-example losses and wrap them.

        Losses with more than one dimension are reduced per example over the trailing
        dimensions (mean or sum, as ``loss_reduction``), so that the mean/sum over examples
        equals the criterion's own mean/sum.

        Args:
            *args: Passed to the criterion (e.g. ``logits, target``).
            shape: For sequence tasks whose logits were flattened to ``[B*T, V]``: the
                unflattened ``[B, T, ...]`` shape, so that the losses are grouped per sequence
                (with ``ignore_index`` positions excluded from a sequence's mean).
            **kwargs: Passed to the criterion.

        Returns:
            The wrapped per-example loss.
        """
        losses = self._per_example(self._unreduced(args, kwargs), args, kwargs, shape)
        return DPTensorFastGradientClipping(self.module, self.optimizer, losses, self.loss_reduction)
