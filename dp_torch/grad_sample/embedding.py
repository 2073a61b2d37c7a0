"""Grad, norm and batch-gradient samplers for ``nn.Embedding`` and ``nn.EmbeddingBag``.

An ``EmbeddingBag`` example (bag) ``i`` adds its backprops ``g_i`` to the row of each of its
tokens, scaled by the token's weight ``s_t`` (``per_sample_weights``, ``1 / bag size`` in mode
``"mean"``, 0 for ``padding_idx``). Its gradient is therefore ``g_i`` placed in row ``k`` with
the factor ``S_ik = sum_{t in bag i, id_t = k} s_t``, and its norm is
``||g_i|| sqrt(sum_k S_ik^2)``: no ``[vocab, dim]`` tensor is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._registry import (
    CALL_CONCATENATORS,
    register_batch_grad_sampler,
    register_grad_sampler,
    register_norm_sampler,
)
from .embedding_norm_sample import compute_embedding_norm_sample, embedding_token_view, token_row_norms

__all__ = [
    "embedding_bag_unsupported_reason",
    "compute_embedding_batch_grad",
    "compute_embedding_grad_sample",
    "compute_embedding_norm_sample",
    "compute_embeddingbag_batch_grad",
    "compute_embeddingbag_gradsampler",
    "compute_embeddingbag_norm_sample",
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
    rows, ids, g = _scaled_tokens(layer, activations, backprops)
    return {layer.weight: _scatter_rows(backprops.shape[0], layer.num_embeddings, rows, ids, g)}


def _scaled_tokens(layer: nn.Embedding, activations: list, backprops: torch.Tensor) -> tuple:
    """``(example, token id, backprops)`` of the contributing tokens, scaled by their
    frequency within their example when ``scale_grad_by_freq``."""
    rows, ids, g = embedding_token_view(activations[0], backprops, layer.padding_idx)
    if layer.scale_grad_by_freq and ids.numel():
        g = g / _per_example_counts(rows, ids, layer.num_embeddings).unsqueeze(1).to(g.dtype)
    return rows, ids, g


@register_batch_grad_sampler(nn.Embedding)
def compute_embedding_batch_grad(layer: nn.Embedding, activations: list, backprops: torch.Tensor) -> dict:
    """Sum over the batch of ``nn.Embedding``'s per-example gradients (one ``index_add``).

    ``padding_idx`` rows get nothing; ``scale_grad_by_freq`` divides by the token's frequency
    within its example, as the per-example gradients do.

    Arguments as for :func:`compute_embedding_grad_sample`; returns
    ``{weight: [num_embeddings, embedding_dim]}`` when the weight is trainable.
    """
    if not layer.weight.requires_grad:
        return {}
    _, ids, g = _scaled_tokens(layer, activations, backprops)
    return {layer.weight: g.new_zeros((layer.num_embeddings, g.shape[-1])).index_add_(0, ids, g)}


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
    bags, ids, scale = _bag_token_scales(layer, inputs, backprops)
    values = backprops[bags] * scale.unsqueeze(1)
    return {layer.weight: _scatter_rows(backprops.shape[0], layer.num_embeddings, bags, ids, values)}


def _bag_token_scales(layer: nn.EmbeddingBag, inputs: list, backprops: torch.Tensor) -> tuple:
    """``(bag, token id, factor)`` per token: the token adds ``factor * backprops[bag]`` to its row.

    Raises:
        NotImplementedError: See :func:`embedding_bag_unsupported_reason`.
    """
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
    return bags, flat_ids, scale


@register_norm_sampler(nn.EmbeddingBag)
def compute_embeddingbag_norm_sample(layer: nn.EmbeddingBag, inputs: list, backprops: torch.Tensor) -> dict:
    """Per-example (per-bag) gradient norms of ``nn.EmbeddingBag``, ``||g_i|| sqrt(sum_k S_ik^2)``.

    Same configurations as :func:`compute_embeddingbag_gradsampler`; cost ``O(N log N + B dim)``
    for ``N`` tokens, independent of the vocabulary.

    Arguments as for :func:`compute_embeddingbag_gradsampler`; returns ``{weight: [B]}``.

    Raises:
        NotImplementedError: As :func:`compute_embeddingbag_gradsampler`.
    """
    if not layer.weight.requires_grad:
        return {}
    bags, ids, scale = _bag_token_scales(layer, inputs, backprops)
    factor_norms = token_row_norms(bags, ids, scale.unsqueeze(1), layer.num_embeddings, backprops.shape[0])
    return {layer.weight: backprops.norm(dim=1) * factor_norms}


@register_batch_grad_sampler(nn.EmbeddingBag)
def compute_embeddingbag_batch_grad(layer: nn.EmbeddingBag, inputs: list, backprops: torch.Tensor) -> dict:
    """Sum over the batch of ``nn.EmbeddingBag``'s per-bag gradients (one ``index_add``).

    Arguments and configurations as for :func:`compute_embeddingbag_gradsampler`; returns
    ``{weight: [num_embeddings, embedding_dim]}`` when the weight is trainable.

    Raises:
        NotImplementedError: As :func:`compute_embeddingbag_gradsampler`.
    """
    if not layer.weight.requires_grad:
        return {}
    bags, ids, scale = _bag_token_scales(layer, inputs, backprops)
    values = backprops[bags] * scale.unsqueeze(1)
    return {layer.weight: values.new_zeros((layer.num_embeddings, values.shape[1])).index_add_(0, ids, values)}
