"""SplitMultiheadAttention: nn.MultiheadAttention with its q, k, v and output projections as layers of their own.

nn.MultiheadAttention keeps q, k and v in one packed `in_proj_weight` that its forward
reads directly, so no projection can be put in SVD form in place. This module computes
the same function with four child modules (`q_proj`, `k_proj`, `v_proj`, `out_proj`),
each anything that maps (…, in) to (…, out): nn.Linear, SVDLinear, or the thin pair
`export` makes of it. Its forward is plain PyTorch (F.scaled_dot_product_attention), so an
exported model runs, and exports to ONNX and torch.export, like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def attention_unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why `mha` cannot be split, or None."""
    if mha.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    if type(mha).forward is not nn.MultiheadAttention.forward:
        return f"{type(mha).__name__} overrides forward; its behaviour would be lost"
    return None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) as the float mask added to the scores; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with separate q, k, v and output projections (`q_proj` … `out_proj`).

    Same arguments, inputs and outputs as nn.MultiheadAttention (batch_first or not, unbatched inputs,
    kdim/vdim, bias or not, key_padding_mask, attn_mask, need_weights, average_attn_weights); add_bias_kv
    and add_zero_attn are not supported. `decompose_` puts a model's nn.MultiheadAttention layers in this
    form, so that each projection can be trained in SVD form; `export` turns one whose projections all
    stayed dense back into nn.MultiheadAttention.

    Example:
        >>> split = SplitMultiheadAttention.from_dense(nn.MultiheadAttention(64, 4, batch_first=True))
        >>> split.q_proj
        Linear(in_features=64, out_features=64, bias=True)
    """

    # nn.TransformerEncoder(Layer) read these to decide on their fused fast path, which needs one packed weight:
    # this module has none, so they take the ordinary path, which calls this forward.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False, device=None,
                 dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """The same attention as `mha` (packed or separate q/k/v weights); `mha` is not modified."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"SplitMultiheadAttention.from_dense expects nn.MultiheadAttention, got {type(mha).__name__}")
        reason = attention_unsupported(mha)
        if reason:
            raise ValueError(f"cannot split this MultiheadAttention: {reason}")
        weight = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, device=weight.device, dtype=weight.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight.copy_(w)
            if b is not None:
                proj.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    @torch.no_grad()
    def to_dense(self) -> nn.MultiheadAttention:
        """An nn.MultiheadAttention computing the same function; every projection must have a `.weight`
        (nn.Linear or SVDLinear, not a thin pair)."""
        projections = [getattr(self, name) for name in PROJECTIONS]
        if not all(isinstance(getattr(p, "weight", None), torch.Tensor) for p in projections):
            raise TypeError("to_dense needs every projection as one layer with a weight (nn.Linear or SVDLinear)")
        q, k, v, out = projections
        bias = out.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias, kdim=self.kdim,
                                    vdim=self.vdim, batch_first=self.batch_first, device=out.weight.device,
                                    dtype=out.weight.dtype)
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        else:
            mha.q_proj_weight.copy_(q.weight)
            mha.k_proj_weight.copy_(k.weight)
            mha.v_proj_weight.copy_(v.weight)
        mha.out_proj.weight.copy_(out.weight)
        if bias:
            mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            mha.out_proj.bias.copy_(out.bias)
        return mha.train(self.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:  # as nn.MultiheadAttention: is_causal is a hint about attn_mask
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
        heads, dim = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(batch, length, heads, dim).transpose(1, 2)
        k = self.k_proj(key).reshape(batch, source, heads, dim).transpose(1, 2)
        v = self.v_proj(value).reshape(batch, source, heads, dim).transpose(1, 2)

        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (batch · heads, L, S)
            mask = mask.reshape(batch, heads, length, source)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.reshape(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * dim ** -0.5
            weights = (scores if mask is None else scores + mask).softmax(-1)
            if dropout:
                weights = F.dropout(weights, dropout)
            attended = weights @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(attended.transpose(1, 2).reshape(batch, length, heads * dim))

        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")
