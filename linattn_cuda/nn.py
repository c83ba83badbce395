"""torch.nn modules built on Taylor attention.

:class:`TaylorAttention` is multi-head attention with the second-order Taylor kernel
``w = 1 + s + s^2/2`` in place of ``exp(s)``. One module serves as

* causal self-attention (``attn(x, causal=True)``),
* non-causal self- or cross-attention (``attn(x)``, ``attn(x, context)``), with a key padding mask,
* incremental decoding through a recurrent state cache, O(M * Dv) per token whatever the context length::

      cache = attn.init_cache(batch_size=B)                 # causal self-attention: empty state
      cache = attn.init_cache(context=memory)               # cross-attention: the context summarized once
      out_t, cache = attn.step(x_t, cache)                  # x_t: [B, 1, E]

Scale. ``scale`` is the factor of the logit ``s = scale * q.k`` (per head). Its default ``1/sqrt(d_qk)``
(``d_qk`` = ``feature_dim`` or the head dim) makes ``s`` exactly the logit of a softmax attention that
multiplies q and k by ``d_qk^(-1/4)`` each (the Whisper/course convention), so the Taylor module
computes the second-order expansion of the same ``exp(s)`` a softmax module with the same weights
would use.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .api import taylor_attention, taylor_attention_step
from .feature_map import resolve_scale, taylor_feature_map
from .reference import TaylorState, accumulate_dtype, empty_state, zero_padded_keys

__all__ = ["TaylorAttention", "TaylorAttentionCache", "context_state"]


class TaylorAttentionCache(NamedTuple):
    """Decoding cache of one :class:`TaylorAttention` layer.

    state:  TaylorState (kv [B, H, M, Dv], k_sum [B, H, M]), float32 (float64 for float64 modules).
    frozen: True for cross-attention (a fixed context: ``step`` reads the state and never adds to it),
            False for causal self-attention (``step`` adds the new token's key and value first).
    """

    state: TaylorState
    frozen: bool


def context_state(k: torch.Tensor, v: torch.Tensor, *, scale: float, key_padding_mask=None) -> TaylorState:
    """The Taylor state of a whole context: ``kv = sum_j phi(k_j) v_j^T``, ``k_sum = sum_j phi(k_j)``.

    ``k [B, H, L, D]``, ``v [B, H, L, Dv]``; padded keys (``key_padding_mask [B, L]`` True) are left out.
    """
    acc = accumulate_dtype(k.dtype)
    k, v = zero_padded_keys(k.to(acc), v.to(acc), key_padding_mask)
    fk = taylor_feature_map(k, scale)
    if key_padding_mask is not None:
        fk = fk * (~key_padding_mask).to(acc)[:, None, :, None]  # phi(0) = [1, 0, ...]: drop the constant too
    return TaylorState(torch.matmul(fk.transpose(-1, -2), v), fk.sum(-2))


def _read_state(q: torch.Tensor, state: TaylorState, scale: float) -> torch.Tensor:
    """``phi(q)^T kv / phi(q)^T k_sum`` for ``q [B, H, D]`` (0 where the state is empty)."""
    fq = taylor_feature_map(q.to(state.kv.dtype), scale)
    num = torch.einsum("bhm,bhmv->bhv", fq, state.kv)
    den = torch.einsum("bhm,bhm->bh", fq, state.k_sum)
    ok = den != 0
    out = num / torch.where(ok, den, torch.ones_like(den)).unsqueeze(-1)
    return torch.where(ok.unsqueeze(-1), out, torch.zeros_like(out)).to(q.dtype)


class TaylorAttention(nn.Module):
    """Multi-head Taylor attention: ``out = W_o concat_h TaylorAttn(W_q x, W_k c, W_v c)``.

    Args:
        embed_dim: model width E (queries, values and output).
        num_heads: H; E must be divisible by H (head dim ``E // H`` for values).
        context_dim: width of the context for cross-attention (default E).
        feature_dim: project q and k to this many dims per head (Based uses 16); default the head dim.
            The state has ``M = 1 + D + D(D+1)/2`` features for ``D = feature_dim``.
        bias: bias of the query, value and output projections (the key projection has none).
        scale: logit scale, default ``1/sqrt(feature_dim or head_dim)`` (see the module docstring).
        backend: linattn_cuda backend for the full-sequence forward ("auto", "reference", "cpu", ...).

    Call: ``forward(x [B, Lq, E], context [B, Lk, Ec] = None, *, causal=False,
    key_padding_mask [B, Lk] bool (True = padding) = None) -> [B, Lq, E]``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        context_dim: Optional[int] = None,
        feature_dim: Optional[int] = None,
        bias: bool = True,
        scale: Optional[float] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int or None, got {feature_dim}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.qk_dim = feature_dim or self.head_dim
        self.feature_dim = feature_dim
        self.scale = resolve_scale(scale, self.qk_dim)
        self.backend = backend
        context_dim = context_dim or embed_dim
        self.query = nn.Linear(embed_dim, num_heads * self.qk_dim, bias=bias, **kw)
        self.key = nn.Linear(context_dim, num_heads * self.qk_dim, bias=False, **kw)
        self.value = nn.Linear(context_dim, embed_dim, bias=bias, **kw)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, qk_dim={self.qk_dim}, scale={self.scale:.4g}, backend={self.backend!r}"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H*d] -> [B, H, L, d]
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, -1).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B, L, H*d]
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, -1)

    def forward(self, x, context=None, *, causal: bool = False, key_padding_mask=None):
        src = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(src)), self._heads(self.value(src))
        out = taylor_attention(
            q, k, v, causal=causal, scale=self.scale, key_padding_mask=key_padding_mask, backend=self.backend
        )
        return self.out(self._merge(out))

    def init_cache(self, batch_size: Optional[int] = None, context=None, key_padding_mask=None) -> TaylorAttentionCache:
        """An empty causal self-attention cache (``batch_size``) or a cross-attention cache (``context``)."""
        if context is None:
            if batch_size is None:
                raise ValueError("init_cache needs batch_size (self-attention) or context (cross-attention)")
            w = self.value.weight
            state = empty_state(
                batch_size, self.num_heads, self.qk_dim, self.head_dim, dtype=accumulate_dtype(w.dtype), device=w.device
            )
            return TaylorAttentionCache(state, frozen=False)
        k, v = self._heads(self.key(context)), self._heads(self.value(context))
        return TaylorAttentionCache(context_state(k, v, scale=self.scale, key_padding_mask=key_padding_mask), frozen=True)

    def step(self, x: torch.Tensor, cache: TaylorAttentionCache):
        """One decoding step: ``x [B, 1, E]`` (or ``[B, E]``) -> ``(out of x's shape, new cache)``."""
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"x must have shape [B, 1, E] or [B, E], got {tuple(x.shape)}")
        q = self._heads(self.query(x))[:, :, 0]
        if cache.frozen:
            out, new = _read_state(q, cache.state, self.scale), cache
        else:
            k, v = self._heads(self.key(x))[:, :, 0], self._heads(self.value(x))[:, :, 0]
            out, state = taylor_attention_step(q, k, v, cache.state, scale=self.scale, backend=self.backend)
            new = TaylorAttentionCache(state, frozen=False)
        out = self.out(out.reshape(out.shape[0], 1, -1))
        return (out[:, 0] if squeeze else out), new
