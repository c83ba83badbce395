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
from .ops.hybrid.cache import HybridCache, empty_hybrid_cache
from .ops.hybrid.checks import check_window
from .ops.hybrid.functions import BACKENDS as HYBRID_BACKENDS
from .ops.hybrid.functions import hybrid_attention, hybrid_attention_prefill, hybrid_attention_step
from .ops.taylor.naive import repeat_kv, zero_padded_keys
from .ops.taylor.state import TaylorState, accumulate_dtype, empty_state

__all__ = ["TaylorAttention", "TaylorAttentionCache", "HybridAttention", "HybridAttentionCache", "context_state"]


class TaylorAttentionCache(NamedTuple):
    """Decoding cache of one :class:`TaylorAttention` layer.

    state:  TaylorState (kv [B, H, M, Dv], k_sum [B, H, M]), float32 (float64 for float64 modules).
    frozen: True for cross-attention (a fixed context: ``step`` reads the state and never adds to it),
            False for causal self-attention (``step`` adds the new token's key and value first).
    """

    state: TaylorState
    frozen: bool


def context_state(k: torch.Tensor, v: torch.Tensor, *, scale: float, key_padding_mask=None, backend: str = "auto") -> TaylorState:
    """The Taylor state of a whole context: ``kv = sum_j phi(k_j) v_j^T``, ``k_sum = sum_j phi(k_j)``.

    ``k [B, H, L, D]``, ``v [B, H, L, Dv]``; padded keys (``key_padding_mask [B, L]`` True) are left out. The fused
    kernels' state of keys alone (a call without queries)."""
    q = k.new_empty(k.shape[0], k.shape[1], 0, k.shape[-1])
    _, state = taylor_attention(q, k, v, scale=scale, key_padding_mask=key_padding_mask, return_state=True,
                                backend=backend)
    return state


def _read_state(q: torch.Tensor, state: TaylorState, scale: float, backend: str = "auto") -> torch.Tensor:
    """``phi(q)^T kv / phi(q)^T k_sum`` for ``q [B, H, D]`` (0 where the state is empty; a GQA state has Hkv heads):
    the fused kernels' attention of one query to a state and no key."""
    b, hk, m, dv = state.kv.shape
    k = q.new_empty(b, hk, 0, q.shape[-1])
    out = taylor_attention(q.unsqueeze(2), k, q.new_empty(b, hk, 0, dv), scale=scale, initial_state=state,
                           enable_gqa=hk != q.shape[1], backend=backend)
    return out[:, :, 0]


