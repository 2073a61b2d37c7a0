"""Grad and norm samplers for ``nn.Linear`` (and its subclasses, e.g. ``RNNLinear``).

For an input ``a`` of shape ``[B, ..., d_in]`` and backprops ``g`` of shape
``[B, ..., d_out]`` (the middle dimensions flattened to ``T`` positions), example ``i``'s
weight gradient is ``sum_t g_it a_it^T`` and its bias gradient ``sum_t g_it``.

Ghost clipping needs only the norm: ``||sum_t g_t a_t^T||_F^2 = sum_{t,s} (a_t.a_s)(g_t.g_s)``.
That Gram form costs ``O(T^2 (d_in + d_out))`` per example against ``O(T d_in d_out)`` for
materialising the gradient; the norm sampler picks the cheaper one per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._registry import CALL_CONCATENATORS, register_grad_sampler, register_norm_sampler

__all__ = ["compute_linear_grad_sample", "compute_linear_norm_sample", "linear_sequence_views"]


def linear_sequence_views(layer: nn.Linear, activations: list, backprops: torch.Tensor) -> tuple:
    """Return ``(a, g)`` reshaped to ``[B, T, d_in]`` and ``[B, T, d_out]``.

    Args:
        layer: The layer (for its feature sizes).
        activations: The layer's inputs; ``activations[0]`` is ``[B, ..., d_in]``.
        backprops: ``[B, ..., d_out]``.
    """
    a = activations[0].to(backprops.dtype)
    batch = backprops.shape[0]
    steps = math.prod(backprops.shape[1:-1])
    return a.reshape(batch, steps, layer.in_features), backprops.reshape(batch, steps, layer.out_features)


@register_grad_sampler(nn.Linear)
def compute_linear_grad_sample(layer: nn.Linear, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.Linear``.

    Args:
        layer: The layer.
        activations: ``[input]`` with input ``[B, ..., in_features]``.
        backprops: ``[B, ..., out_features]``.

    Returns:
        ``{weight: [B, out, in], bias: [B, out]}`` for the trainable ones.
    """
    a, g = linear_sequence_views(layer, activations, backprops)
    ret = {}
    if layer.weight.requires_grad:
        if a.shape[1] == 1:
            ret[layer.weight] = g[:, 0, :, None] * a[:, 0, None, :]
        else:
            ret[layer.weight] = torch.bmm(g.transpose(1, 2), a)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=1)
    return ret


def _weight_norm_squared(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    steps, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if steps == 1:
        return a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)
    if steps * (d_in + d_out) <= d_in * d_out:
        gram_a = torch.bmm(a, a.transpose(1, 2))
        gram_g = torch.bmm(g, g.transpose(1, 2))
        return (gram_a * gram_g).sum(dim=(1, 2)).clamp(min=0)
    return torch.bmm(g.transpose(1, 2), a).pow(2).sum(dim=(1, 2))


@register_norm_sampler(nn.Linear)
def compute_linear_norm_sample(layer: nn.Linear, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient norms of ``nn.Linear`` without materialising the gradients.

    Arguments as for :func:`compute_linear_grad_sample`; returns ``{weight: [B], bias: [B]}``
    (L2 norms) for the trainable ones.
    """
    a, g = linear_sequence_views(layer, activations, backprops)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = _weight_norm_squared(a, g).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=1).pow(2).sum(dim=1).sqrt()
    return ret


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _concat_linear_calls(layer: nn.Linear, calls: list) -> tuple:
    """Merge several calls ``(activations, backprops)`` into one ``[B, sum T, d]`` call."""
    views = [linear_sequence_views(layer, acts, bp) for acts, bp in calls]
    rows = max(g.shape[0] for _, g in views)
    a = torch.cat([_pad_rows(a, rows) for a, _ in views], dim=1)
    g = torch.cat([_pad_rows(g, rows) for _, g in views], dim=1)
    return [a], g


CALL_CONCATENATORS[nn.Linear] = _concat_linear_calls
