"""Wrappers that compute nothing: the user supplies ``p.grad_sample`` (``grad_sample_mode="no_op"``).

Mirrors ``opacus.grad_sample.gsm_no_op``. Use this mode when per-sample gradients come
from elsewhere (for example ``torch.func.vmap(torch.func.grad(...))``): after each
backward pass, set ``p.grad_sample`` (shape ``[B, *p.shape]``) on every trainable
parameter yourself; the DP optimizer then clips, accumulates, noises and accounts as
usual. The wrapper installs no hooks; it only manages the ``grad_sample`` attributes
(``zero_grad`` clears them, ``cleanup`` removes them).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule, check_wrapper_args

__all__ = ["GradSampleHooksNoOp", "GradSampleModuleNoOp"]


class GradSampleHooksNoOp(AbstractGradSampleHooks):
    """Attaches to a model without wrapping it and computes no per-sample gradients.

    Attributes:
        grad_accumulation_allowed: Recorded for API parity; nothing is accumulated here.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean"):
        """Set ``p.grad_sample = None`` on the trainable parameters of ``m``.

        Args:
            m: The model.
            batch_first: Recorded only (no input is inspected).
            loss_reduction: ``"mean"`` or ``"sum"``: the reduction of your loss; per-sample
                gradients you supply must be those of each example's own loss either way.

        Raises:
            TypeError: If ``m`` is not an ``nn.Module`` or ``batch_first`` not a bool.
            ValueError: If ``loss_reduction`` is not ``"mean"`` or ``"sum"``.
        """
        check_wrapper_args(m, batch_first, loss_reduction)
        AbstractGradSampleHooks.__init__(self, m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.grad_accumulation_allowed = True

    def forbid_grad_accumulation(self) -> None:
        """Record that batches must not accumulate (the DP optimizer checks ``p.grad_sample``)."""
        self.grad_accumulation_allowed = False

    def allow_grad_accumulation(self) -> None:
        """Undo :meth:`forbid_grad_accumulation`."""
        self.grad_accumulation_allowed = True

    def remove_hooks(self) -> None:
        """Nothing to remove: no hooks were installed."""


class GradSampleModuleNoOp(GradSampleHooksNoOp, AbstractGradSampleModule):
    """``nn.Module`` wrapper that forwards to the model and computes no per-sample gradients.

    Example:
        >>> model = GradSampleModuleNoOp(nn.Linear(3, 1))
        >>> x = torch.randn(4, 3)
        >>> model(x).sum().backward()
        >>> model._module.weight.grad_sample = x.unsqueeze(1)  # supplied by the user
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean"):
        """Wrap ``m``; see :class:`GradSampleHooksNoOp` for the arguments."""
        check_wrapper_args(m, batch_first, loss_reduction)
        nn.Module.__init__(self)
        GradSampleHooksNoOp.__init__(self, m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.grad_accumulation_hook = None

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self._module(x, *args, **kwargs)