class TaylorAttention(nn.Module):
    """Multi-head Taylor attention: ``out = W_o concat_h TaylorAttn(W_q x, W_k c, W_v c)``.

    Args:
        embed_dim: model width E (queries, values and output).
        num_heads: H; E must be divisible by H (head dim ``E // H`` for values).
        num_kv_heads: Hkv key/value heads (grouped-query attention, H % Hkv == 0: query head h reads key/value
            head h // (H // Hkv)); default H. The decoding state has Hkv heads (H / Hkv times smaller).
        context_dim: width of the context for cross-attention (default E).
        feature_dim: project q and k to this many dims per head (Based uses 16); default the head dim.
            The state has ``M = 1 + D + D(D+1)/2`` features for ``D = feature_dim``.
        bias: bias of the query, value and output projections (the key projection has none).
        scale: logit scale, default ``1/sqrt(feature_dim or head_dim)`` (see the module docstring).
        backend: linattn_cuda backend for the full-sequence forward ("auto", "reference", "cpu", ...).
        context_parallel: None, True (the default process group) or a torch.distributed process group: the
            self-attention input ``x`` is this rank's contiguous shard of a sequence sharded across the group
            (:mod:`linattn_cuda.distributed`); also settable later with ``enable_context_parallel(model)``.

    Call: ``forward(x [B, Lq, E], context [B, Lk, Ec] = None, *, causal=False,
    key_padding_mask [B, Lk] bool (True = padding) = None) -> [B, Lq, E]``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: Optional[int] = None,
        context_dim: Optional[int] = None,
        feature_dim: Optional[int] = None,
        bias: bool = True,
        scale: Optional[float] = None,
        backend: str = "auto",
        context_parallel=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must be a positive divisor of num_heads ({num_heads})")
        self.num_kv_heads = num_kv_heads
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
        self.key = nn.Linear(context_dim, num_kv_heads * self.qk_dim, bias=False, **kw)
        self.value = nn.Linear(context_dim, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.context_parallel = None
        if context_parallel is not None:
            from .distributed.modules import check_context_parallel

            self.context_parallel = check_context_parallel(context_parallel)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, qk_dim={self.qk_dim}, scale={self.scale:.4g}, backend={self.backend!r}"

    def _heads(self, x: torch.Tensor, heads: Optional[int] = None) -> torch.Tensor:  # [B, L, H*d] -> [B, H, L, d]
        b, length, _ = x.shape
        return x.view(b, length, heads or self.num_heads, -1).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B, L, H*d]
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, -1)

    def forward(self, x, context=None, *, causal: bool = False, key_padding_mask=None):
        if self.context_parallel is not None:
            from .distributed.modules import taylor_forward_cp

            return taylor_forward_cp(self, x, context, causal=causal, key_padding_mask=key_padding_mask)
        src = x if context is None else context
        hk = self.num_kv_heads
        q, k, v = self._heads(self.query(x)), self._heads(self.key(src), hk), self._heads(self.value(src), hk)
        out = taylor_attention(
            q, k, v, causal=causal, scale=self.scale, key_padding_mask=key_padding_mask,
            enable_gqa=hk != self.num_heads, backend=self.backend,
        )
        return self.out(self._merge(out))

    def init_cache(self, batch_size: Optional[int] = None, context=None, key_padding_mask=None) -> TaylorAttentionCache:
        """An empty causal self-attention cache (``batch_size``) or a cross-attention cache (``context``)."""
        if context is None:
            if batch_size is None:
                raise ValueError("init_cache needs batch_size (self-attention) or context (cross-attention)")
            w = self.value.weight
            state = empty_state(
                batch_size, self.num_kv_heads, self.qk_dim, self.head_dim, dtype=accumulate_dtype(w.dtype),
                device=w.device,
            )
            return TaylorAttentionCache(state, frozen=False)
        k, v = self._heads(self.key(context), self.num_kv_heads), self._heads(self.value(context), self.num_kv_heads)
        return TaylorAttentionCache(
            context_state(k, v, scale=self.scale, key_padding_mask=key_padding_mask, backend=self.backend), frozen=True
        )

    def step(self, x: torch.Tensor, cache: TaylorAttentionCache):
        """One decoding step: ``x [B, 1, E]`` (or ``[B, E]``) -> ``(out of x's shape, new cache)``."""
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"x must have shape [B, 1, E] or [B, E], got {tuple(x.shape)}")
        q = self._heads(self.query(x))[:, :, 0]
        if cache.frozen:
            out, new = _read_state(q, cache.state, self.scale, self.backend), cache
        else:
            hk = self.num_kv_heads
            k, v = self._heads(self.key(x), hk)[:, :, 0], self._heads(self.value(x), hk)[:, :, 0]
            out, state = taylor_attention_step(
                q, k, v, cache.state, scale=self.scale, enable_gqa=hk != self.num_heads, backend=self.backend
            )
            new = TaylorAttentionCache(state, frozen=False)
        out = self.out(out.reshape(out.shape[0], 1, -1))
        return (out[:, 0] if squeeze else out), new


class HybridAttentionCache(NamedTuple):
    """Decoding cache of one :class:`HybridAttention` layer (causal self-attention); its size never grows and
    ``step`` updates it in place.

    attn: HybridCache (linattn_cuda.ops.hybrid.cache): ring buffer of the last W - 1 keys and values (Hkv heads),
          the Taylor state of the keys before them, the position of each row.
    conv: [B, conv_size - 1, C] the last projected q/k/v rows of the short convolution (None without one).
    """

    attn: HybridCache
    conv: Optional[torch.Tensor]


