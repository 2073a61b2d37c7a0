"""Grad, norm and batch-gradient samplers for transformers' GPT-2 ``Conv1D``.

``transformers.pytorch_utils.Conv1D`` computes ``y = x @ W + b`` with ``W`` of shape
``[in, out]``: an ``nn.Linear`` with a transposed weight. Example ``i``'s weight gradient is
``sum_t a_it g_it^T`` (the transpose of the linear layer's), so its norm is the linear
layer's and :mod:`.linear`'s helpers (Gram form or materialised, per call) serve both.

dp_torch does not depend on transformers and never imports it: the samplers are registered
as soon as ``transformers.pytorch_utils`` has been imported (by the user's model code), at
the latest on the first sampler lookup after that.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from ._registry import (
    defer_registration,
    register_batch_grad_sampler,
    register_grad_sampler,
    register_norm_sampler,
)
from ._trainable import weight_and_bias
from .linear import outer_sum_norms, per_example_outer_sums, sequence_views

__all__ = [
    "compute_transformers_conv1d_batch_grad",
    "compute_transformers_conv1d_grad_sample",
    "compute_transformers_conv1d_norm_sample",
    "register_transformers_conv1d",
]


def compute_transformers_conv1d_grad_sample(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of a GPT-2 ``Conv1D``.

    Args:
        layer: The layer (``weight [in, out]``, ``bias [out]``).
        activations: ``[input]`` with input ``[B, ..., in]``.
        backprops: ``[B, ..., out]``.

    Returns:
        ``{weight: [B, in, out], bias: [B, out]}`` for the trainable ones.
    """
    a, g = sequence_views(activations[0], backprops)
    return weight_and_bias(layer, lambda: per_example_outer_sums(g, a), lambda: g.sum(dim=1))


def compute_transformers_conv1d_norm_sample(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient norms of a GPT-2 ``Conv1D`` without materialising the gradients.

    Arguments as for :func:`compute_transformers_conv1d_grad_sample`; returns
    ``{weight: [B], bias: [B]}`` for the trainable ones.
    """
    a, g = sequence_views(activations[0], backprops)
    return weight_and_bias(layer, lambda: outer_sum_norms(a, g), lambda: g.sum(dim=1).norm(dim=1))


def compute_transformers_conv1d_batch_grad(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
    """Sum over the batch of a GPT-2 ``Conv1D``'s per-example gradients: one matrix product.

    Arguments as for :func:`compute_transformers_conv1d_grad_sample`; returns
    ``{weight: [in, out], bias: [out]}`` for the trainable ones.
    """
    a, g = sequence_views(activations[0], backprops)
    a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return weight_and_bias(layer, lambda: a.t() @ g, lambda: g.sum(dim=0))


def _conv1d_class() -> Optional[type]:
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def register_transformers_conv1d() -> bool:
    """Register the three samplers for ``Conv1D`` if transformers is already imported.

    Imports nothing; safe to call again.

    Returns:
        Whether ``transformers.pytorch_utils.Conv1D`` exists and its samplers are registered.
    """
    cls = _conv1d_class()
    if cls is None:
        return False
    register_grad_sampler(cls)(compute_transformers_conv1d_grad_sample)
    register_norm_sampler(cls)(compute_transformers_conv1d_norm_sample)
    register_batch_grad_sampler(cls)(compute_transformers_conv1d_batch_grad)
    return True


defer_registration(register_transformers_conv1d)
