"""One decoding step of the hybrid attention, updating the cache in place (cache.py describes it).

One program per (batch row, key/value head) serves the G query heads of that key/value head:

* window: the ring's unpadded keys and the new key, exp weights through an online softmax over ring tiles;
* far: one pass over the Taylor state in feature blocks that reads each block (phi(q)^T kv, phi(q)^T k_sum; phi
  decoded from the feature index as in linattn_cuda/ops/taylor/triton/step.py) and writes it back with the key
  leaving the window added (kv += phi(k_old) v_old^T): the state is read once and written once;
* one normalizer, stabilized as the full forward (m = max(window max, 0) when the state holds keys);
* the new key and value take the ring slot of the key that left.

The ring slot's padding flag and the positions are advanced by the caller with device tensor ops, after every
program has read them (a program would race with its neighbours of the same row). No host value is read.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ....feature_map import feature_dim
from ...taylor.triton.common import block_dim, next_pow2
from ...taylor.triton.step import sym_decode

__all__ = ["step_fwd"]

RING_BLOCK = 16  # ring slots per tile
STATE_BLOCK = 32  # state rows per iteration


@triton.jit
def _gather(x, idx, BD: tl.constexpr):
    """x[idx] for a register vector x [BD] and indices idx [n] (a one-hot reduction)."""
    offs = tl.arange(0, BD)
    return tl.sum(tl.where(idx[:, None] == offs[None, :], x[None, :], 0.0), 1)


@triton.jit
def _online(acc, l_i, m_i, s, vals):
    """Fold scores s [BG, n] (-inf = absent) with values vals [n, BDV] into the running (acc, l, m)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vals[None, :, :], 1)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@triton.jit
