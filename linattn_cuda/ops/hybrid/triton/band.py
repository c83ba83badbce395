"""The window part of the hybrid (exact softmax over the band |i - j| < W, causal i - W < j <= i) and the one
normalizer that joins it to the Taylor part of far.py.

Forward, one program per (batch * query head, block of BM queries): the row's accumulators start from the far part
(the raw sums of far.py, times the far weight fw) in the frame of the stabilizer m = 0, or empty (m = -inf) for a
row without far keys; then the key tiles of the band go through an online softmax (flash-attention style), each new
running maximum rescaling everything accumulated so far, far part included. The final stabilizer is therefore
m = max(window max logit, 0) where far keys exist, the window max elsewhere, as SPEC section 5 asks: no exponential
overflows and the far part (>= fw/2 per key) never underflows into 0/0. Only the band is visited: at most
W + BM - 1 keys per block (2 W + BM - 2 non-causal), never an L x L or [B, H, L, 2W] tensor. Outputs: out in q's
dtype and lse_i = m_i + log(sum_j w_ij e^(-m_i)) (float32; +inf for a row without keys) for the backward.

Backward (recompute): with delta_i = dO_i . out_i, the window entries' normalized weight a_ij = exp(s_ij - lse_i),
dp_ij = dO_i . v_j - delta_i and dS_ij = a_ij dp_ij give dq = scale dS K (a program per query block), dk = scale
dS^T Q and dv = a^T dO (a program per key block; dk and dv of a key/value head receive its G query heads' shares
through float32 atomics). The far weight's gradient needs no far term: a row's normalized weights sum to 1, so
d loss / d fw_h = -(1 / fw_h) sum over window entries of dS_ij, summed here per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...taylor.triton.chunk import _tile
from ...taylor.triton.common import block_dim, mm

__all__ = ["band_fwd", "band_bwd", "BAND_BLOCK"]

BAND_BLOCK = 32  # BM = BN: queries per program, keys per tile


@triton.jit
def _band_range(q0, L, W, BM: tl.constexpr, CAUSAL: tl.constexpr):
    """[lo, hi): the keys inside the window of some query of the block [q0, q0 + BM)."""
    lo = tl.maximum(q0 - W + 1, 0)
    if CAUSAL:
        hi = tl.minimum(q0 + BM, L)
    else:
        hi = tl.minimum(q0 + BM + W - 1, L)
    return lo, hi


@triton.jit
def _inside(diff, W, CAUSAL: tl.constexpr):
    """Whether key j is inside the window of query i, from diff = i - j."""
    if CAUSAL:
        return (diff >= 0) & (diff < W)
    return (diff < W) & (diff > -W)


@triton.jit
def _band_fwd_kernel(
    Q, K, V, MASK, NUM, DEN, FW, O, LSE,
    scale, L, W, H, G,
    D, DV, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FW: tl.constexpr, MODE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    bh_i = tl.program_id(0)
    pid_m = tl.program_id(1)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    h = bh_i % H
    bk = b * (H // G) + h // G
    q0 = pid_m * BM
    offs_m = q0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    m_ok = offs_m < L
    v_ok = offs_v < DV
    q = _tile(Q + bh * L * D, offs_m, m_ok, offs_d, D)
    o_tile = bh * L * DV + offs_m[:, None] * DV + offs_v[None, :]
    o_ok = m_ok[:, None] & v_ok[None, :]
    fw = 1.0
    if HAS_FW:
        fw = tl.load(FW + h).to(tl.float32)
    # the far part, in the frame m = 0 (rows without far keys: empty, m = -inf)
    acc = tl.load(NUM + o_tile, mask=o_ok, other=0.0) * fw
    l_i = tl.load(DEN + bh * L + offs_m, mask=m_ok, other=0.0) * fw
    m_i = tl.where(l_i > 0.0, 0.0, float("-inf"))
    lo, hi = _band_range(q0, L, W, BM, CAUSAL)
    Kb = K + bk * L * D
    Vb = V + bk * L * DV
    for start in range(lo, hi, BN):
        offs_n = start + tl.arange(0, BN)
        key_ok = offs_n < hi
        if HAS_MASK:
            pad = tl.load(MASK + b * L + offs_n, mask=key_ok, other=1)
            key_ok = key_ok & (pad == 0)
        k = _tile(Kb, offs_n, key_ok, offs_d, D)
        v = _tile(Vb, offs_n, key_ok, offs_v, DV)
        s = mm(q, tl.trans(k), MODE) * scale
        valid = _inside(offs_m[:, None] - offs_n[None, :], W, CAUSAL) & key_ok[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: keep 0 * exp(-inf) = 0
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        acc = acc * alpha[:, None] + mm(p, v, MODE)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    seen = l_i > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    tl.store(O + o_tile, out.to(O.dtype.element_ty), mask=o_ok)
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)


@triton.jit
def _band_bwd_kernel(
    Q, K, V, MASK, DO, DELTA, LSE, DQ, DK, DVO, WSUM,
    scale, L, W, H, G, NB,
    D, DV, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
):
    """Grid (B*H, blocks, 2): role 0 = dq of a query block (and its sum of dS), 1 = dk, dv of a key block."""
    scale = tl.cast(scale, tl.float32)
    bh_i = tl.program_id(0)
    pid = tl.program_id(1)
    role = tl.program_id(2)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    h = bh_i % H
    bk = b * (H // G) + h // G
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    d_ok = offs_d < D
    v_ok = offs_v < DV
    Qb = Q + bh * L * D
    Kb = K + bk * L * D
    Vb = V + bk * L * DV
    DOb = DO + bh * L * DV
    if role == 0:
        q0 = pid * BM
        offs_m = q0 + tl.arange(0, BM)
        m_ok = offs_m < L
        q = _tile(Qb, offs_m, m_ok, offs_d, D)
        do = _tile(DOb, offs_m, m_ok, offs_v, DV)
        lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BM, BD], dtype=tl.float32)
        wsum = tl.zeros([BM], dtype=tl.float32)
        lo, hi = _band_range(q0, L, W, BM, CAUSAL)
        for start in range(lo, hi, BN):
            offs_n = start + tl.arange(0, BN)
            key_ok = offs_n < hi
            if HAS_MASK:
                pad = tl.load(MASK + b * L + offs_n, mask=key_ok, other=1)
                key_ok = key_ok & (pad == 0)
            k = _tile(Kb, offs_n, key_ok, offs_d, D)
            v = _tile(Vb, offs_n, key_ok, offs_v, DV)
            s = mm(q, tl.trans(k), MODE) * scale
            valid = _inside(offs_m[:, None] - offs_n[None, :], W, CAUSAL) & key_ok[None, :] & m_ok[:, None]
            p = tl.where(valid, tl.exp(tl.where(valid, s, 0.0) - lse[:, None]), 0.0)
            dp = mm(do, tl.trans(v), MODE) - delta[:, None]
            ds = p * dp
            dq += scale * mm(ds, k, MODE)
            wsum += tl.sum(ds, 1)
        tl.store(DQ + bh * L * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=m_ok[:, None] & d_ok[None, :])
        tl.store(WSUM + bh * NB + pid, tl.sum(wsum, 0))
    else:
        k0 = pid * BN
        offs_n = k0 + tl.arange(0, BN)
        key_ok = offs_n < L
        if HAS_MASK:
            pad = tl.load(MASK + b * L + offs_n, mask=key_ok, other=1)
            key_ok = key_ok & (pad == 0)
        k = _tile(Kb, offs_n, key_ok, offs_d, D)
        v = _tile(Vb, offs_n, key_ok, offs_v, DV)
        dk = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BDV], dtype=tl.float32)
        # the queries that have one of these keys inside their window
        if CAUSAL:
            lo = k0
        else:
            lo = tl.maximum(k0 - W + 1, 0)
        hi = tl.minimum(k0 + BN + W - 1, L)
        for start in range(lo, hi, BM):
            offs_m = start + tl.arange(0, BM)
            m_ok = offs_m < hi
            q = _tile(Qb, offs_m, m_ok, offs_d, D)
            do = _tile(DOb, offs_m, m_ok, offs_v, DV)
            lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
            st = mm(k, tl.trans(q), MODE) * scale  # [keys, queries]
            valid = _inside(offs_m[None, :] - offs_n[:, None], W, CAUSAL) & key_ok[:, None] & m_ok[None, :]
            pt = tl.where(valid, tl.exp(tl.where(valid, st, 0.0) - lse[None, :]), 0.0)
            dv += mm(pt, do, MODE)
            dpt = mm(v, tl.trans(do), MODE) - delta[None, :]
            dk += scale * mm(pt * dpt, q, MODE)
        tl.atomic_add(DK + bk * L * D + offs_n[:, None] * D + offs_d[None, :], dk, mask=key_ok[:, None] & d_ok[None, :])
        tl.atomic_add(DVO + bk * L * DV + offs_n[:, None] * DV + offs_v[None, :], dv, mask=key_ok[:, None] & v_ok[None, :])


def band_fwd(q, k, v, mask_u8, num, den, far_weight, out, lse, *, window: int, causal: bool, scale: float, mode: int):
    from torch.library import wrap_triton

    b, h, length, d = q.shape
    hk, dv = k.shape[1], v.shape[3]
    block = BAND_BLOCK
    mask = mask_u8 if mask_u8 is not None else torch.empty(1, dtype=torch.uint8, device=q.device)
    fw = far_weight if far_weight is not None else torch.empty(1, dtype=torch.float32, device=q.device)
    grid = (b * h, triton.cdiv(length, block))
    wrap_triton(_band_fwd_kernel)[grid](
        q, k, v, mask, num, den, fw, out, lse,
        scale, length, window, h, h // hk,
        D=int(d), DV=int(dv), BM=block, BN=block, BD=block_dim(d), BDV=block_dim(dv),
        CAUSAL=causal, HAS_MASK=mask_u8 is not None, HAS_FW=far_weight is not None, MODE=mode,
        num_warps=4, num_stages=1,
    )


def band_bwd(q, k, v, mask_u8, grad_out, delta, lse, dq, dk, dv_out, window_sum, *, window: int, causal: bool,
             scale: float, mode: int):
    """dq (stored), dk, dv_out (added) float32; window_sum [B*H, blocks] float32: each query block's sum of dS."""
    from torch.library import wrap_triton

    b, h, length, d = q.shape
    hk, dv = k.shape[1], v.shape[3]
    block = BAND_BLOCK
    nb = triton.cdiv(length, block)
    mask = mask_u8 if mask_u8 is not None else torch.empty(1, dtype=torch.uint8, device=q.device)
    wrap_triton(_band_bwd_kernel)[(b * h, nb, 2)](
        q, k, v, mask, grad_out, delta, lse, dq, dk, dv_out, window_sum,
        scale, length, window, h, h // hk, nb,
        D=int(d), DV=int(dv), BM=block, BN=block, BD=block_dim(d), BDV=block_dim(dv),
        CAUSAL=causal, HAS_MASK=mask_u8 is not None, MODE=mode, num_warps=4, num_stages=1,
    )

