"""``grad_sample_mode="ew"`` (mirrors ``opacus.grad_sample.gsm_exp_weights``).

In Opacus this mode calls PyTorch's ExpandedWeights (``torch.nn.utils._per_sample_grad``,
a private torch module) to obtain ``p.grad_sample``. dp_torch keeps the mode's contract
(an ``nn.Module`` wrapper, batch-first inputs only, ``p.grad_sample`` of shape
``[B, *p.shape]`` after backward, no hooks-object variant) and computes the per-sample
gradients with its own hooks engine (:class:`~dp_torch.grad_sample.GradSampleModule`).
The numbers are the same; in addition every layer the hooks engine supports works
(ExpandedWeights raises on layers it does not know, such as the DP recurrent layers'
repeated calls), several backward passes accumulate as in ``"hooks"`` mode (ExpandedWeights
refuses a second forward pass before ``grad_sample`` is cleared), and ``p.grad`` is filled
as usual.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .grad_sample_module import GradSampleModule
from .gsm_base import check_wrapper_args

__all__ = ["GradSampleModuleExpandedWeights"]


class GradSampleModuleExpandedWeights(GradSampleModule):
    """The wrapper of ``grad_sample_mode="ew"``: batch-first per-sample gradients.

    Example:
        >>> model = GradSampleModuleExpandedWeights(nn.Linear(4, 2))
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> model._module.weight.grad_sample.shape
        torch.Size([8, 2, 4])
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean"):
        """Wrap ``m``.

        Args:
            m: The model.
            batch_first: Must be ``True`` (the mode's contract, as in Opacus).
            loss_reduction: ``"mean"`` or ``"sum"``, the reduction of your loss over the batch.

        Raises:
            NotImplementedError: If ``batch_first`` is ``False``.
            TypeError, ValueError: On an invalid argument (see ``GradSampleModule``).
        """
        check_wrapper_args(m, batch_first, loss_reduction)
        if not batch_first:
            raise NotImplementedError(
                'grad_sample_mode="ew" needs batch_first=True, got batch_first=False; use '
                'grad_sample_mode="hooks", which supports [T, batch, ...] inputs.'
            )
        super().__init__(m, batch_first=True, loss_reduction=loss_reduction)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model; ``x`` is the batch-first input."""
        return self._module(x, *args, **kwargs)
