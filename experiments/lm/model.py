"""The language model: byte embedding (+ learned positions) -> pre-LN blocks -> LayerNorm -> byte logits.

Block: ``x = x + Attn(LN x)``, ``x = x + MLP(LN x)`` with ``MLP = Linear(W, 4W) -> GELU -> Linear(4W, W)``.
The head is tied to the byte embedding by default (``tie_head``). Every ``nn.Linear`` and ``nn.Embedding``
of every kind gets the same initialization (normal, std 0.02; biases 0; the two residual output projections
of each block std ``0.02 / sqrt(2 * layers)``); parameters of other types keep their module's own init.

Attention kinds (one interface: ``attn(x, causal=True)``, ``cache = attn.init_cache(batch_size=B)``,
``out_t, cache = attn.step(x_t [B, 1, W], cache)``; the kinds with ``out, cache = attn.prefill(x [B, L, W])``
take a whole prompt in one call, the others step through it, see :meth:`LanguageModel.prefill`):

* ``softmax``: :class:`SoftmaxAttention`, ``scaled_dot_product_attention(is_causal=True)``; the decoding cache
  holds every key and value so far (grows with the context).
* ``taylor``: :class:`linattn_cuda.nn.TaylorAttention` (q/k projected to ``feature_dim`` per head); the cache
  is the recurrent state ``(kv [B, H, M, Dv], k_sum [B, H, M])``, fixed size.
* ``hybrid``: :class:`linattn_cuda.nn.HybridAttention` (exp inside a sliding window of keys, the Taylor weight
  beyond it, one normalizer); the cache is a ring buffer of the last ``window - 1`` keys/values plus the Taylor
  state, fixed size, updated in place; a prompt is prefilled in one fused call.

Both projections layouts follow TaylorAttention: q, v and output projections with bias, the key projection
without. Positions: ``pos="learned"`` adds a learned ``[context, W]`` table (a parameter, not a cache:
decoding stays O(1) in memory for taylor/hybrid, but cannot run past ``context`` positions); ``pos="none"``
adds nothing (order comes from causality alone, plus the hybrid's window and convolution), with no length limit.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import VOCAB_SIZE

__all__ = ["ATTENTION_KINDS", "ModelConfig", "SoftmaxAttention", "KVCache", "LanguageModel", "LMCache",
           "build_attention", "hybrid_available", "count_parameters", "cache_numel"]

ATTENTION_KINDS = ("softmax", "taylor", "hybrid")
POSITIONS = ("learned", "none")


def hybrid_available() -> bool:
    try:
        from linattn_cuda.nn import HybridAttention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ModelConfig:
    attention: str = "softmax"
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    context: int = 256
    pos: str = "learned"
    tie_head: bool = True
    # softmax: q/k dims per head (None = head dim)
    qk_dim: Optional[int] = None
    # taylor / hybrid
    feature_dim: Optional[int] = 16
    backend: str = "auto"
    # hybrid only: keyword options of HybridAttention (window, conv_size, learn_scale, ...)
    hybrid: dict = field(default_factory=lambda: {"window": 64})

    def as_dict(self) -> dict:
        return asdict(self)


class KVCache(NamedTuple):
    """Softmax decoding cache: keys ``[B, H, L, d_qk]`` and values ``[B, H, L, d]`` of every token so far."""

    k: torch.Tensor
    v: torch.Tensor


class SoftmaxAttention(nn.Module):
    """Multi-head causal softmax self-attention with TaylorAttention's projection layout and logit scale.

    ``q, v, out`` projections with bias, ``k`` without; q/k have ``qk_dim`` dims per head (default the head
    dim); logit ``scale * q.k`` with ``scale = 1/sqrt(qk_dim)``; computed by
    ``torch.nn.functional.scaled_dot_product_attention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, qk_dim: Optional[int] = None, bias: bool = True,
                 scale: Optional[float] = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.qk_dim = qk_dim or self.head_dim
        self.scale = scale if scale is not None else self.qk_dim ** -0.5
        self.query = nn.Linear(embed_dim, num_heads * self.qk_dim, bias=bias)
        self.key = nn.Linear(embed_dim, num_heads * self.qk_dim, bias=False)
        self.value = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H*d] -> [B, H, L, d]
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, -1).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B, L, H*d]
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, -1)

    def forward(self, x: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale)
        return self.out(self._merge(out))

    def init_cache(self, batch_size: int) -> KVCache:
        w = self.value.weight
        empty = dict(dtype=w.dtype, device=w.device)
        return KVCache(torch.empty(batch_size, self.num_heads, 0, self.qk_dim, **empty),
                       torch.empty(batch_size, self.num_heads, 0, self.head_dim, **empty))

    def prefill(self, x: torch.Tensor):
        """A prompt ``x [B, L, E]`` in one call: ``(out [B, L, E], the cache of its keys and values)``."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.out(self._merge(out)), KVCache(k, v)

    def step(self, x: torch.Tensor, cache: KVCache):
        """``x [B, 1, E]`` -> ``(out [B, 1, E], cache with x's key and value appended)``."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        cache = KVCache(torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2))
        out = F.scaled_dot_product_attention(q, cache.k, cache.v, scale=self.scale)  # the new token sees every key
        return self.out(self._merge(out)), cache


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "softmax":
        return SoftmaxAttention(cfg.width, cfg.heads, qk_dim=cfg.qk_dim)
    if cfg.attention == "taylor":
        from linattn_cuda.nn import TaylorAttention

        return TaylorAttention(cfg.width, cfg.heads, feature_dim=cfg.feature_dim, backend=cfg.backend)
    if cfg.attention == "hybrid":
        try:
            from linattn_cuda.nn import HybridAttention
        except ImportError as e:
            raise RuntimeError("attention 'hybrid' needs linattn_cuda.nn.HybridAttention, which this checkout lacks") from e
        options = dict(cfg.hybrid)
        accepted = inspect.signature(HybridAttention).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise ValueError(f"HybridAttention has no option(s) {unknown}")
        return HybridAttention(cfg.width, cfg.heads, feature_dim=cfg.feature_dim, backend=cfg.backend, **options)
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {cfg.attention!r}")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = build_attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=True)
        return x + self.mlp(self.ln2(x))

    def step(self, x: torch.Tensor, cache):
        a, cache = self.attn.step(self.ln1(x), cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache

    def prefill(self, x: torch.Tensor):
        """A prompt ``x [B, L, W]``: ``(out, cache)``, in one call where the attention has ``prefill``, else step by
        step from an empty cache."""
        h = self.ln1(x)
        if hasattr(self.attn, "prefill"):
            a, cache = self.attn.prefill(h)
        else:
            cache = self.attn.init_cache(batch_size=x.shape[0])
            outs = []
            for t in range(x.shape[1]):
                a_t, cache = self.attn.step(h[:, t : t + 1], cache)
                outs.append(a_t)
            a = torch.cat(outs, 1)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


class LMCache(NamedTuple):
    """Decoding cache of the whole model: one attention cache per layer and the next position."""

    layers: List[Any]
    position: int


class LanguageModel(nn.Module):
    """``forward(tokens [B, T]) -> logits [B, T, 256]``; ``step(token [B], cache) -> (logits [B, 256], cache)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {cfg.pos!r}")
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, VOCAB_SIZE, bias=False)
        self._init_weights()
        if cfg.tie_head:
            self.head.weight = self.embed.weight

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (getattr(block.attn, "out", None), block.mlp[2]):
                if isinstance(proj, nn.Linear):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.layers))

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            length = tokens.shape[1]
            if start + length > self.cfg.context:
                raise ValueError(f"positions up to {start + length} exceed the learned table ({self.cfg.context}); "
                                 "use pos='none' for longer sequences")
            x = x + self.pos(torch.arange(start, start + length, device=tokens.device))
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self._embed(tokens, 0)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def init_cache(self, batch_size: int) -> LMCache:
        return LMCache([block.attn.init_cache(batch_size=batch_size) for block in self.blocks], 0)

    def prefill(self, tokens: torch.Tensor):
        """A prompt ``tokens [B, T]`` (T >= 1): ``(logits [B, 256] of its last position, cache after it)``."""
        x = self._embed(tokens, 0)
        layers = []
        for block in self.blocks:
            x, c = block.prefill(x)
            layers.append(c)
        return self.head(self.ln(x[:, -1:]))[:, 0], LMCache(layers, tokens.shape[1])

    def step(self, token: torch.Tensor, cache: LMCache):
        x = self._embed(token[:, None], cache.position)
        layers = []
        for block, c in zip(self.blocks, cache.layers):
            x, c = block.step(x, c)
            layers.append(c)
        return self.head(self.ln(x))[:, 0], LMCache(layers, cache.position + 1)


def count_parameters(model: nn.Module) -> dict:
    """Trainable parameters: total, and of the attention layers alone (tied weights counted once)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = sum(p.numel() for b in model.blocks for p in b.attn.parameters() if p.requires_grad)
    return {"total": total, "attention": attention}


def cache_numel(cache: LMCache) -> int:
    """Number of elements held by a decoding cache (to show which kinds grow with the context)."""
    count = 0
    stack = list(cache.layers)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            count += item.numel()
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return count
