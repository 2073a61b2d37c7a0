"""Ghost norms of an embedding table tied to an output layer (internal).

A language model's input embedding ``E`` (``nn.Embedding``) and output layer ``H``
(``nn.Linear``) often share one ``[vocab, dim]`` weight. Example ``i``'s gradient of it is
the sum ``E_i + H_i`` of the two layers' per-example gradients, so

``||E_i + H_i||^2 = ||E_i||^2 + ||H_i||^2 + 2 <E_i, H_i>``.

The first two terms come from the layers' own norm samplers (no ``[vocab, dim]`` tensor per
example). The cross term needs none either: row ``k`` of ``E_i`` is the sum of the
embedding's output gradients ``e_t`` at the tokens ``t`` with id ``k``, and ``H_i =
sum_s h_s a_s^T`` over the output layer's positions ``s`` (output gradient ``h_s``, input
``a_s``), hence

``<E_i, H_i> = sum_{t, s} h_s[id_t] (a_s . e_t)``,

a ``[positions, tokens]`` product per example. The clipped sum needs nothing new: each
layer's batch gradient for the row-scaled output gradients, added to the shared weight.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from . import _registry
from .embedding_norm_sample import compute_embedding_norm_sample
from .linear import compute_linear_norm_sample, sequence_views

__all__ = ["tied_pair", "tied_norms"]

#: One stashed layer call: ``(record, activations, backprops)``.
Call = tuple


def tied_pair(component: list) -> Optional[tuple[Call, Call]]:
    """``(embedding call, output-layer call)`` when a group of stashed calls is exactly one
    ``nn.Embedding`` call and one ``nn.Linear`` call whose weight is the embedding's, else ``None``.

    Args:
        component: The calls of the layers sharing parameters, one list per layer.
    """
    if len(component) != 2 or any(len(calls) != 1 for calls in component):
        return None
    (first,), (second,) = component
    for emb, out in ((first, second), (second, first)):
        e, o = emb[0].module, out[0].module
        if (type(e) is nn.Embedding and isinstance(o, nn.Linear) and o.weight is e.weight
                and _registry.find_sampler(_registry.NORM_SAMPLERS, o) is compute_linear_norm_sample
                and not e.scale_grad_by_freq and emb[2].shape[0] == out[2].shape[0]):
            return emb, out
    return None


def _cross_terms(emb: Call, out: Call) -> torch.Tensor:
    """``<E_i, H_i>`` per example (see the module docstring)."""
    _, emb_acts, e = emb
    _, out_acts, h = out
    a, h = sequence_views(out_acts[0], h)  # [B, S, dim], [B, S, vocab]
    batch = h.shape[0]
    ids = emb_acts[0].reshape(batch, -1)  # [B, T]
    e = e.reshape(batch, ids.shape[1], -1).to(h.dtype)  # [B, T, dim]
    padding = emb[0].module.padding_idx
    contributes = ids >= 0
    if padding is not None:
        contributes &= ids != padding
    safe = torch.where(contributes, ids, torch.zeros_like(ids))
    picked = torch.gather(h, 2, safe.unsqueeze(1).expand(batch, h.shape[1], safe.shape[1]))  # [B, S, T]
    dots = torch.bmm(a.to(h.dtype), e.transpose(1, 2))  # [B, S, T]
    products = (picked * dots).masked_fill_(~contributes.unsqueeze(1), 0.0)
    return products.sum(dim=(1, 2))


def tied_norms(emb: Call, out: Call) -> dict:
    """Per-example norms ``{parameter: [B]}`` of a tied embedding / output-layer pair.

    The shared weight's norm is ``sqrt(||E_i||^2 + ||H_i||^2 + 2 <E_i, H_i>)``; the output
    layer's bias (if trainable) has its own norm.

    Args:
        emb: The embedding's call ``(record, activations, backprops)``.
        out: The output layer's call.
    """
    (emb_record, emb_acts, e), (out_record, out_acts, h) = emb, out
    weight = emb_record.module.weight
    norms: dict[Any, torch.Tensor] = dict(compute_linear_norm_sample(out_record.module, list(out_acts), h))
    if weight.requires_grad:
        own = compute_embedding_norm_sample(emb_record.module, list(emb_acts), e)[weight]
        squares = own.pow(2) + norms[weight].pow(2) + 2 * _cross_terms(emb, out)
        norms[weight] = squares.clamp(min=0).sqrt()
    return norms
