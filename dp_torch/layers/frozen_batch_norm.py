"""Batch normalisation with fixed statistics: the privacy-safe form of a frozen BatchNorm.

A BatchNorm whose affine parameters are frozen (``requires_grad=False``) still normalises each
example with the mean and variance of the *whole batch* in training mode, and still updates its
running statistics from the batch: one example's output depends on the others, and the running
statistics are released without noise. :class:`FrozenBatchNorm` always uses the stored running
statistics and never updates them, so it computes, in every mode, what the original module
computes in eval mode: a fixed per-channel affine map, applied to each example on its own.
``dp_torch.validators.ModuleValidator.fix`` puts it in place of a frozen BatchNorm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(nn.Module):
    """Per-channel ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    The state dict has the names of ``nn.BatchNorm*d`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so a BatchNorm checkpoint loads as it is.

    Args:
        num_features: Channels ``C``; input is ``[B, C, *]``.
        eps: Added to the variance.
        affine: Whether ``weight`` and ``bias`` exist (as frozen parameters).
        device: Where the tensors live.
        dtype: Their dtype.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(num_features, **factory), requires_grad=False)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    @classmethod
    def from_batch_norm(cls, module: nn.modules.batchnorm._NormBase) -> "FrozenBatchNorm":
        """The module equal to ``module`` in eval mode, with copies of its tensors.

        Args:
            module: A BatchNorm with running statistics (``track_running_stats=True``).

        Raises:
            ValueError: If ``module`` keeps no running statistics.
        """
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"{type(module).__name__} has track_running_stats=False, so it has no statistics "
                "to freeze; replace it with GroupNorm instead"
            )
        ref = module.running_mean
        frozen = cls(
            module.num_features, module.eps, module.affine, device=ref.device, dtype=ref.dtype
        )
        with torch.no_grad():
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
            if module.num_batches_tracked is not None:
                frozen.num_batches_tracked.copy_(module.num_batches_tracked)
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
        return frozen

    def forward(self, input: Tensor) -> Tensor:
        """Normalises ``input`` ``[B, C, *]`` with the stored statistics (never updates them)."""
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"input must have shape [batch, {self.num_features}, ...], got {tuple(input.shape)}"
            )
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            training=False, momentum=0.0, eps=self.eps,
        )

    def extra_repr(self) -> str:
        """Constructor arguments, for ``repr``."""
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
