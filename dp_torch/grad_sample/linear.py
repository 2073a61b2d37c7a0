"""Grad, norm and batch-gradient samplers for ``nn.Linear`` (and subclasses, e.g. ``RNNLinear``).

For an input ``a`` of shape ``[B, ..., d_in]`` and backprops ``g`` of shape
``[B, ..., d_out]`` (the middle dimensions flattened to ``T`` positions), example ``i``'s
weight gradient is ``sum_t g_it a_it^T`` and its bias gradient ``sum_t g_it``.

Ghost clipping needs only the norm: ``||sum_t g_t a_t^T||_F^2 = sum_{t,s} (a_t.a_s)(g_t.g_s)``.
That Gram form costs ``O(T^2 (d_in + d_out))`` per example against ``O(T d_in d_out)`` for
materialising the gradient; the norm sampler picks the cheaper one per call
(:mod:`._ghost_cost`). The helpers on ``(a, g)`` views are shared with other layers that
are a matrix product in disguise (transformers' ``Conv1D``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import _ghost_cost
from ._registry import (
    CALL_CONCATENATORS,
    register_batch_grad_sampler,
    register_grad_sampler,
    register_norm_sampler,
)
from ._trainable import weight_and_bias

__all__ = [
    "compute_linear_batch_grad",
    "compute_linear_grad_sample",
    "compute_linear_norm_sample",
    "gram_products",
    "linear_sequence_views",
    "outer_sum_norms",
    "per_example_outer_sums",
    "sequence_views",
]


def sequence_views(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(a, g)`` reshaped to ``[B, T, d_in]`` and ``[B, T, d_out]`` (``a`` in ``g``'s dtype).

    Args:
        a: Input ``[B, ..., d_in]``.
        g: Backprops ``[B, ..., d_out]`` with the same middle dimensions.
    """
    batch = g.shape[0]
    steps = math.prod(g.shape[1:-1])
    return a.to(g.dtype).reshape(batch, steps, a.shape[-1]), g.reshape(batch, steps, g.shape[-1])


def linear_sequence_views(layer: nn.Linear, activations: list, backprops: torch.Tensor) -> tuple:
    """Return ``(a, g)`` reshaped to ``[B, T, d_in]`` and ``[B, T, d_out]``.

    Args:
        layer: The layer (for its feature sizes).
        activations: The layer's inputs; ``activations[0]`` is ``[B, ..., d_in]``.
        backprops: ``[B, ..., d_out]``.
    """
    del layer  # the views follow from the tensors' own shapes
    return sequence_views(activations[0], backprops)


def per_example_outer_sums(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_t g_it a_it^T`` per example: ``[B, d_out, d_in]`` from ``[B, T, d_in]``, ``[B, T, d_out]``."""
    if a.shape[1] == 1:
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.bmm(g.transpose(1, 2), a)


#: Positions per block of :func:`gram_products` (smaller blocks multiply slowly) and the most
#: blocks it uses.
_GRAM_BLOCK = 32
_GRAM_MAX_BLOCKS = 4


def gram_products(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_{t,s} (a_t . a_s)(g_t . g_s)`` per example, i.e. ``||sum_t g_t a_t^T||_F^2``.

    Both Gram matrices are symmetric, so only the blocks on and above the diagonal are
    formed: the positions are cut into up to :data:`_GRAM_MAX_BLOCKS` blocks of at least
    :data:`_GRAM_BLOCK`, and block row ``i`` against the positions from block ``i`` on counts
    twice, less its diagonal block once. With 4 blocks that is 5/8 of the full products.

    Args:
        a: ``[B, T, d_a]``.
        g: ``[B, T, d_g]`` (same ``B`` and ``T``).

    Returns:
        ``[B]``, not clamped (rounding can make it slightly negative).
    """
    steps = a.shape[1]
    blocks = max(1, min(steps // _GRAM_BLOCK, _GRAM_MAX_BLOCKS))
    if blocks == 1:
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
    bounds = [steps * i // blocks for i in range(blocks + 1)]
    total = None
    for lo, hi in zip(bounds, bounds[1:]):
        slab = torch.bmm(a[:, lo:hi], a[:, lo:].transpose(1, 2))
        slab.mul_(torch.bmm(g[:, lo:hi], g[:, lo:].transpose(1, 2)))
        part = 2 * slab.sum(dim=(1, 2)) - slab[:, :, : hi - lo].sum(dim=(1, 2))
        total = part if total is None else total + part
    return total


def _gram_norms_squared(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return gram_products(a, g).clamp(min=0)


def outer_sum_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||sum_t g_it a_it^T||_F`` per example, by the Gram form or materialised, whichever is cheaper.

    Args:
        a: ``[B, T, d_in]``.
        g: ``[B, T, d_out]``.

    Returns:
        ``[B]`` norms.
    """
    batch, steps, d_in = a.shape
    if steps == 1:
        return (a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)).sqrt()
    costs = _ghost_cost.outer_product_costs(batch, steps, d_in, g.shape[2])
    if _ghost_cost.choose_route(*costs) == _ghost_cost.GRAM:
        return _gram_norms_squared(a, g).sqrt()
    return per_example_outer_sums(a, g).pow(2).sum(dim=(1, 2)).sqrt()


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
    return weight_and_bias(layer, lambda: per_example_outer_sums(a, g), lambda: g.sum(dim=1))


@register_norm_sampler(nn.Linear)
def compute_linear_norm_sample(layer: nn.Linear, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient norms of ``nn.Linear`` without materialising the gradients.

    Arguments as for :func:`compute_linear_grad_sample`; returns ``{weight: [B], bias: [B]}``
    (L2 norms) for the trainable ones.
    """
    a, g = linear_sequence_views(layer, activations, backprops)
    return weight_and_bias(layer, lambda: outer_sum_norms(a, g), lambda: g.sum(dim=1).norm(dim=1))


@register_batch_grad_sampler(nn.Linear)
def compute_linear_batch_grad(layer: nn.Linear, activations: list, backprops: torch.Tensor) -> dict:
    """Sum over the batch of ``nn.Linear``'s per-example gradients: one matrix product.

    Arguments as for :func:`compute_linear_grad_sample`; returns ``{weight: [out, in],
    bias: [out]}`` for the trainable ones.
    """
    a, g = linear_sequence_views(layer, activations, backprops)
    a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return weight_and_bias(layer, lambda: g.t() @ a, lambda: g.sum(dim=0))


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
