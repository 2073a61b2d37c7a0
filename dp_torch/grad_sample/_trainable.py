"""The ``{parameter: result}`` dict of a layer with a ``weight`` and an optional ``bias`` (internal)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = ["weight_and_bias"]


def weight_and_bias(
    layer: nn.Module,
    weight_fn: Callable[[], torch.Tensor],
    bias_fn: Callable[[], torch.Tensor],
) -> dict:
    """``{layer.weight: weight_fn(), layer.bias: bias_fn()}`` for the trainable ones only.

    The functions are called only for trainable parameters, so a frozen weight costs nothing.

    Args:
        layer: A layer with a ``weight`` and a ``bias`` attribute (the bias may be ``None``).
        weight_fn: Computes the weight's result.
        bias_fn: Computes the bias's result.
    """
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = weight_fn()
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.requires_grad:
        ret[bias] = bias_fn()
    return ret
