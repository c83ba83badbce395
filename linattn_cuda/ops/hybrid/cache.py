"""The decoding cache of the hybrid attention: a fixed-size ring buffer of the last W - 1 keys and values, the
Taylor state of every key before them, and the position of each batch row.

Decoding the token at position t, the query sees the keys t - W + 1 .. t inside its window: the W - 1 in the ring
and its own. Then the ring's oldest key (position t - W + 1, beyond the next query's window) moves into the Taylor
state and the new key takes its slot: slot ``p mod (W - 1)`` holds position p. Everything is updated in place by
:func:`linattn_cuda.hybrid_attention_step` (no copy of the ring, no host value read: a step can be captured in a
CUDA graph). W = 1 has no ring (every earlier key is in the state).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...feature_map import feature_dim
from ..taylor.state import TaylorState, accumulate_dtype

__all__ = ["HybridCache", "empty_hybrid_cache", "cache_from_prompt", "check_cache"]


class HybridCache(NamedTuple):
    """keys [B, Hkv, W-1, D], values [B, Hkv, W-1, Dv]: the ring (float32; float64 for float64 models);
    key_padding [B, W-1] bool: True for a padded or empty slot; state: TaylorState (kv [B, Hkv, M, Dv], k_sum
    [B, Hkv, M]) of the keys before the ring; position [B] int64: the tokens seen by each row."""

    keys: torch.Tensor
    values: torch.Tensor
    key_padding: torch.Tensor
    state: TaylorState
    position: torch.Tensor

    @property
    def window(self) -> int:
        return self.keys.shape[2] + 1


def empty_hybrid_cache(batch: int, kv_heads: int, head_dim: int, value_dim: int, window: int, *,
                       dtype=torch.float32, device=None) -> HybridCache:
    """The cache before the first token (every slot empty, the state zero, position 0)."""
    ring = window - 1
    m = feature_dim(head_dim)
    return HybridCache(
        torch.zeros(batch, kv_heads, ring, head_dim, dtype=dtype, device=device),
        torch.zeros(batch, kv_heads, ring, value_dim, dtype=dtype, device=device),
        torch.ones(batch, ring, dtype=torch.bool, device=device),
        TaylorState(torch.zeros(batch, kv_heads, m, value_dim, dtype=dtype, device=device),
                    torch.zeros(batch, kv_heads, m, dtype=dtype, device=device)),
        torch.zeros(batch, dtype=torch.int64, device=device),
    )


def cache_from_prompt(k: torch.Tensor, v: torch.Tensor, key_padding_mask, window: int, state: TaylorState) -> HybridCache:
    """The cache after a prompt ``k [B, Hkv, L, D]``, ``v [B, Hkv, L, Dv]`` whose keys 0 .. L - W are summarized by
    ``state``: the last W - 1 keys go to their ring slots (the slots of positions before 0 stay empty)."""
    b, hk, length, d = k.shape
    acc = state.kv.dtype
    cache = empty_hybrid_cache(b, hk, d, v.shape[-1], window, dtype=acc, device=k.device)
    ring = window - 1
    start = max(0, length - ring)
    if ring > 0 and length > start:
        slots = torch.arange(start, length, device=k.device) % ring
        keys, values = k[:, :, start:].to(acc), v[:, :, start:].to(acc)
        if key_padding_mask is not None:  # a padded key is stored as 0 (it may hold NaN)
            pad = key_padding_mask[:, start:]
            keys = keys.masked_fill(pad[:, None, :, None], 0.0)
            values = values.masked_fill(pad[:, None, :, None], 0.0)
            cache.key_padding[:, slots] = pad
        else:
            cache.key_padding[:, slots] = False
        cache.keys[:, :, slots] = keys
        cache.values[:, :, slots] = values
    cache.state.kv.copy_(state.kv)
    cache.state.k_sum.copy_(state.k_sum)
    cache.position.fill_(length)
    return cache


def check_cache(cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> HybridCache:
    """A HybridCache matching a step's q [B, H, D], k [B, Hkv, D], v [B, Hkv, Dv]."""
    if not isinstance(cache, HybridCache):
        raise TypeError(f"cache must be a HybridCache (from hybrid_attention_prefill or empty_hybrid_cache), "
                        f"got {type(cache).__name__}")
    b, hk, d = k.shape
    dv = v.shape[-1]
    ring = cache.keys.shape[2] if cache.keys.dim() == 4 else -1
    m = feature_dim(d)
    expected = {
        "cache.keys": (cache.keys, (b, hk, ring, d)),
        "cache.values": (cache.values, (b, hk, ring, dv)),
        "cache.key_padding": (cache.key_padding, (b, ring)),
        "cache.state.kv": (cache.state.kv, (b, hk, m, dv)),
        "cache.state.k_sum": (cache.state.k_sum, (b, hk, m)),
        "cache.position": (cache.position, (b,)),
    }
    for name, (x, shape) in expected.items():
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(getattr(x, 'shape', ()))}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")
    acc = cache.state.kv.dtype
    if acc not in (torch.float32, torch.float64):
        raise TypeError(f"cache.state.kv must be float32 or float64, got {acc}")
    for name in ("keys", "values"):
        if getattr(cache, name).dtype != acc:
            raise TypeError(f"cache.{name} must have the state's dtype {acc}, got {getattr(cache, name).dtype}")
    if cache.state.k_sum.dtype != acc:
        raise TypeError(f"cache.state.k_sum must have the state's dtype {acc}, got {cache.state.k_sum.dtype}")
    if cache.key_padding.dtype != torch.bool:
        raise TypeError(f"cache.key_padding must be bool, got {cache.key_padding.dtype}")
    if cache.position.dtype != torch.int64:
        raise TypeError(f"cache.position must be int64, got {cache.position.dtype}")
    return cache


def cache_dtype(dtype: torch.dtype) -> torch.dtype:
    return accumulate_dtype(dtype)
