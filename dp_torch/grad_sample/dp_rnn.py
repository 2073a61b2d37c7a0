"""Grad sampler of :class:`~dp_torch.layers.dp_rnn.RNNLinear` (mirrors ``opacus.grad_sample.dp_rnn``).

An ``RNNLinear`` is an ``nn.Linear`` called once per time step; its per-example
gradient for one call is the linear layer's. The hooks engine already uses the
``nn.Linear`` sampler for it (a subclass of a registered layer inherits its sampler)
and merges the calls of one backward pass into one sampler run, so importing this
module registers nothing; :func:`compute_rnn_linear_grad_sample` is the per-call
computation under Opacus' name.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dp_torch.layers.dp_rnn import RNNLinear

from .linear import compute_linear_grad_sample

__all__ = ["compute_rnn_linear_grad_sample"]


def compute_rnn_linear_grad_sample(
    layer: RNNLinear, activations: list, backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of one call of an ``RNNLinear`` (an ``nn.Linear``, same contract)."""
    return compute_linear_grad_sample(layer, activations, backprops)
