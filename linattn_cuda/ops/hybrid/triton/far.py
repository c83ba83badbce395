"""The Taylor part of the hybrid ("far" keys, beyond the window): the chunked linear form of
linattn_cuda/ops/taylor/triton/chunk.py with the keys shifted by the window.

Query i's far keys are j <= i - W (and, non-causal, also j >= i + W). Walking a "time" t = 0 .. T-1 in chunks of C,
the forward walk puts query t and key t - W at step t (the reverse walk query L-1-t and key L-1-t+W), so that
query and key of one step are exactly a causal pair: the far part is causal Taylor attention between the walk's
queries and keys, computed as in chunk.py: the raw state of every earlier chunk's keys (T0 = sum v,
T1 = sum k v^T, T2 = sum (k x k) v^T and z0, z1, z2 the same without v, float32 in registers) read by phi(q), plus
the chunk's own lower triangle in the quadratic form. Nothing here is normalized: the programs add the raw
numerator sum_far w_ij v_j and normalizer sum_far w_ij of each query (float32 atomics) into NUM [B, H, L, Dv] and
DEN [B, H, L], which the window kernel (band.py) folds into one stabilized normalizer. Non-causal attention runs
the forward and the reverse walk into the same buffers.

Grouped-query attention: query head h reads key/value head h // G in place. Programs: one per (batch * query
head, value block, role); role 0 ("base") holds T0, T1 and the quadratic triangle, role r > 0 the quadratic
features of rows [(r - 1) A, r A); FUSED (D <= 16): one program plays every role.

Backward (see the top of band.py for the notation): with the far scale fs_i = fw e^(-lse_i) (0 for a row without
far keys), g_i = fs_i dO_i and delta_i = fs_i (dO_i . out_i), the far pairs' gradients are those of chunk.py's
causal backward along the same walk: a "dq" program walks forward with the key state, a "dk/dv" program walks
backward with the query state; all add into float32 buffers with atomics (dk, dv of a key/value head receive its G
query heads' shares).

The prefill walks one step more (T = L + 1) so that the state it leaves holds exactly the keys 0 .. L - W, which
no later query sees inside its window, and writes it in the symmetric map of feature_map.py.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ....feature_map import feature_dim
from ...taylor.triton.chunk import _phi2, _phi2_t, _rows_dot, _sym_index, _tile
from ...taylor.triton.common import block_dim, mm, mm_exact_a

__all__ = ["FarConfig", "far_config", "far_fwd", "far_bwd"]

# Block sizes: those of chunk.py (measured there on an H200 for the Taylor kernels, whose loops these are; not yet
# measured for the hybrid on a GPU): C = 32 steps per chunk and 64 value columns per program, float32 (tf32x3
# dots, three times the operand tiles) 32 columns and, backward, C = 16.
FAR_CHUNK = 32  # C: walk steps per chunk (tl.dot needs >= 16)
FAR_CHUNK_BWD_FP32 = 16
FUSED_MAX_FEATURES = 256  # one program holds all BD^2 quadratic features: D <= 16
SPLIT_BLOCK_FEATURES = 128  # split mode: A = SPLIT_BLOCK_FEATURES // BD quadratic rows per program
MAX_BLOCK_DV = 64  # value columns per program
MAX_BLOCK_DV_FP32 = 32


class FarConfig(NamedTuple):
    chunk: int
    block_d: int
    block_dv: int
    rows: int  # A
    fused: bool
    num_warps: int


def far_config(d: int, dv: int, dtype: torch.dtype, backward: bool) -> FarConfig:
    fp32 = dtype == torch.float32
    bd = block_dim(d)
    bdv = min(MAX_BLOCK_DV_FP32 if fp32 else MAX_BLOCK_DV, block_dim(dv))
    fused = bd * bd <= FUSED_MAX_FEATURES
    rows = bd if fused else max(1, SPLIT_BLOCK_FEATURES // bd)
    warps = 8 if rows * bd * bdv >= 256 * 32 else 4  # fewer spills (ptxas -v, tests/hybrid_triton_compile_check.py)
    chunk = FAR_CHUNK_BWD_FP32 if (fp32 and backward) else FAR_CHUNK
    return FarConfig(chunk, bd, bdv, rows, fused, warps)


def roles(d: int, cfg: FarConfig) -> int:
    return 1 if cfg.fused else 1 + triton.cdiv(d, cfg.rows)


@triton.jit
def _walk_rows(t, L, W, REVERSE: tl.constexpr):
    """(query rows, key rows) at walk steps t: query t with key t - W, or reversed L-1-t with L-1-t+W."""
    if REVERSE:
        return L - 1 - t, L - 1 - t + W
    return t, t - W


@triton.jit
def _keys_ok(MASK, b, krow, t, L, T, HAS_MASK: tl.constexpr):
    ok = (krow >= 0) & (krow < L) & (t < T)
    if HAS_MASK:
        pad = tl.load(MASK + b * L + krow, mask=ok, other=1)
        ok = ok & (pad == 0)
    return ok


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _far_fwd_role(
    Q, K, V, MASK, NUM, DEN, KV1, KS1,
    bh, bk, b, pid_v, row0, write_state, scale, c1, L, T, W, M,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    REVERSE: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_STATE: tl.constexpr,
    BASE: tl.constexpr, QUAD: tl.constexpr, MODE: tl.constexpr,
):
    BF: tl.constexpr = A * BD
    half_s2 = 0.5 * scale * scale
    c2 = scale * 0.7071067811865476
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = pid_v * BDV + tl.arange(0, BDV)
    offs_f = tl.arange(0, BF)
    fa = row0 + offs_f // BD
    fb = offs_f % BD
    d_ok = offs_d < D
    v_ok = offs_v < DV
    f_ok = (fa < D) & (fb < D)
    offs_r = row0 + tl.arange(0, A)
    Qb = Q + bh * L * D
    Kb = K + bk * L * D
    Vb = V + bk * L * DV

    t0 = tl.zeros([BDV], dtype=tl.float32)
    t1 = tl.zeros([BD, BDV], dtype=tl.float32)
    z0 = tl.sum(tl.zeros([16], dtype=tl.float32), axis=0)
    z1 = tl.zeros([BD], dtype=tl.float32)
    t2 = tl.zeros([BF, BDV], dtype=tl.float32)
    z2 = tl.zeros([BF], dtype=tl.float32)
    for it in range(0, tl.cdiv(T, C)):
        offs_t = it * C + offs_c
        qrow, krow = _walk_rows(offs_t, L, W, REVERSE)
        i_ok = offs_t < L
        key_ok = _keys_ok(MASK, b, krow, offs_t, L, T, HAS_MASK)
        kf = key_ok.to(tl.float32)
        q = _tile(Qb, qrow, i_ok, offs_d, D)
        k = _tile(Kb, krow, key_ok, offs_d, D)
        v = _tile(Vb, krow, key_ok, offs_v, DV)
        num = tl.zeros([C, BDV], dtype=tl.float32)
        den = tl.zeros([C], dtype=tl.float32)
        if BASE:
            num += t0[None, :] + scale * mm(q, t1, MODE)
            den += z0 + scale * tl.sum(q * z1[None, :], 1)
            s = mm(q, tl.trans(k), MODE) * scale
            valid = (offs_c[None, :] <= offs_c[:, None]) & key_ok[None, :]
            p = tl.where(valid, 1.0 + s * (1.0 + 0.5 * s), 0.0)
            num += mm(p, v, MODE)
            den += tl.sum(p, 1)
            t0 += tl.sum(v, 0)  # padded keys load as 0
            z0 += tl.sum(kf, 0)
            t1 += mm(tl.trans(k), v, MODE)
            z1 += tl.sum(k, 0)
        if QUAD:
            if A == BD:
                qr = q
                kr = k
            else:
                qr = _tile(Qb, qrow, i_ok, offs_r, D)
                kr = _tile(Kb, krow, key_ok, offs_r, D)
            pq = _phi2(qr, q)
            num += half_s2 * mm(pq, t2, MODE)
            den += half_s2 * tl.sum(pq * z2[None, :], 1)
            pkt = _phi2_t(kr, k)
            t2 += mm_exact_a(pkt, v, MODE)  # the exported state stays float32-accurate
            z2 += tl.sum(pkt, 1)
        o_ok = i_ok[:, None] & v_ok[None, :]
        tl.atomic_add(NUM + bh * L * DV + qrow[:, None] * DV + offs_v[None, :], num, mask=o_ok)
        tl.atomic_add(DEN + bh * L + qrow, den, mask=i_ok & (pid_v == 0))

    if WRITE_STATE:  # raw full-map state -> symmetric map (feature_map.py's order), by one query head per group
        if write_state:
            kv1 = KV1 + bk * M * DV
            ks1 = KS1 + bk * M
            first = pid_v == 0
            if BASE:
                tl.store(kv1 + offs_v, t0, mask=v_ok)
                tl.store(ks1, z0, mask=first)
                tl.store(kv1 + (1 + offs_d)[:, None] * DV + offs_v[None, :], t1 * c1, mask=d_ok[:, None] & v_ok[None, :])
                tl.store(ks1 + 1 + offs_d, z1 * c1, mask=d_ok & first)
            if QUAD:
                upper = f_ok & (fa <= fb)
                idx = _sym_index(fa, fb, D)
                coef = tl.where(fa == fb, c2, scale)
                tl.store(kv1 + idx[:, None] * DV + offs_v[None, :], t2 * coef[:, None], mask=upper[:, None] & v_ok[None, :])
                tl.store(ks1 + idx, z2 * coef, mask=upper & first)


@triton.jit
def _far_fwd_kernel(
    Q, K, V, MASK, NUM, DEN, KV1, KS1,
    scale, c1, L, T, W, H, G, M,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    REVERSE: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_STATE: tl.constexpr, FUSED: tl.constexpr,
    MODE: tl.constexpr,
):
    # float scalars arrive as fp64 when torch.compile (inductor) launches the kernel: keep the math fp32
    scale = tl.cast(scale, tl.float32)
    c1 = tl.cast(c1, tl.float32)
    bh_i = tl.program_id(0)
    pid_v = tl.program_id(1)
    role = tl.program_id(2)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    h = bh_i % H
    bk = b * (H // G) + h // G  # the key/value head, read in place
    write = (h % G) == 0
    if FUSED:
        _far_fwd_role(Q, K, V, MASK, NUM, DEN, KV1, KS1, bh, bk, b, pid_v, 0, write, scale, c1, L, T, W, M,
                      D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, WRITE_STATE, True, True, MODE)
    else:
        if role == 0:
            _far_fwd_role(Q, K, V, MASK, NUM, DEN, KV1, KS1, bh, bk, b, pid_v, 0, write, scale, c1, L, T, W, M,
                          D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, WRITE_STATE, True, False, MODE)
        else:
            _far_fwd_role(Q, K, V, MASK, NUM, DEN, KV1, KS1, bh, bk, b, pid_v, (role - 1) * A, write, scale, c1,
                          L, T, W, M, D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, WRITE_STATE, False, True, MODE)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _far_dq_role(
    Q, K, V, MASK, DO, DELTA, FS, DQ,
    bh, bk, b, pid_v, row0, scale, L, W,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    REVERSE: tl.constexpr, HAS_MASK: tl.constexpr, BASE: tl.constexpr, QUAD: tl.constexpr, MODE: tl.constexpr,
):
    BF: tl.constexpr = A * BD
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = pid_v * BDV + tl.arange(0, BDV)
    d_ok = offs_d < D
    offs_r = row0 + tl.arange(0, A)
    r_ok = offs_r < D
    first = (pid_v == 0).to(tl.float32)  # the delta terms are counted by the first value block only
    Qb = Q + bh * L * D
    Kb = K + bk * L * D
    Vb = V + bk * L * DV
    DOb = DO + bh * L * DV

    t1 = tl.zeros([BD, BDV], dtype=tl.float32)
    z1 = tl.zeros([BD], dtype=tl.float32)
    t2 = tl.zeros([BF, BDV], dtype=tl.float32)
    z2 = tl.zeros([BF], dtype=tl.float32)
    for it in range(0, tl.cdiv(L, C)):
        offs_t = it * C + offs_c
        qrow, krow = _walk_rows(offs_t, L, W, REVERSE)
        i_ok = offs_t < L
        key_ok = _keys_ok(MASK, b, krow, offs_t, L, L, HAS_MASK)
        q = _tile(Qb, qrow, i_ok, offs_d, D)
        k = _tile(Kb, krow, key_ok, offs_d, D)
        v = _tile(Vb, krow, key_ok, offs_v, DV)
        fs = tl.load(FS + bh * L + qrow, mask=i_ok, other=0.0)
        dlt = tl.load(DELTA + bh * L + qrow, mask=i_ok, other=0.0) * fs * first
        g = _tile(DOb, qrow, i_ok, offs_v, DV) * fs[:, None]
        dq = tl.zeros([C, BD], dtype=tl.float32)
        if BASE:
            dq += scale * (mm(g, tl.trans(t1), MODE) - dlt[:, None] * z1[None, :])
            s = mm(q, tl.trans(k), MODE) * scale
            valid = (offs_c[None, :] <= offs_c[:, None]) & key_ok[None, :]
            dp = mm(g, tl.trans(v), MODE) - dlt[:, None]
            ds = tl.where(valid, dp * (1.0 + s), 0.0)
            dq += scale * mm(ds, k, MODE)
            t1 += mm(tl.trans(k), v, MODE)
            z1 += tl.sum(k, 0)
        if QUAD:
            u = mm(g, tl.trans(t2), MODE) - dlt[:, None] * z2[None, :]  # [C, BF]
            dqr = (scale * scale) * _rows_dot(u, q, A)  # [C, A]: columns offs_r of dq
            if A == BD:
                dq += dqr
                kr = k
            else:
                tl.atomic_add(DQ + bh * L * D + qrow[:, None] * D + offs_r[None, :], dqr, mask=i_ok[:, None] & r_ok[None, :])
                kr = _tile(Kb, krow, key_ok, offs_r, D)
            pkt = _phi2_t(kr, k)
            t2 += mm(pkt, v, MODE)
            z2 += tl.sum(pkt, 1)
        if BASE or A == BD:
            tl.atomic_add(DQ + bh * L * D + qrow[:, None] * D + offs_d[None, :], dq, mask=i_ok[:, None] & d_ok[None, :])


@triton.jit
def _far_dkdv_role(
    Q, K, V, MASK, DO, DELTA, FS, DK, DVO,
    bh, bk, b, pid_v, row0, scale, L, W,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    REVERSE: tl.constexpr, HAS_MASK: tl.constexpr, BASE: tl.constexpr, QUAD: tl.constexpr, MODE: tl.constexpr,
):
    BF: tl.constexpr = A * BD
    half_s2 = 0.5 * scale * scale
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = pid_v * BDV + tl.arange(0, BDV)
    d_ok = offs_d < D
    v_ok = offs_v < DV
    offs_r = row0 + tl.arange(0, A)
    r_ok = offs_r < D
    first = (pid_v == 0).to(tl.float32)
    Qb = Q + bh * L * D
    Kb = K + bk * L * D
    Vb = V + bk * L * DV
    DOb = DO + bh * L * DV

    r0 = tl.zeros([BDV], dtype=tl.float32)
    r1 = tl.zeros([BD, BDV], dtype=tl.float32)
    rd1 = tl.zeros([BD], dtype=tl.float32)
    r2 = tl.zeros([BF, BDV], dtype=tl.float32)
    rd2 = tl.zeros([BF], dtype=tl.float32)
    n_t = tl.cdiv(L, C)
    for it in range(0, n_t):
        offs_t = (n_t - 1 - it) * C + offs_c  # later steps first: the state holds the queries after this chunk
        qrow, krow = _walk_rows(offs_t, L, W, REVERSE)
        i_ok = offs_t < L
        key_ok = _keys_ok(MASK, b, krow, offs_t, L, L, HAS_MASK)
        kf = key_ok.to(tl.float32)
        k = _tile(Kb, krow, key_ok, offs_d, D)
        v = _tile(Vb, krow, key_ok, offs_v, DV)
        q = _tile(Qb, qrow, i_ok, offs_d, D)
        fs = tl.load(FS + bh * L + qrow, mask=i_ok, other=0.0)
        dlt = tl.load(DELTA + bh * L + qrow, mask=i_ok, other=0.0) * fs * first
        g = _tile(DOb, qrow, i_ok, offs_v, DV) * fs[:, None]
        dk = tl.zeros([C, BD], dtype=tl.float32)
        dv = tl.zeros([C, BDV], dtype=tl.float32)
        if BASE:
            dv += r0[None, :] + scale * mm(k, r1, MODE)
            dk += scale * (mm(v, tl.trans(r1), MODE) - rd1[None, :])
            st = mm(k, tl.trans(q), MODE) * scale  # [keys, queries]
            valid = (offs_c[None, :] >= offs_c[:, None]) & key_ok[:, None]
            pt = tl.where(valid, 1.0 + st * (1.0 + 0.5 * st), 0.0)
            dv += mm(pt, g, MODE)
            dpt = mm(v, tl.trans(g), MODE) - dlt[None, :]
            dst = tl.where(valid, dpt * (1.0 + st), 0.0)
            dk += scale * mm(dst, q, MODE)
            r0 += tl.sum(g, 0)
            r1 += mm(tl.trans(q), g, MODE)
            rd1 += tl.sum(q * dlt[:, None], 0)
        if QUAD:
            if A == BD:
                kr = k
                qr = q
            else:
                kr = _tile(Kb, krow, key_ok, offs_r, D)
                qr = _tile(Qb, qrow, i_ok, offs_r, D)
            pk = _phi2(kr, k)
            dv += half_s2 * mm(pk, r2, MODE)
            w = mm(v, tl.trans(r2), MODE) - rd2[None, :]  # [C, BF]
            dkr = (scale * scale) * _rows_dot(w, k, A) * kf[:, None]  # [C, A]: columns offs_r of dk
            if A == BD:
                dk += dkr
            else:
                tl.atomic_add(DK + bk * L * D + krow[:, None] * D + offs_r[None, :], dkr,
                              mask=key_ok[:, None] & r_ok[None, :])
            pqt = _phi2_t(qr, q)
            r2 += mm(pqt, g, MODE)
            rd2 += tl.sum(pqt * dlt[None, :], 1)
        dk = dk * kf[:, None]
        dv = dv * kf[:, None]
        if BASE or A == BD:
            tl.atomic_add(DK + bk * L * D + krow[:, None] * D + offs_d[None, :], dk, mask=key_ok[:, None] & d_ok[None, :])
        tl.atomic_add(DVO + bk * L * DV + krow[:, None] * DV + offs_v[None, :], dv, mask=key_ok[:, None] & v_ok[None, :])


@triton.jit
def _far_bwd_kernel(
    Q, K, V, MASK, DO, DELTA, FS, DQ, DK, DVO,
    scale, L, W, H, G,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    REVERSE: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr, MODE: tl.constexpr,
):
    """Grid (B*H, value blocks, jobs): job = 2 * role + direction (0: dq, 1: dk and dv)."""
    scale = tl.cast(scale, tl.float32)
    bh_i = tl.program_id(0)
    pid_v = tl.program_id(1)
    job = tl.program_id(2)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    h = bh_i % H
    bk = b * (H // G) + h // G
    role = job // 2
    if FUSED:
        if job == 0:
            _far_dq_role(Q, K, V, MASK, DO, DELTA, FS, DQ, bh, bk, b, pid_v, 0, scale, L, W,
                         D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, True, True, MODE)
        else:
            _far_dkdv_role(Q, K, V, MASK, DO, DELTA, FS, DK, DVO, bh, bk, b, pid_v, 0, scale, L, W,
                           D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, True, True, MODE)
    else:
        row0 = tl.maximum(role - 1, 0) * A
        if job == 0:
            _far_dq_role(Q, K, V, MASK, DO, DELTA, FS, DQ, bh, bk, b, pid_v, row0, scale, L, W,
                         D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, True, False, MODE)
        elif job == 1:
            _far_dkdv_role(Q, K, V, MASK, DO, DELTA, FS, DK, DVO, bh, bk, b, pid_v, row0, scale, L, W,
                           D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, True, False, MODE)
        elif job % 2 == 0:
            _far_dq_role(Q, K, V, MASK, DO, DELTA, FS, DQ, bh, bk, b, pid_v, row0, scale, L, W,
                         D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, False, True, MODE)
        else:
            _far_dkdv_role(Q, K, V, MASK, DO, DELTA, FS, DK, DVO, bh, bk, b, pid_v, row0, scale, L, W,
                           D, DV, C, BD, BDV, A, REVERSE, HAS_MASK, False, True, MODE)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _dummy(dtype, device):
    """A 1-element stand-in for a pointer argument a kernel variant never touches (never an alias of another)."""
    return torch.empty(1, dtype=dtype, device=device)


def far_fwd(q, k, v, mask_u8, num, den, *, window: int, scale: float, reverse: bool, mode: int,
            state: tuple | None = None):
    """Adds the far keys' raw numerator and normalizer of every query into ``num`` [B, H, L, Dv] and ``den``
    [B, H, L] (float32, zero-initialized by the caller). ``mask_u8``: the key padding mask as uint8 or None.
    ``state = (kv [B, Hkv, M, Dv], k_sum [B, Hkv, M])`` (float32): filled with the state of the keys 0 .. L - W
    (forward walk only)."""
    from torch.library import wrap_triton

    b, h, length, d = q.shape
    hk, dv = k.shape[1], v.shape[3]
    d, dv = int(d), int(dv)
    cfg = far_config(d, dv, q.dtype, backward=False)
    f32 = torch.float32
    write = state is not None
    kv1, ks1 = state if write else (_dummy(f32, q.device), _dummy(f32, q.device))
    mask = mask_u8 if mask_u8 is not None else _dummy(torch.uint8, q.device)
    steps = length + 1 if write else length
    grid = (b * h, triton.cdiv(dv, cfg.block_dv), roles(d, cfg))
    wrap_triton(_far_fwd_kernel)[grid](
        q, k, v, mask, num, den, kv1, ks1,
        scale, math.sqrt(scale), length, steps, window, h, h // hk, feature_dim(d),
        D=d, DV=dv, C=cfg.chunk, BD=cfg.block_d, BDV=cfg.block_dv, A=cfg.rows,
        REVERSE=reverse, HAS_MASK=mask_u8 is not None, WRITE_STATE=write, FUSED=cfg.fused, MODE=mode,
        num_warps=cfg.num_warps, num_stages=1,
    )


def far_bwd(q, k, v, mask_u8, grad_out, delta, far_scale, dq, dk, dv_out, *, window: int, scale: float,
            reverse: bool, mode: int):
    """Adds the far pairs' gradients into the float32 buffers dq [B, H, L, D], dk [B, Hkv, L, D], dv_out [B, Hkv, L,
    Dv]. delta [B, H, L] = dO . out, far_scale [B, H, L] = fw e^(-lse) (0 for rows without far keys), float32."""
    from torch.library import wrap_triton

    b, h, length, d = q.shape
    hk, dv = k.shape[1], v.shape[3]
    d, dv = int(d), int(dv)
    cfg = far_config(d, dv, q.dtype, backward=True)
    mask = mask_u8 if mask_u8 is not None else _dummy(torch.uint8, q.device)
    grid = (b * h, triton.cdiv(dv, cfg.block_dv), 2 * roles(d, cfg))
    wrap_triton(_far_bwd_kernel)[grid](
        q, k, v, mask, grad_out, delta, far_scale, dq, dk, dv_out,
        scale, length, window, h, h // hk,
        D=d, DV=dv, C=cfg.chunk, BD=cfg.block_d, BDV=cfg.block_dv, A=cfg.rows,
        REVERSE=reverse, HAS_MASK=mask_u8 is not None, FUSED=cfg.fused, MODE=mode,
        num_warps=cfg.num_warps, num_stages=1,
    )
