"""The hybrid attention's definition, dense in float64: the ground truth every backend is tested against.

For a query ``i`` and key ``j`` with logit ``s_ij = scale * q_i.k_j`` the weight is

    w_ij = exp(s_ij)                     j inside the window of i   (causal: i - W < j <= i; non-causal: |i - j| < W)
    w_ij = fw_h (1 + s_ij + s_ij^2 / 2)  j visible and outside it   (fw_h: the optional per-head far weight)
    out_i = sum_j w_ij v_j / sum_j w_ij  (0 for a query that sees no unpadded key)

O(L^2) time and memory: for tests and small problems only. Imports nothing from the package above the Taylor
reference helpers.
"""
from __future__ import annotations

import torch

from ...feature_map import resolve_scale
from ..taylor.naive import repeat_kv, zero_padded_keys

__all__ = ["hybrid_attention_reference", "window_masks"]


def window_masks(lq: int, lk: int, window: int, causal: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[Lq, Lk]`` bool masks of the definition: (inside the window, outside it but visible)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    diff = i - j
    if causal:
        return (diff >= 0) & (diff < window), diff >= window
    inside = diff.abs() < window
    return inside, ~inside


def hybrid_attention_reference(q, k, v, *, window: int, causal: bool = True, scale=None, key_padding_mask=None,
                               far_weight=None):
    """The plain definition in float64 (returns q's dtype). ``q [B, H, L, D]``, ``k [B, Hkv, L, D]``, ``v [B, Hkv,
    L, Dv]`` (query head h reads key/value head h // (H // Hkv)), ``key_padding_mask [B, L]`` (True = padding),
    ``far_weight [H]`` or None. Differentiable (float64 autograd)."""
    if isinstance(window, bool) or int(window) < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    window = int(window)
    out_dtype = q.dtype
    q, k, v = q.double(), repeat_kv(k.double(), q.shape[1]), repeat_kv(v.double(), q.shape[1])
    k, v = zero_padded_keys(k, v, key_padding_mask)
    scale = resolve_scale(scale, q.shape[-1])
    s = scale * q @ k.transpose(-1, -2)
    inside, outside = window_masks(q.shape[-2], k.shape[-2], window, causal, q.device)
    taylor = 1 + s + s * s / 2
    if far_weight is not None:
        taylor = taylor * far_weight.double().view(1, -1, 1, 1)
    w = torch.where(inside, torch.exp(s), torch.where(outside, taylor, torch.zeros_like(s)))
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    den = w.sum(-1, keepdim=True)
    out = torch.where(den > 0, (w @ v) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros(()))
    return out.to(out_dtype)
