"""Per-example gradient norms of an embedding lookup, without ``[B, vocab, dim]`` tensors.

Example ``i``'s gradient has, in row ``k``, the sum of the backprops of its tokens equal to
``k``. Its squared norm is therefore ``sum_k ||sum_{t: id_t = k} g_t||^2``: sort the
``(example, token id)`` pairs (``torch.unique``), sum the backprops of equal pairs
(``index_add``), square, and add per example. Cost ``O(N log N + N dim)`` for ``N`` tokens,
independent of the vocabulary (the algorithm of Li et al. / Opacus' embedding norm sampler).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["compute_embedding_norm_sample", "embedding_token_view", "token_row_norms"]


def embedding_token_view(
    ids: torch.Tensor, backprops: torch.Tensor, padding_idx: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten a lookup to its contributing tokens.

    Tokens equal to ``padding_idx`` and negative ids (used to pad merged calls) contribute
    nothing and are dropped.

    Args:
        ids: ``[B, ...]`` token ids.
        backprops: ``[B, ..., dim]``.
        padding_idx: The layer's padding index, or ``None``.

    Returns:
        ``(example_index, token_id, token_backprops)`` for the contributing tokens.
    """
    batch = ids.shape[0]
    flat_ids = ids.reshape(-1)
    rows = torch.arange(batch, device=ids.device).repeat_interleave(flat_ids.numel() // max(batch, 1))
    g = backprops.reshape(flat_ids.numel(), backprops.shape[-1])
    keep = flat_ids >= 0
    if padding_idx is not None:
        keep &= flat_ids != padding_idx
    if not bool(keep.all()):
        rows, flat_ids, g = rows[keep], flat_ids[keep], g[keep]
    return rows, flat_ids, g


def _grouped_rows(rows: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, vocab: int, scale_by_freq: bool):
    keys = rows * vocab + ids
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    summed = g.new_zeros((unique.numel(), g.shape[-1])).index_add_(0, inverse, g)
    if scale_by_freq:
        summed = summed / counts.unsqueeze(1).to(summed.dtype)
    return unique // vocab, summed


def token_row_norms(
    rows: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, vocab: int, batch: int, scale_by_freq: bool = False
) -> torch.Tensor:
    """Per-example norms of ``G_i[k] = sum_{t: row_t = i, id_t = k} g_t`` (a ``[vocab, dim]`` matrix each).

    Args:
        rows: Example of each token ``[N]``.
        ids: Token ids ``[N]`` in ``[0, vocab)``.
        g: The tokens' values ``[N, dim]``.
        vocab: Number of rows.
        batch: Number of examples.
        scale_by_freq: Divide each row's sum by its number of tokens.

    Returns:
        ``[batch]`` Frobenius norms.
    """
    example, summed = _grouped_rows(rows, ids, g, vocab, scale_by_freq)
    squares = summed.pow(2).sum(dim=1)
    return squares.new_zeros(batch).index_add_(0, example, squares).sqrt()


def compute_embedding_norm_sample(layer: nn.Embedding, activations: list, backprops: torch.Tensor) -> dict:
    """Per-example gradient norms of ``nn.Embedding``.

    ``scale_grad_by_freq`` scales by the token's frequency *within the example* (the
    per-example gradient; the batch gradient would use batch frequencies, which are not a
    sum of per-example terms).

    Args:
        layer: The layer.
        activations: ``[ids]`` with ids ``[B, ...]``.
        backprops: ``[B, ..., embedding_dim]``.

    Returns:
        ``{weight: [B]}`` when the weight is trainable.
    """
    if not layer.weight.requires_grad:
        return {}
    rows, ids, g = embedding_token_view(activations[0], backprops, layer.padding_idx)
    norms = token_row_norms(rows, ids, g, layer.num_embeddings, backprops.shape[0], layer.scale_grad_by_freq)
    return {layer.weight: norms}
