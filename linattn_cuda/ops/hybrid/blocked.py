"""The hybrid attention in plain PyTorch, blocked (linear in L, differentiable by autograd): the ``reference``
backend, and the fallback where no fused kernel serves (see :mod:`linattn_cuda.ops.hybrid.functions`).

The weights are those of :func:`linattn_cuda.ops.hybrid.naive.hybrid_attention_reference`. How they are computed:

* window part: queries in blocks of W, each block against the keys of its own and neighbouring block(s):
  ``[B, H, L/W, W, 2W]`` scores (3W non-causal), ``exp(s - m)`` with a per-row stabilizer ``m``;
* Taylor part: the keys ``j <= i - W`` of query ``i`` are the causal Taylor attention of ``q[W:]`` on
  ``k[:L-W]`` (:func:`linattn_cuda.taylor_attention`, reference backend). It returns normalized outputs, so the
  normalizer ``Z`` is recovered exactly with a *sink*: an extra key of zeros (weight ``1 + 0 + 0 = 1`` for every
  query) whose value is a one-hot extra column. The kernel then returns ``[N / (Z + 1), 1 / (Z + 1)]``, hence
  ``Z`` and the numerator ``N``, differentiably. Non-causal attention adds the mirror image (keys
  ``j >= i + W``) on the flipped sequence;
* the two parts meet in one normalizer, scaled by ``exp(-m)`` with ``m = max(max window logit, 0)`` whenever a
  Taylor key exists: exponentials never overflow and the Taylor part never underflows to NaN.

It materializes ``[B, H, L/W, W, 2W]`` blocks (half of them -inf causal) and runs the Taylor part a second time
through a sink: the fused kernels (``cpu``, ``triton``) do neither. Decoding: :func:`prefill_blocked` (the blocked
forward plus the state of the keys that left the window) and :func:`step_blocked` (one token, the cache updated in
place with tensor ops only).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...api import taylor_attention
from ...feature_map import taylor_feature_map
from ..taylor.naive import zero_padded_keys
from ..taylor.state import TaylorState, accumulate_dtype
from .cache import HybridCache, cache_from_prompt

__all__ = ["hybrid_attention_blocked", "prefill_blocked", "step_blocked"]


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


def _taylor_beyond(q, k, v, shift: int, scale: float, key_padding_mask, enable_gqa: bool = False):
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
                         backend="reference")[:, :, 1:]
    inv = o[..., dv]  # 1 / (Z + 1), in (0, 1]
    num_f = o[..., :dv] / inv.unsqueeze(-1)
    den_f = 1.0 / inv - 1.0
    return torch.cat([num[:, :, :shift], num_f], dim=2), torch.cat([den[:, :, :shift], den_f], dim=2)


def hybrid_attention_blocked(q, k, v, *, window: int, causal: bool, scale: float, key_padding_mask=None,
                             far_weight=None) -> torch.Tensor:
    """The hybrid attention of checked inputs (q [B, H, L, D], k and v with H or fewer heads, ``scale`` resolved),
    in float32 (float64 for float64 inputs); returns q's dtype."""
    enable_gqa = k.shape[1] != q.shape[1]
    out_dtype = q.dtype
    acc = accumulate_dtype(q.dtype)
    b, h, length, _ = q.shape
    if q.numel() == 0 or length == 0:
        return q.new_zeros(b, h, length, v.shape[-1])
    window = min(window, length)  # a window of >= L keys holds every key (and keeps the blocks small)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    k, v = zero_padded_keys(k, v, key_padding_mask)
    valid = torch.ones(b, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask

    # Taylor part: keys at distance >= W (before the query; non-causal also after it, on the flipped sequence)
    num_f, den_f = _taylor_beyond(q, k, v, window, scale, key_padding_mask, enable_gqa)
    if not causal:
        flip = lambda t: t.flip(2)  # noqa: E731
        mask_r = None if key_padding_mask is None else key_padding_mask.flip(1)
        num_r, den_r = _taylor_beyond(flip(q), flip(k), flip(v), window, scale, mask_r, enable_gqa)
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


def _state_of(k, v, key_padding_mask, scale: float) -> TaylorState:
    """The Taylor state (kv = sum phi(k) v^T, k_sum = sum phi(k)) of the unpadded keys of k [B, Hkv, n, D]."""
    acc = accumulate_dtype(k.dtype)
    k, v = zero_padded_keys(k.to(acc), v.to(acc), key_padding_mask)
    fk = taylor_feature_map(k, scale)
    if key_padding_mask is not None:
        fk = fk * (~key_padding_mask).to(acc)[:, None, :, None]  # phi(0) = [1, 0, ...]: drop the constant too
    return TaylorState(torch.matmul(fk.transpose(-1, -2), v), fk.sum(-2))


def prefill_blocked(q, k, v, *, window: int, scale: float, key_padding_mask=None, far_weight=None):
    """Causal hybrid attention over a prompt and the decoding cache after it (checked inputs)."""
    out = hybrid_attention_blocked(q, k, v, window=window, causal=True, scale=scale,
                                   key_padding_mask=key_padding_mask, far_weight=far_weight)
    n = max(0, k.shape[2] - window + 1)  # the keys no later query sees inside its window
    mask = None if key_padding_mask is None else key_padding_mask[:, :n]
    state = _state_of(k[:, :, :n], v[:, :, :n], mask, scale)
    return out, cache_from_prompt(k, v, key_padding_mask, window, state)


def step_blocked(q, k, v, cache: HybridCache, *, scale: float, key_padding_mask=None, far_weight=None):
    """One decoding step of checked inputs (q [B, H, D], k [B, Hkv, D], v [B, Hkv, Dv], key_padding_mask [B] or
    None), updating ``cache`` in place with tensor ops only (no host value is read). Returns out [B, H, Dv]."""
    acc = cache.state.kv.dtype
    b, h, d = q.shape
    hk = k.shape[1]
    g = h // hk
    ring = cache.keys.shape[2]
    qa = q.to(acc).view(b, hk, g, d)
    ka, va = k.to(acc), v.to(acc)
    new_pad = key_padding_mask if key_padding_mask is not None else torch.zeros(b, dtype=torch.bool, device=q.device)
    ka = ka.masked_fill(new_pad[:, None, None], 0.0)  # a padded key is stored as 0 (it may hold NaN)
    va = va.masked_fill(new_pad[:, None, None], 0.0)
    kv, k_sum = cache.state
    # window: the ring's keys and the new one; far: the state (has keys iff its constant feature counts some)
    s = scale * torch.cat([torch.einsum("bkgd,bkwd->bkgw", qa, cache.keys),
                           torch.einsum("bkgd,bkd->bkg", qa, ka).unsqueeze(-1)], dim=-1)
    pad = torch.cat([cache.key_padding, new_pad[:, None]], dim=1)[:, None, None, :]
    s = s.masked_fill(pad, float("-inf"))
    has_far = (k_sum[..., 0] > 0)[..., None]  # [B, Hkv, 1]
    m = s.amax(-1)
    m = torch.where(has_far, m.clamp_min(0.0), m)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m.unsqueeze(-1))  # 0 on padded slots
    num = torch.einsum("bkgw,bkwv->bkgv", p[..., :ring], cache.values) + p[..., ring:] * va[:, :, None]
    den = p.sum(-1)
    fq = taylor_feature_map(qa, scale)
    fw = torch.ones(h, dtype=acc, device=q.device) if far_weight is None else far_weight.to(acc)
    coef = torch.where(has_far, fw.view(1, hk, g) * torch.exp(-m), torch.zeros_like(m))
    num = num + coef.unsqueeze(-1) * torch.einsum("bkgm,bkmv->bkgv", fq, kv)
    den = den + coef * torch.einsum("bkgm,bkm->bkg", fq, k_sum)
    out = torch.where(den.unsqueeze(-1) > 0, num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1), 0.0)
    # the slot's old key (or, W = 1, the new one) into the state; the new key into the slot
    if ring > 0:
        slot = cache.position % ring  # [B]
        index = slot.view(b, 1, 1, 1)
        old_k = cache.keys.gather(2, index.expand(b, hk, 1, d))[:, :, 0]
        old_v = cache.values.gather(2, index.expand(b, hk, 1, va.shape[-1]))[:, :, 0]
        old_pad = cache.key_padding.gather(1, slot[:, None])[:, 0]
    else:
        old_k, old_v, old_pad = ka, va, new_pad
    fk = taylor_feature_map(old_k, scale) * (~old_pad).to(acc)[:, None, None]
    kv.add_(fk.unsqueeze(-1) * old_v.unsqueeze(-2))
    k_sum.add_(fk)
    if ring > 0:
        cache.keys.scatter_(2, index.expand(b, hk, 1, d), ka.unsqueeze(2))
        cache.values.scatter_(2, index.expand(b, hk, 1, va.shape[-1]), va.unsqueeze(2))
        cache.key_padding.scatter_(1, slot[:, None], new_pad[:, None])
    cache.position.add_(1)
    return out.reshape(b, h, -1).to(q.dtype)