def _hybrid_step_kernel(
    Q, K, V, NEWPAD, RK, RV, RPAD, KV, KS, POS, FW, O,
    scale, c1, H, G, R, M,
    D, DV, BG: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_NEWPAD: tl.constexpr, HAS_FW: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    c1 = tl.cast(c1, tl.float32)
    c2 = scale * 0.7071067811865476
    bk_i = tl.program_id(0)
    bk = bk_i.to(tl.int64)
    hkv = H // G
    b = (bk_i // hkv).to(tl.int64)
    offs_g = tl.arange(0, BG)
    g_ok = offs_g < G
    heads = (bk_i % hkv) * G + offs_g  # the query heads of this key/value head
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    d_ok = offs_d < D
    v_ok = offs_v < DV
    q = tl.load(Q + (b * H + heads)[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32)
    k_new = tl.load(K + bk * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    v_new = tl.load(V + bk * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    new_pad = 0
    if HAS_NEWPAD:
        new_pad = tl.load(NEWPAD + b).to(tl.int32)
    pos = tl.load(POS + b)
    slot = pos % tl.maximum(R, 1)

    # the window: the ring's unpadded keys, then the new key
    acc = tl.zeros([BG, BDV], dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    for r0 in range(0, R, BR):
        offs_r = r0 + tl.arange(0, BR)
        r_ok = offs_r < R
        rpad = tl.load(RPAD + b * R + offs_r, mask=r_ok, other=1)
        ok = r_ok & (rpad == 0)
        kr = tl.load(RK + (bk * R + offs_r)[:, None] * D + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        vr = tl.load(RV + (bk * R + offs_r)[:, None] * DV + offs_v[None, :], mask=ok[:, None] & v_ok[None, :], other=0.0)
        s = tl.sum(q[:, None, :] * kr[None, :, :], 2) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        acc, l_i, m_i = _online(acc, l_i, m_i, s, vr)
    s_new = tl.sum(q * k_new[None, :], 1) * scale
    s_new = tl.where(new_pad == 0, s_new, float("-inf"))
    acc, l_i, m_i = _online(acc, l_i, m_i, s_new[:, None], v_new[None, :])

    # the far part: read the state and write it back with the key leaving the window added
    if R > 0:
        k_old = tl.load(RK + (bk * R + slot) * D + offs_d, mask=d_ok, other=0.0)
        v_old = tl.load(RV + (bk * R + slot) * DV + offs_v, mask=v_ok, other=0.0)
        old_pad = tl.load(RPAD + b * R + slot).to(tl.int32)
    else:
        k_old = k_new
        v_old = v_new
        old_pad = new_pad
    keep = (old_pad == 0).to(tl.float32)
    has_far = tl.load(KS + bk * M) > 0.0  # the constant feature counts the state's keys
    num_f = tl.zeros([BG, BDV], dtype=tl.float32)
    den_f = tl.zeros([BG], dtype=tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < M
        kind, fa, fb = sym_decode(offs_m, D)
        coef = tl.where(kind == 1, c1, tl.where(kind == 2, c2, scale))
        qa = tl.load(Q + (b * H + heads)[:, None] * D + fa[None, :], mask=g_ok[:, None] & m_ok[None, :] & (kind >= 1)[None, :],
                     other=0.0).to(tl.float32)
        qb = tl.load(Q + (b * H + heads)[:, None] * D + fb[None, :], mask=g_ok[:, None] & m_ok[None, :] & (kind >= 2)[None, :],
                     other=0.0).to(tl.float32)
        fq = tl.where(kind[None, :] == 0, 1.0, tl.where(kind[None, :] == 1, coef[None, :] * qa, coef[None, :] * qa * qb))
        fq = tl.where(m_ok[None, :], fq, 0.0)
        ka = _gather(k_old, fa, BD)
        kb = _gather(k_old, fb, BD)
        fk = tl.where(kind == 0, 1.0, tl.where(kind == 1, coef * ka, coef * ka * kb))
        fk = tl.where(m_ok, fk, 0.0) * keep
        tile = bk * M * DV + offs_m[:, None] * DV + offs_v[None, :]
        tile_ok = m_ok[:, None] & v_ok[None, :]
        kv = tl.load(KV + tile, mask=tile_ok, other=0.0)
        ks = tl.load(KS + bk * M + offs_m, mask=m_ok, other=0.0)
        num_f += tl.sum(fq[:, :, None] * kv[None, :, :], 1)
        den_f += tl.sum(fq * ks[None, :], 1)
        tl.store(KV + tile, kv + fk[:, None] * v_old[None, :], mask=tile_ok)
        tl.store(KS + bk * M + offs_m, ks + fk, mask=m_ok)

    # one normalizer
    m = tl.where(has_far, tl.maximum(m_i, 0.0), m_i)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w_scale = tl.exp(m_i - m_use)
    fw = tl.full([BG], 1.0, dtype=tl.float32)
    if HAS_FW:
        fw = tl.load(FW + heads, mask=g_ok, other=1.0).to(tl.float32)
    coef_f = tl.where(has_far, fw * tl.exp(-m_use), 0.0)
    num = acc * w_scale[:, None] + coef_f[:, None] * num_f
    den = l_i * w_scale + coef_f * den_f
    seen = den > 0.0
    out = tl.where(seen[:, None], num / tl.where(seen, den, 1.0)[:, None], 0.0)
    tl.store(O + (b * H + heads)[:, None] * DV + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=g_ok[:, None] & v_ok[None, :])

    if R > 0:  # the new key and value take the slot (after every thread has read the old ones)
        tl.debug_barrier()
        tl.store(RK + (bk * R + slot) * D + offs_d, k_new, mask=d_ok)
        tl.store(RV + (bk * R + slot) * DV + offs_v, v_new, mask=v_ok)


def step_fwd(q, k, v, key_padding_mask, ring_k, ring_v, ring_pad, kv, k_sum, position, far_weight, scale: float):
    """``out [B, H, Dv]`` of one step; ring_k, ring_v, ring_pad, kv, k_sum and position (contiguous, float32 state)
    are updated in place."""
    from torch.library import wrap_triton

    b, h, d = q.shape
    hk, dv = k.shape[1], v.shape[2]
    d, dv = int(d), int(dv)
    ring = int(ring_k.shape[2])
    m = feature_dim(d)
    group = h // hk
    out = torch.empty(b, h, dv, dtype=q.dtype, device=q.device)
    pad_u8 = ring_pad.view(torch.uint8)
    newpad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else torch.empty(1, dtype=torch.uint8, device=q.device)
    fw = far_weight if far_weight is not None else torch.empty(1, dtype=torch.float32, device=q.device)
    wrap_triton(_hybrid_step_kernel)[(b * hk,)](
        q, k, v, newpad, ring_k, ring_v, pad_u8, kv, k_sum, position, fw, out,
        scale, math.sqrt(scale), h, group, ring, m,
        D=d, DV=dv, BG=next_pow2(group), BR=RING_BLOCK, BM=STATE_BLOCK, BD=block_dim(d), BDV=block_dim(dv),
        HAS_NEWPAD=key_padding_mask is not None, HAS_FW=far_weight is not None, num_warps=4,
    )
    if ring > 0:  # the slot's padding flag, after the kernel read the old one
        slot = (position % ring).unsqueeze(1)
        new = key_padding_mask.unsqueeze(1) if key_padding_mask is not None else torch.zeros_like(slot, dtype=torch.bool)
        ring_pad.scatter_(1, slot, new)
    position.add_(1)
    return out
