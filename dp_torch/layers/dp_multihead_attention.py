"""Multi-head attention built from ``nn.Linear`` submodules: drop-in twin of ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` keeps its input projections in one packed parameter used through
``F.multi_head_attention_forward``, out of reach of a hook-based per-sample-gradient engine.
:class:`DPMultiheadAttention` computes the same function with four ``nn.Linear`` modules
(``qlinear``, ``klinear``, ``vlinear``, ``out_proj``) and, for ``add_bias_kv``, two
:class:`SequenceBias` modules whose one parameter is again an ``nn.Linear`` weight. Every
linear is called on tensors in the module's own layout (batch first iff ``batch_first``), so
the engine's ``batch_first`` must match the attention's, as with any other layer.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SequenceBias", "DPMultiheadAttention"]


def _sequence_bias_save(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + "proj.weight"
    if key in state_dict:
        state_dict[prefix + "bias"] = state_dict.pop(key).reshape(-1)


def _sequence_bias_load(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list, unexpected_keys: list, error_msgs: list,
) -> None:
    key = prefix + "bias"
    if key in state_dict:
        state_dict[prefix + "proj.weight"] = state_dict.pop(key).reshape(-1, 1)


class SequenceBias(nn.Module):
    """Appends one learned vector at the end of a sequence: ``[S, B, E] -> [S+1, B, E]``.

    With ``batch_first=True`` the layout is ``[B, S, E] -> [B, S+1, E]``. The vector is the
    weight of an ``nn.Linear(1, embed_dim)`` applied to a column of ones, so a hook-based
    per-sample-gradient engine computes its per-example gradient with its Linear rule. The state
    dict holds it as ``bias`` of shape ``[E]`` (Opacus' name and shape).

    Args:
        embed_dim: Size ``E`` of the vector.
        batch_first: Layout of the input, as above.
        device: Where the parameter lives.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        embed_dim: int,
        batch_first: bool = False,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.batch_first = batch_first
        self.proj = nn.Linear(1, embed_dim, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.proj.weight)
        self.register_state_dict_post_hook(_sequence_bias_save)
        self.register_load_state_dict_pre_hook(_sequence_bias_load)

    @property
    def bias(self) -> Tensor:
        """The appended vector, shape ``[E]`` (a view of ``proj.weight``)."""
        return self.proj.weight[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        """Appends the vector to every sequence of ``x`` (3-D, layout per ``batch_first``)."""
        batch_dim = 0 if self.batch_first else 1
        shape = [1, 1, 1]
        shape[batch_dim] = x.shape[batch_dim]
        ones = torch.ones(shape, dtype=self.proj.weight.dtype, device=x.device)
        return torch.cat([x, self.proj(ones)], dim=1 - batch_dim)


def _mha_save(module: "DPMultiheadAttention", state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Internal names -> ``nn.MultiheadAttention`` names and order."""
    own = [k for k in state_dict if k.startswith(prefix)]
    values = {k[len(prefix):]: state_dict.pop(k) for k in own}
    out: dict[str, Tensor] = {}
    weights = [values.pop(f"{n}linear.weight") for n in "qkv"]
    if module.kdim == module.embed_dim and module.vdim == module.embed_dim:
        out["in_proj_weight"] = torch.cat(weights).detach()
    else:
        out.update({f"{n}_proj_weight": w for n, w in zip("qkv", weights)})
    if "qlinear.bias" in values:
        out["in_proj_bias"] = torch.cat([values.pop(f"{n}linear.bias") for n in "qkv"]).detach()
    for name in ("k", "v"):
        if f"seq_bias_{name}.bias" in values:
            out[f"bias_{name}"] = values.pop(f"seq_bias_{name}.bias").reshape(1, 1, -1)
    out.update(values)
    for key, value in out.items():
        state_dict[prefix + key] = value


def _mha_load(
    module: "DPMultiheadAttention", state_dict: dict, prefix: str, local_metadata: Any,
    strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list,
) -> None:
    """``nn.MultiheadAttention`` names -> internal names (internal names pass through)."""

    def move(old: str, new: str, value: Tensor) -> None:
        if prefix + new in state_dict:
            error_msgs.append(
                f"state_dict holds both {prefix + old!r} and {prefix + new!r} for "
                "DPMultiheadAttention; keep only one of them"
            )
            return
        state_dict[prefix + new] = value

    for part in ("weight", "bias"):
        key = prefix + f"in_proj_{part}"
        if key not in state_dict:
            continue
        packed = state_dict.pop(key)
        if packed.shape[0] % 3 != 0:
            error_msgs.append(
                f"{key} must have 3 * embed_dim rows (q, k and v stacked), got shape "
                f"{tuple(packed.shape)}"
            )
            continue
        for name, chunk in zip("qkv", packed.chunk(3)):
            move(f"in_proj_{part}", f"{name}linear.{part}", chunk)
    for name in "qkv":
        key = prefix + f"{name}_proj_weight"
        if key in state_dict:
            move(f"{name}_proj_weight", f"{name}linear.weight", state_dict.pop(key))
    for name in "kv":
        key = prefix + f"bias_{name}"
        if key in state_dict:
            move(f"bias_{name}", f"seq_bias_{name}.bias", state_dict.pop(key).reshape(-1))


def _canonical_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """Bool mask (True = ignore) -> additive float mask; float mask -> ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    return mask.to(dtype)


class DPMultiheadAttention(nn.Module):
    """Multi-head attention from separate q/k/v/out ``nn.Linear`` modules.

    Same constructor and forward contract as ``torch.nn.MultiheadAttention``; the state dict
    uses ``nn.MultiheadAttention``'s names (``in_proj_weight`` split into ``qlinear``,
    ``klinear`` and ``vlinear`` on load, joined on save), so weights move both ways.

    Args:
        embed_dim: Model dimension ``E`` (query features and output features).
        num_heads: Heads; must divide ``embed_dim``.
        dropout: Dropout probability on the attention weights (training mode only).
        bias: Whether the four projections have biases.
        add_bias_kv: Append a learned vector to the key and value sequences.
        add_zero_attn: Append a zero vector to the key and value sequences.
        kdim: Key features (default ``embed_dim``).
        vdim: Value features (default ``embed_dim``).
        batch_first: Inputs and output are ``[B, L, E]`` instead of ``[L, B, E]``.
        device: Where the parameters live.
        dtype: Parameter dtype.

    Raises:
        ValueError: On an invalid argument (message names it).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_bias_kv = add_bias_kv
        self.add_zero_attn = add_zero_attn
        # Read by nn.TransformerEncoderLayer: keeps it off its fused fast path.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None
        self.qlinear = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.klinear = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.vlinear = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.seq_bias_k = SequenceBias(embed_dim, batch_first, **factory) if add_bias_kv else None
        self.seq_bias_v = SequenceBias(embed_dim, batch_first, **factory) if add_bias_kv else None
        self._reset_parameters()
        self.register_state_dict_post_hook(_mha_save)
        self.register_load_state_dict_pre_hook(_mha_load)

    def _reset_parameters(self) -> None:
        """Initialises as ``nn.MultiheadAttention``: Xavier projections, zero biases."""
        if self.kdim == self.embed_dim and self.vdim == self.embed_dim:
            # nn.MultiheadAttention draws the packed [3E, E] matrix: fan_in E, fan_out 3E.
            bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim))
            for lin in (self.qlinear, self.klinear, self.vlinear):
                nn.init.uniform_(lin.weight, -bound, bound)
        else:
            for lin in (self.qlinear, self.klinear, self.vlinear):
                nn.init.xavier_uniform_(lin.weight)
        for lin in (self.qlinear, self.klinear, self.vlinear, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for seq_bias in (self.seq_bias_k, self.seq_bias_v):
            if seq_bias is not None:
                nn.init.normal_(seq_bias.proj.weight, std=math.sqrt(1.0 / self.embed_dim))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Attention with ``nn.MultiheadAttention``'s inputs, outputs and mask semantics.

        Args:
            query: ``[L, B, E]`` (``[B, L, E]`` if ``batch_first``) or unbatched ``[L, E]``.
            key: ``[S, B, kdim]`` (batch-first likewise) or ``[S, kdim]``.
            value: ``[S, B, vdim]`` or ``[S, vdim]``.
            key_padding_mask: ``[B, S]`` (``[S]`` unbatched); bool (True = ignore) or additive.
            need_weights: Also return the attention weights.
            attn_mask: ``[L, S]`` or ``[B * num_heads, L, S]``; bool (True = masked) or additive.
            average_attn_weights: Average the returned weights over heads.
            is_causal: Hint that ``attn_mask`` is the causal mask (torch's semantics: it
                requires ``attn_mask``; without a padding mask and with ``need_weights=False``
                the causal mask is used in place of ``attn_mask``).

        Returns:
            ``(attn_output, attn_weights)``: output like ``query`` with ``E`` features;
            weights ``[B, L, S']`` (``[B, num_heads, L, S']`` unaveraged) or ``None``, where
            ``S'`` counts the appended bias / zero positions.
        """
        batched = self._check_inputs(query, key, value)
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            query, key, value = (t.unsqueeze(batch_dim) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True is a hint that attn_mask is the causal mask and needs attn_mask; "
                "pass e.g. nn.Transformer.generate_square_subsequent_mask(L)"
            )
        q, k, v = self.qlinear(query), self.klinear(key), self.vlinear(value)
        if self.seq_bias_k is not None and self.seq_bias_v is not None:
            k, v = self.seq_bias_k(k), self.seq_bias_v(v)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(k.shape[:2] + (1, self.head_dim))
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        use_causal = is_causal and key_padding_mask is None and not need_weights
        mask = self._merged_mask(
            None if use_causal else attn_mask, key_padding_mask, q, key.shape[1 - batch_dim], k.shape[2]
        )
        if use_causal:
            mask = self._causal_mask(q.shape[2], k.shape[2], q)
        scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1)
        if self.dropout > 0 and self.training:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], self.embed_dim)
        if not self.batch_first:
            out = out.transpose(0, 1)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(batch_dim)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        for name, tensor, size in (
            ("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)
        ):
            if tensor.shape[-1] != size:
                raise ValueError(f"{name} must have {size} features, got shape {tuple(tensor.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key and value must agree in sequence and batch sizes, got {tuple(key.shape)} "
                f"and {tuple(value.shape)}"
            )
        batch_dim = 0 if self.batch_first else 1
        if query.dim() == 3 and query.shape[batch_dim] != key.shape[batch_dim]:
            raise ValueError(
                f"query and key must have the same batch size (dim {batch_dim}), got "
                f"{tuple(query.shape)} and {tuple(key.shape)}"
            )
        return query.dim() == 3

    def _split_heads(self, x: Tensor) -> Tensor:
        """``[B, T, E] -> [B, H, T, E/H]``."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _causal_mask(tgt_len: int, src_len: int, like: Tensor) -> Tensor:
        keep = torch.ones(tgt_len, src_len, dtype=torch.bool, device=like.device).tril()
        return torch.zeros(tgt_len, src_len, dtype=like.dtype, device=like.device).masked_fill(
            ~keep, float("-inf")
        )

    def _merged_mask(
        self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], q: Tensor,
        src_len: int, full_src_len: int,
    ) -> Optional[Tensor]:
        """Additive mask broadcastable to ``[B, H, L, S']`` (``None`` if no mask)."""
        batch, tgt_len = q.shape[0], q.shape[2]
        extra = full_src_len - src_len
        merged = None
        attn = _canonical_mask(attn_mask, "attn_mask", q.dtype)
        if attn is not None:
            if attn.dim() == 2 and tuple(attn.shape) == (tgt_len, src_len):
                attn = attn.reshape(1, 1, tgt_len, src_len)
            elif attn.dim() == 3 and tuple(attn.shape) == (batch * self.num_heads, tgt_len, src_len):
                attn = attn.reshape(batch, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(
                    f"attn_mask must have shape {(tgt_len, src_len)} or "
                    f"{(batch * self.num_heads, tgt_len, src_len)}, got {tuple(attn.shape)}"
                )
            merged = F.pad(attn, (0, extra))
        padding = _canonical_mask(key_padding_mask, "key_padding_mask", q.dtype)
        if padding is not None:
            if tuple(padding.shape) != (batch, src_len):
                raise ValueError(
                    f"key_padding_mask must have shape {(batch, src_len)}, got {tuple(padding.shape)}"
                )
            padding = F.pad(padding, (0, extra)).reshape(batch, 1, 1, full_src_len)
            merged = padding if merged is None else merged + padding
        return merged
