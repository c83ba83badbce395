"""Hybrid attention: exact softmax weights inside a sliding window, the Taylor weight beyond it, one normalizer.

For a query ``i`` and key ``j`` with logit ``s_ij = scale * q_i.k_j`` the weight is

    w_ij = exp(s_ij)              if j is inside the window of i     (causal: i - W < j <= i;
                                                                     non-causal: |i - j| < W)
    w_ij = 1 + s_ij + s_ij^2 / 2  if j is outside it (and visible)
    out_i = sum_j w_ij v_j / sum_j w_ij            (0 for a query that sees no unmasked key)

Taylor attention alone gives every key a weight >= 1/2, so it cannot express sharp, local dependencies; the
window restores them exactly where language (and speech) needs them most, while the keys beyond the window are
summarized by the Taylor state, so the cost is linear in the length and decoding needs a fixed-size cache (the
last W keys and values plus the Taylor state). This is the combination of Based (Arora et al., 2024: Taylor
linear attention + short sliding-window softmax) done in one normalizer, so that the two parts compete for
probability mass the way softmax's keys do.

How it is computed (linear in L, nothing L x L):

* window part: queries in blocks of W, each block against the keys of its own and neighbouring block(s):
  ``[B, H, L/W, W, 2W]`` scores (3W non-causal), ``exp(s - m)`` with a per-row stabilizer ``m``;
* Taylor part: the keys ``j <= i - W`` of query ``i`` are the causal Taylor attention of ``q[W:]`` on
  ``k[:L-W]``, computed by the fused kernels of any backend (:func:`linattn_cuda.taylor_attention`). The kernels
  return normalized outputs, so the normalizer ``Z`` is recovered exactly with a *sink*: an extra key of zeros
  (weight ``1 + 0 + 0 = 1`` for every query) whose value is a one-hot extra column. The kernel then returns
  ``[N / (Z + 1), 1 / (Z + 1)]``, hence ``Z`` and the numerator ``N``, differentiably, in float32.
  Non-causal attention adds the mirror image (keys ``j >= i + W``) on the flipped sequence;
* the two parts meet in one normalizer, scaled by ``exp(-m)`` with ``m = max(max window logit, 0)`` whenever a
  Taylor key exists: exponentials never overflow and the Taylor part never underflows to NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..problem import attention_problem
from ...api import taylor_attention
from ...feature_map import resolve_scale
from ..taylor.naive import repeat_kv, zero_padded_keys
from ..taylor.state import accumulate_dtype

__all__ = ["hybrid_attention", "hybrid_attention_reference", "check_window"]


def check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (number of keys with exact softmax weights), got {window!r}")
    return window


def _window_logits_mask(lq: int, lk: int, window: int, causal: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [Lq, Lk] masks (inside the window, outside it but visible) of the definition; for the reference."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    diff = i - j
    if causal:
        inside = (diff >= 0) & (diff < window)
        outside = diff >= window
    else:
        inside = diff.abs() < window
        outside = ~inside
    return inside, outside


def check_far_weight(far_weight, heads: int):
    if far_weight is None:
        return None
    if not isinstance(far_weight, torch.Tensor) or far_weight.shape != (heads,):
        raise ValueError(f"far_weight must be a tensor of shape [H] = [{heads}] (positive per-head weights), "
                         f"got {getattr(far_weight, 'shape', type(far_weight).__name__)}")
    return far_weight


def hybrid_attention_reference(q, k, v, *, window: int, causal: bool = True, scale=None, key_padding_mask=None,
                               far_weight=None):
    """The plain definition, dense in float64 (O(L^2) memory): the ground truth of the tests. k and v may have
    fewer heads than q (grouped-query attention: query head h reads key/value head h // (H // Hkv))."""
    check_window(window)
    check_far_weight(far_weight, q.shape[1])
    out_dtype = q.dtype
    q, k, v = q.double(), repeat_kv(k.double(), q.shape[1]), repeat_kv(v.double(), q.shape[1])
    k, v = zero_padded_keys(k, v, key_padding_mask)
    scale = resolve_scale(scale, q.shape[-1])
    s = scale * q @ k.transpose(-1, -2)
    inside, outside = _window_logits_mask(q.shape[-2], k.shape[-2], window, causal, q.device)
    taylor = 1 + s + s * s / 2
    if far_weight is not None:
        taylor = taylor * far_weight.double().view(1, -1, 1, 1)
    w = torch.where(inside, torch.exp(s), torch.where(outside, taylor, torch.zeros_like(s)))
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    den = w.sum(-1, keepdim=True)
    out = torch.where(den > 0, (w @ v) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros(()))
    return out.to(out_dtype)


def _blocks(x: torch.Tensor, n: int, window: int, causal: bool) -> torch.Tensor:
    """[B, H, n*W, d] -> [B, H, n, K, d]: per query block its neighbouring key blocks (previous, own[, next])."""
    b, h, _, d = x.shape
    xb = F.pad(x.view(b, h, n, window, d), (0, 0, 0, 0, 1, 1))  # zero blocks before the first / after the last
    parts = [xb[:, :, 0:n], xb[:, :, 1 : n + 1]] + ([] if causal else [xb[:, :, 2 : n + 2]])
    return torch.cat(parts, dim=3)


def _window_part(q, k, v, valid, window: int, causal: bool, scale: float):
    """Blocked sliding-window logits ``s [B, H, n, W, K]`` (n = ceil(L / W) query blocks of W, K = 2W keys
    causal, 3W non-causal) with -inf on the keys outside each query's window, and the key blocks' values
    ``[B, H, n, K, Dv]``, so that ``exp(s - m) @ values`` is the window numerator of every query."""
    b, h, length, _ = q.shape
    n = -(-length // window)
    pad = n * window - length
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        valid = F.pad(valid, (0, pad), value=False)
    kb, vb = _blocks(k, n, window, causal), _blocks(v, n, window, causal)  # [B, H, n, K, d]
    vk = F.pad(valid.view(b, n, window), (0, 0, 1, 1), value=False)  # [B, n+2, W]
    valid_b = torch.cat([vk[:, 0:n], vk[:, 1 : n + 1]] + ([] if causal else [vk[:, 2 : n + 2]]), dim=2)  # [B, n, K]
    r = torch.arange(window, device=q.device)[:, None]
    c = torch.arange(kb.shape[3], device=q.device)[None, :]
    diff = window + r - c  # query position minus key position
    band = (diff >= 0) & (diff < window) if causal else diff.abs() < window
    inside = band & valid_b[:, None, :, None, :]  # [B, 1, n, W, K]
    bias = torch.zeros(inside.shape, dtype=q.dtype, device=q.device).masked_fill_(~inside, float("-inf"))
    hk = k.shape[1]  # grouped-query attention: G = H / Hkv query heads share a key/value head, read in place
    qg = q.view(b, hk, h // hk, n, window, q.shape[-1])
    s = torch.matmul(qg, kb.unsqueeze(2).transpose(-1, -2)).view(b, h, n, window, -1).mul_(scale).add_(bias)
    return s, vb


def _taylor_beyond(q, k, v, shift: int, scale: float, key_padding_mask, backend: str, enable_gqa: bool = False):
    """Numerator ``N_i = sum_{j <= i - shift} w_ij v_j`` and normalizer ``Z_i = sum_{j <= i - shift} w_ij``
    (Taylor weights, padded keys excluded) for every query, through the fused causal kernels and a sink key."""
    b, h, length, d = q.shape
    dv = v.shape[-1]
    num = q.new_zeros(b, h, length, dv)
    den = q.new_zeros(b, h, length)
    lf = length - shift
    if lf <= 0:
        return num, den
    hk = k.shape[1]
    sink_value = F.pad(q.new_ones(b, hk, 1, 1), (dv, 0))  # [0, ..., 0, 1]
    qs = torch.cat([q.new_zeros(b, h, 1, d), q[:, :, shift:]], dim=2)
    ks = torch.cat([k.new_zeros(b, hk, 1, d), k[:, :, :lf]], dim=2)
    vs = torch.cat([sink_value, F.pad(v[:, :, :lf], (0, 1))], dim=2)
    mask = None
    if key_padding_mask is not None:
        mask = torch.cat([key_padding_mask.new_zeros(b, 1), key_padding_mask[:, :lf]], dim=1)
    o = taylor_attention(qs, ks, vs, causal=True, scale=scale, key_padding_mask=mask, enable_gqa=enable_gqa,
                         backend=backend)[:, :, 1:]
    inv = o[..., dv]  # 1 / (Z + 1), in (0, 1]
    num_f = o[..., :dv] / inv.unsqueeze(-1)
    den_f = 1.0 / inv - 1.0
    return torch.cat([num[:, :, :shift], num_f], dim=2), torch.cat([den[:, :, :shift], den_f], dim=2)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    causal: bool = True,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    far_weight: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention with softmax weights inside a window of ``window`` keys and Taylor weights beyond it.

    ``q, k [B, H, L, D]``, ``v [B, H, L, Dv]`` (self-attention: one length), ``key_padding_mask [B, L]`` bool
    (True = padding). Equivalent to :func:`hybrid_attention_reference` (see the module docstring), in float32
    (float64 for float64 inputs), linear in L; returns the input dtype. ``far_weight [H]`` (positive, e.g. the
    exp of a learned parameter) multiplies every Taylor weight of head h: a head can learn how much of the context
    beyond its window it mixes in (1 = the plain definition). ``enable_gqa``: k and v may have Hkv heads with
    H % Hkv == 0 (query head h reads key/value head h // (H // Hkv), as in SDPA), read in place.
    ``backend`` is the Taylor part's (:func:`linattn_cuda.taylor_attention`).
    """
    attention_problem(q, k, v, causal=causal, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa)  # checks
    check_window(window)
    check_far_weight(far_weight, q.shape[1])
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"hybrid attention is self-attention: q and k need one length, got {q.shape[-2]} and {k.shape[-2]}")
    scale = resolve_scale(scale, q.shape[-1])
    out_dtype = q.dtype
    acc = accumulate_dtype(q.dtype)
    b, h, length, _ = q.shape
    if q.numel() == 0 or length == 0:
        return q.new_zeros(b, h, length, v.shape[-1])
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    k, v = zero_padded_keys(k, v, key_padding_mask)
    valid = torch.ones(b, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask

    # Taylor part: keys at distance >= W (before the query; non-causal also after it, on the flipped sequence)
    num_f, den_f = _taylor_beyond(q, k, v, window, scale, key_padding_mask, backend, enable_gqa)
    if not causal:
        flip = lambda t: t.flip(2)  # noqa: E731
        mask_r = None if key_padding_mask is None else key_padding_mask.flip(1)
        num_r, den_r = _taylor_beyond(flip(q), flip(k), flip(v), window, scale, mask_r, backend, enable_gqa)
        num_f, den_f = num_f + flip(num_r), den_f + flip(den_r)

    if far_weight is not None:
        fw = far_weight.to(num_f.dtype).view(1, -1, 1)
        num_f, den_f = num_f * fw.unsqueeze(-1), den_f * fw

    # window part, blocked; rows stabilized by m (the window's max logit, at least 0 where a Taylor key exists)
    s, vb = _window_part(q, k, v, valid, window, causal, scale)
    n = s.shape[2]
    m = s.detach().amax(-1).reshape(b, h, n * window)[:, :, :length]  # -inf where the window is empty
    has_far = den_f > 0
    m = torch.where(has_far, m.clamp_min(0.0), torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = torch.exp(s - F.pad(m, (0, n * window - length)).view(b, h, n, window, 1))  # 0 outside the window
    hk = k.shape[1]
    num_w = torch.matmul(p.view(b, hk, h // hk, n, window, -1), vb.unsqueeze(2))
    num_w = num_w.reshape(b, h, n * window, -1)[:, :, :length]
    den_w = p.sum(-1).reshape(b, h, n * window)[:, :, :length]
    far_scale = torch.exp(-m.clamp_min(0.0))  # <= 1; multiplies Z_f = 0 exactly where there is no Taylor key
    num = num_w + far_scale.unsqueeze(-1) * num_f
    den = den_w + far_scale * den_f
    ok = den > 0
    out = num / torch.where(ok, den, torch.ones_like(den)).unsqueeze(-1)  # num = 0 where den = 0
    return out.to(out_dtype)
