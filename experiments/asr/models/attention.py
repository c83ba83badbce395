"""Attention modules of the experiment: the course's softmax MHA and linattn_cuda's Taylor MHA, one interface.

Both take ``(embed_dim, num_heads, *, context_dim=None, feature_dim=None, bias=True, scale=None)`` and are
called as ``attn(x, context=None, *, causal=False, key_padding_mask=None)``; both decode incrementally with
``cache = attn.init_cache(batch_size=B)`` (self) or ``attn.init_cache(context=memory)`` (cross) and
``out_t, cache = attn.step(x_t, cache)``. :func:`build_attention` switches between them by name; it also
builds ``"hybrid"``, :class:`linattn_cuda.nn.HybridAttention` (exact softmax over the last ``window`` keys of a
causal self-attention, Taylor weight beyond, one normalizer; Taylor attention over a context).

The softmax module is the course's (Whisper's) MHA: query/value/output projections with bias, key
projection without, q and k each multiplied by ``d^(-1/4)`` (``d`` = q/k dim per head), softmax in
float32. With ``scale`` given, q and k are each multiplied by ``sqrt(scale)``: the logit is ``scale * q.k``
in both modules.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from linattn_cuda.feature_map import resolve_scale
from linattn_cuda.nn import TaylorAttention

__all__ = ["SoftmaxAttention", "KVCache", "build_attention", "hybrid_attention_class", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("softmax", "taylor")


class KVCache(NamedTuple):
    """Keys/values ``[B, H, L, d]`` seen so far (self-attention) or of the whole context (cross, frozen).

    Keys are stored already multiplied by ``sqrt(scale)``, so a step scales only its query.
    """

    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    frozen: bool


class SoftmaxAttention(nn.Module):
    """The course's multi-head softmax attention (see the module docstring)."""

    def __init__(self, embed_dim: int, num_heads: int, *, context_dim: Optional[int] = None, feature_dim: Optional[int] = None,
                 bias: bool = True, scale: Optional[float] = None, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.qk_dim = feature_dim or self.head_dim
        self.scale = resolve_scale(scale, self.qk_dim)
        context_dim = context_dim or embed_dim
        self.query = nn.Linear(embed_dim, num_heads * self.qk_dim, bias=bias, **kw)
        self.key = nn.Linear(context_dim, num_heads * self.qk_dim, bias=False, **kw)
        self.value = nn.Linear(context_dim, embed_dim, bias=bias, **kw)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, -1).transpose(1, 2)

    def _attend(self, q, k, v, *, causal: bool, key_padding_mask, k_scaled: bool = False) -> torch.Tensor:
        c = self.scale**0.5
        logits = (q * c) @ (k if k_scaled else k * c).transpose(-1, -2)
        lq, lk = logits.shape[-2:]
        masked = None
        if causal:
            masked = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :]
            masked = pad if masked is None else (masked | pad)
        logits = logits.float()
        if masked is not None:
            logits = logits.masked_fill(masked, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        if masked is not None:  # a query that sees no key: 0, not NaN (as linattn_cuda does)
            w = torch.nan_to_num(w, nan=0.0)
        out = w.to(v.dtype) @ v
        b, _, length, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(b, length, -1))

    def forward(self, x, context=None, *, causal: bool = False, key_padding_mask=None):
        src = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(src)), self._heads(self.value(src))
        return self._attend(q, k, v, causal=causal, key_padding_mask=key_padding_mask)

    def init_cache(self, batch_size: Optional[int] = None, context=None, key_padding_mask=None) -> KVCache:
        if context is None:
            if batch_size is None:
                raise ValueError("init_cache needs batch_size (self-attention) or context (cross-attention)")
            w = self.value.weight
            empty = w.new_zeros(batch_size, self.num_heads, 0, self.head_dim)
            return KVCache(w.new_zeros(batch_size, self.num_heads, 0, self.qk_dim), empty, None, frozen=False)
        k = self._heads(self.key(context)) * self.scale**0.5
        return KVCache(k, self._heads(self.value(context)), key_padding_mask, frozen=True)

    def step(self, x: torch.Tensor, cache: KVCache):
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        q = self._heads(self.query(x))
        if not cache.frozen:
            k = torch.cat([cache.k, (self._heads(self.key(x)) * self.scale**0.5).to(cache.k.dtype)], dim=2)
            v = torch.cat([cache.v, self._heads(self.value(x)).to(cache.v.dtype)], dim=2)
            cache = KVCache(k, v, None, frozen=False)
        out = self._attend(q, cache.k, cache.v, causal=False, key_padding_mask=cache.key_padding_mask, k_scaled=True)
        return (out[:, 0] if squeeze else out), cache


def hybrid_attention_class():
    """:class:`linattn_cuda.nn.HybridAttention`, or an ImportError that says what is missing."""
    try:
        from linattn_cuda.nn import HybridAttention
    except ImportError as e:
        raise ImportError("attention 'hybrid' needs linattn_cuda.nn.HybridAttention, which this linattn_cuda does not have") from e
    return HybridAttention


def build_attention(kind: str, embed_dim: int, num_heads: int, *, context_dim: Optional[int] = None,
                    feature_dim: Optional[int] = None, window: int = 64, backend: str = "auto") -> nn.Module:
    """``"softmax"`` -> :class:`SoftmaxAttention`, ``"taylor"`` -> :class:`linattn_cuda.nn.TaylorAttention`,
    ``"hybrid"`` -> :class:`linattn_cuda.nn.HybridAttention` (``window``: keys of its exact softmax part).

    ``feature_dim``: q/k dims per head (``None``: the head dim), for every kind.
    """
    if kind == "softmax":
        return SoftmaxAttention(embed_dim, num_heads, context_dim=context_dim, feature_dim=feature_dim)
    if kind == "taylor":
        return TaylorAttention(embed_dim, num_heads, context_dim=context_dim, feature_dim=feature_dim, backend=backend)
    if kind == "hybrid":
        return hybrid_attention_class()(embed_dim, num_heads, window=window, feature_dim=feature_dim, context_dim=context_dim,
                                        backend=backend)
    raise ValueError(f"unknown attention kind {kind!r}; choose one of {ATTENTION_KINDS + ('hybrid',)}")