class HybridAttention(TaylorAttention):
    """Multi-head hybrid attention: exact softmax weights over the last ``window`` keys, the Taylor weight
    ``1 + s + s^2/2`` beyond them, one normalizer (see :mod:`linattn_cuda.ops.hybrid`); linear cost in the length,
    fixed-size decoding cache (``window`` keys and values plus the Taylor state).

    Takes the arguments of :class:`TaylorAttention` (``feature_dim`` defaults to 16 here, as in Based) and

        window:      keys with softmax weights (the query's own and the ``window - 1`` before it; non-causal
                     self-attention: ``|i - j| < window``).
        conv_size:   > 0 adds a short causal depthwise convolution (kernel ``conv_size``) over the projected
                     q, k and v of self-attention (the "short convolution" of Based and of many linear-attention
                     models); 0 = none.
        learn_scale: a learnable per-head temperature multiplying the logits (initialized to 1).
        learn_far_weight: a learnable per-head weight multiplying the Taylor weights of the keys beyond the
                     window (initialized to 1), so that a head can learn how much distant context to mix in.

    Cross-attention (``context`` given) has no positions to window: it is Taylor attention over the context,
    with :class:`TaylorAttention`'s cache. Call convention and caches as :class:`TaylorAttention`; besides,
    ``out, cache = attn.prefill(x, key_padding_mask=None)`` runs a prompt in one fused call and returns the cache
    that ``attn.step(x_t, cache, key_padding_mask=None)`` continues (in place). ``backend``: "auto", "cpu",
    "triton" or "reference" (see :func:`linattn_cuda.hybrid_attention`).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        window: int = 64,
        feature_dim: Optional[int] = 16,
        conv_size: int = 0,
        learn_scale: bool = False,
        learn_far_weight: bool = False,
        num_kv_heads: Optional[int] = None,
        context_dim: Optional[int] = None,
        bias: bool = True,
        scale: Optional[float] = None,
        backend: str = "auto",
        context_parallel=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, context_dim=context_dim, feature_dim=feature_dim,
            bias=bias, scale=scale, backend=backend, context_parallel=context_parallel, device=device, dtype=dtype,
        )
        self.window = check_window(window)
        if backend not in HYBRID_BACKENDS:
            raise ValueError(f"HybridAttention backend must be one of {list(HYBRID_BACKENDS)}, got {backend!r}")
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 0:
            raise ValueError(f"conv_size must be an int >= 0 (0 = no short convolution), got {conv_size!r}")
        self.conv_size = conv_size
        kw = {"device": device, "dtype": dtype}
        channels = num_heads * self.qk_dim + self.num_kv_heads * (self.qk_dim + self.head_dim)
        self.conv = nn.Conv1d(channels, channels, conv_size, groups=channels, **kw) if conv_size else None
        self.log_temperature = nn.Parameter(torch.zeros(num_heads, **kw)) if learn_scale else None
        self.log_far_weight = nn.Parameter(torch.zeros(num_heads, **kw)) if learn_far_weight else None

    def extra_repr(self) -> str:
        extra = (f", window={self.window}, conv_size={self.conv_size}, learn_scale={self.log_temperature is not None}"
                 f", learn_far_weight={self.log_far_weight is not None}")
        return super().extra_repr() + extra

    def _far_weight(self):
        return None if self.log_far_weight is None else self.log_far_weight.exp()

    def _temperature(self, q: torch.Tensor) -> torch.Tensor:  # q [B, H, ..., d]
        if self.log_temperature is None:
            return q
        t = self.log_temperature.exp().to(q.dtype)
        return q * t.view(1, -1, *([1] * (q.dim() - 2)))

    def _qkv(self, x: torch.Tensor, key_padding_mask=None, conv_history=None):
        """Projected q, k, v ``[B, L, H*d]`` of self-attention, through the short convolution if there is one.
        Returns (q, k, v, the last conv_size - 1 projected rows for the next step or None)."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.conv is None:
            return q, k, v, None
        y = torch.cat([q, k, v], dim=-1)  # [B, L, C]
        if key_padding_mask is not None:  # padded positions add nothing to their neighbours
            y = y.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        if conv_history is None:
            conv_history = y.new_zeros(y.shape[0], self.conv_size - 1, y.shape[-1])
        y = torch.cat([conv_history, y], dim=1)
        history = y[:, y.shape[1] - (self.conv_size - 1):]
        y = self.conv(y.transpose(1, 2)).transpose(1, 2)
        hq, hk = self.num_heads * self.qk_dim, self.num_kv_heads * self.qk_dim
        return y[..., :hq], y[..., hq : hq + hk], y[..., hq + hk :], history

    def forward(self, x, context=None, *, causal: bool = False, key_padding_mask=None):
        if self.context_parallel is not None:
            from .distributed.modules import hybrid_forward_cp

            return hybrid_forward_cp(self, x, context, causal=causal, key_padding_mask=key_padding_mask)
        if context is not None:
            if self.conv is not None:
                raise ValueError("conv_size > 0 applies to self-attention; HybridAttention got a context (cross-attention)")
            hk = self.num_kv_heads
            q, k, v = self._heads(self.query(x)), self._heads(self.key(context), hk), self._heads(self.value(context), hk)
            out = taylor_attention(
                self._temperature(q), k, v, scale=self.scale, key_padding_mask=key_padding_mask,
                enable_gqa=hk != self.num_heads, backend=self.backend,
            )
            return self.out(self._merge(out))
        q, k, v, _ = self._qkv(x, key_padding_mask)
        hk = self.num_kv_heads
        q, k, v = self._temperature(self._heads(q)), self._heads(k, hk), self._heads(v, hk)
        out = hybrid_attention(
            q, k, v, window=self.window, causal=causal, scale=self.scale, key_padding_mask=key_padding_mask,
            far_weight=self._far_weight(), enable_gqa=hk != self.num_heads, backend=self.backend,
        )
        return self.out(self._merge(out))

    def init_cache(self, batch_size: Optional[int] = None, context=None, key_padding_mask=None):
        """An empty causal self-attention cache (``batch_size``), or a cross-attention cache (``context``)."""
        if context is not None:
            if self.conv is not None:
                raise ValueError("conv_size > 0 applies to self-attention; init_cache got a context (cross-attention)")
            return super().init_cache(context=context, key_padding_mask=key_padding_mask)
        if batch_size is None:
            raise ValueError("init_cache needs batch_size (self-attention) or context (cross-attention)")
        w = self.value.weight
        attn = empty_hybrid_cache(batch_size, self.num_kv_heads, self.qk_dim, self.head_dim, self.window,
                                  dtype=accumulate_dtype(w.dtype), device=w.device)
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch_size, self.conv_size - 1, self.conv.in_channels, dtype=w.dtype, device=w.device)
        return HybridAttentionCache(attn, conv)

    def prefill(self, x: torch.Tensor, key_padding_mask=None):
        """Causal self-attention over a prompt ``x [B, L, E]`` in one fused call: ``(out [B, L, E], cache)``, the
        cache ready for :meth:`step`. ``key_padding_mask [B, L]`` (True = padding; e.g. a left-padded batch)."""
        q, k, v, conv = self._qkv(x, key_padding_mask)
        hk = self.num_kv_heads
        q, k, v = self._temperature(self._heads(q)), self._heads(k, hk), self._heads(v, hk)
        out, attn = hybrid_attention_prefill(
            q, k, v, window=self.window, scale=self.scale, key_padding_mask=key_padding_mask,
            far_weight=self._far_weight(), enable_gqa=hk != self.num_heads, backend=self.backend,
        )
        return self.out(self._merge(out)), HybridAttentionCache(attn, conv)

    def step(self, x: torch.Tensor, cache, key_padding_mask=None):
        """One decoding step: ``x [B, 1, E]`` (or ``[B, E]``) -> ``(out of x's shape, cache)``; the cache is updated
        in place. ``key_padding_mask [B]``: True where a row's token is padding (it never enters the cache).
        O(window * d + M * Dv) per token whatever the number of tokens before it."""
        if isinstance(cache, TaylorAttentionCache):  # cross-attention: Taylor attention over a fixed context
            if self.log_temperature is not None:
                return self._step_cross_with_temperature(x, cache)
            return super().step(x, cache)
        if not isinstance(cache, HybridAttentionCache):
            raise TypeError(f"cache must be a HybridAttentionCache from init_cache or prefill, got {type(cache).__name__}")
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"x must have shape [B, 1, E] or [B, E], got {tuple(x.shape)}")
        pad = None if key_padding_mask is None else key_padding_mask.reshape(-1)
        q, k, v, conv = self._qkv(x, None if pad is None else pad[:, None], conv_history=cache.conv)
        if conv is not None:
            cache.conv.copy_(conv)
        hk = self.num_kv_heads
        q = self._temperature(self._heads(q)[:, :, 0])
        k, v = self._heads(k, hk)[:, :, 0], self._heads(v, hk)[:, :, 0]
        out, _ = hybrid_attention_step(
            q, k, v, cache.attn, key_padding_mask=pad, scale=self.scale, far_weight=self._far_weight(),
            enable_gqa=hk != self.num_heads, backend=self.backend,
        )
        out = self.out(out.reshape(out.shape[0], 1, -1))
        return (out[:, 0] if squeeze else out), cache

    def _step_cross_with_temperature(self, x, cache: TaylorAttentionCache):
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        q = self._temperature(self._heads(self.query(x)))[:, :, 0]
        out = _read_state(q, cache.state, self.scale)
        out = self.out(out.reshape(out.shape[0], 1, -1))
        return (out[:, 0] if squeeze else out), cache
