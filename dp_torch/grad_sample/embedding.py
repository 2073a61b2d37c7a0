"""Grad samplers for ``nn.Embedding`` and ``nn.EmbeddingBag``, norm sampler for ``nn.Embedding``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._registry import CALL_CONCATENATORS, register_grad_sampler, register_norm_sampler
from .embedding_norm_sample import compute_embedding_norm_sample
from .embedding_norm_sample import embedding_token_view

__all__ = [
    "embedding_bag_unsupported_reason",
    "compute_embedding_grad_sample",
    "compute_embedding_norm_sample",
    "compute_embeddingbag_gradsampler",
]


def _scatter_rows(batch: int, vocab: int, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = values.new_zeros((batch * vocab, values.shape[-1]))
    out.index_add_(0, rows * vocab + ids, values)
    return out.view(batch, vocab, values.shape[-1])


def _per_example_counts(rows: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    keys = rows * vocab + ids
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse]


@register_grad_sampler(nn.Embedding)
def compute_embedding_grad_sample(layer: nn.Embedding, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradients of ``nn.Embedding`` (dense ``[B, num_embeddings, dim]``).

    ``scale_grad_by_freq`` uses each token's frequency within its example.

    Args:
        layer: The layer.
        activations: ``[ids]`` with ids ``[B, ...]``.
        backprops: ``[B, ..., embedding_dim]``.

    Returns:
        ``{weight: [B, num_embeddings, embedding_dim]}`` when the weight is trainable.
    """
    if not layer.weight.requires_grad:
        return {}
    batch = backprops.shape[0]
    rows, ids, g = embedding_token_view(activations[0], backprops, layer.padding_idx)
    if layer.scale_grad_by_freq and ids.numel():
        g = g / _per_example_counts(rows, ids, layer.num_embeddings).unsqueeze(1).to(g.dtype)
    return {layer.weight: _scatter_rows(batch, layer.num_embeddings, rows, ids, g)}


# Opacus keeps the norm sampler in this module too; it is registered here, written once.
compute_embedding_norm_sample = register_norm_sampler(nn.Embedding)(compute_embedding_norm_sample)


def _concat_embedding_calls(layer: nn.Embedding, calls: list) -> tuple:
    """Merge several calls into one ``[B, sum T]`` lookup (missing rows padded with id -1)."""
    rows = max(bp.shape[0] for _, bp in calls)
    id_parts, g_parts = [], []
    for acts, bp in calls:
        steps = math.prod(bp.shape[1:-1])
        ids = acts[0].reshape(bp.shape[0], steps)
        g = bp.reshape(bp.shape[0], steps, layer.embedding_dim)
        if ids.shape[0] < rows:
            ids = torch.cat([ids, ids.new_full((rows - ids.shape[0], ids.shape[1]), -1)])
            g = torch.cat([g, g.new_zeros((rows - g.shape[0], *g.shape[1:]))])
        id_parts.append(ids)
        g_parts.append(g)
    return [torch.cat(id_parts, dim=1)], torch.cat(g_parts, dim=1)


CALL_CONCATENATORS[nn.Embedding] = _concat_embedding_calls


def embedding_bag_unsupported_reason(layer: nn.EmbeddingBag) -> str:
    """Why an ``EmbeddingBag`` configuration has no per-sample sampler (empty string if it has one).

    Mode ``"max"`` is not implemented. ``scale_grad_by_freq=True`` is refused because torch's
    own backward for it is inconsistent (torch 2.13, CPU: indices ``[[0, 0, 1]]`` give row 1 a
    gradient of 0.5 instead of 1), so there is no trustworthy reference to match.
    """
    if layer.mode not in ("sum", "mean"):
        return f"EmbeddingBag mode={layer.mode!r} has no per-sample gradient sampler; use mode 'sum' or 'mean'."
    if layer.scale_grad_by_freq:
        return (
            "EmbeddingBag with scale_grad_by_freq=True is not supported (torch's own gradient for it "
            "is inconsistent); use scale_grad_by_freq=False."
        )
    return ""


def _bag_inputs(layer: nn.EmbeddingBag, activations: list) -> tuple:
    kwargs = getattr(activations, "kwargs", {}) or {}
    ids = activations[0]
    offsets = activations[1] if len(activations) > 1 else kwargs.get("offsets")
    weights = activations[2] if len(activations) > 2 else kwargs.get("per_sample_weights")
    return ids, offsets, weights


def _bag_of_token(layer: nn.EmbeddingBag, ids: torch.Tensor, offsets, batch: int) -> tuple:
    """Bag index of every token, and a mask of tokens that belong to a bag."""
    if ids.dim() == 2:
        bags = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
        return bags, torch.ones_like(bags, dtype=torch.bool)
    starts = offsets[:batch]
    positions = torch.arange(ids.numel(), device=ids.device)
    bags = torch.bucketize(positions, starts, right=True) - 1
    inside = bags >= 0
    if layer.include_last_offset:
        inside &= positions < offsets[batch]
    return bags.clamp(min=0), inside


@register_grad_sampler(nn.EmbeddingBag)
def compute_embeddingbag_gradsampler(layer: nn.EmbeddingBag, inputs: list, backprops: torch.Tensor) -> dict:
    """Per-example (per-bag) gradients of ``nn.EmbeddingBag`` in mode ``"sum"`` or ``"mean"``.

    Each bag is one example. Supports 2-d input or 1-d input with ``offsets`` (also with
    ``include_last_offset``), ``per_sample_weights`` (mode ``"sum"``), ``padding_idx``
    (its tokens are skipped and, in mode ``"mean"``, not counted).

    Args:
        layer: The layer.
        inputs: ``[ids, offsets?, per_sample_weights?]`` (keyword inputs on
            ``inputs.kwargs``).
        backprops: ``[B, embedding_dim]``.

    Returns:
        ``{weight: [B, num_embeddings, embedding_dim]}`` when the weight is trainable.

    Raises:
        NotImplementedError: For mode ``"max"`` or ``scale_grad_by_freq=True`` (see
            :func:`embedding_bag_unsupported_reason`).
    """
    if not layer.weight.requires_grad:
        return {}
    reason = embedding_bag_unsupported_reason(layer)
    if reason:
        raise NotImplementedError(reason)
    batch = backprops.shape[0]
    ids, offsets, weights = _bag_inputs(layer, inputs)
    bags, keep = _bag_of_token(layer, ids, offsets, batch)
    flat_ids = ids.reshape(-1)
    if layer.padding_idx is not None:
        keep &= flat_ids != layer.padding_idx
    scale = keep.to(backprops.dtype)
    if weights is not None:
        scale = scale * weights.reshape(-1).to(backprops.dtype)
    if layer.mode == "mean":
        counts = backprops.new_zeros(batch).index_add_(0, bags, keep.to(backprops.dtype))
        scale = scale / counts.clamp(min=1)[bags]

    values = backprops[bags] * scale.unsqueeze(1)
    return {layer.weight: _scatter_rows(batch, layer.num_embeddings, bags, flat_ids, values)}
