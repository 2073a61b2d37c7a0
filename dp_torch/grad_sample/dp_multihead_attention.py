"""Per-example gradient of :class:`~dp_torch.layers.SequenceBias` (Opacus' module of the same name).

dp_torch's ``SequenceBias`` keeps its vector as the weight ``[E, 1]`` of an
``nn.Linear(1, E)`` applied to a column of ones, so the hooks engine computes its
per-example gradient with the ``nn.Linear`` sampler and importing this module registers
nothing. :func:`compute_sequence_bias_grad_sample` gives the same result directly from
the layer's backprops, under Opacus' name.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dp_torch.layers.dp_multihead_attention import SequenceBias

__all__ = ["compute_sequence_bias_grad_sample"]


def compute_sequence_bias_grad_sample(
    layer: SequenceBias, activations: list, backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient of the appended vector: the backprops at the appended position.

    Args:
        layer: The layer.
        activations: ``[input]`` (unused: the gradient does not depend on the input).
        backprops: Gradient of the loss with respect to the layer's output, batch first,
            ``[B, S + 1, E]`` (the vector is the last position).

    Returns:
        ``{layer.proj.weight: [B, E, 1]}`` when it is trainable, else ``{}``.
    """
    weight = layer.proj.weight
    if not weight.requires_grad:
        return {}
    return {weight: backprops[:, -1].unsqueeze(-1)}
