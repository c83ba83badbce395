"""Chunked linear form: the quadratic form inside chunks of C tokens, a feature-map state across chunks.

State. The kernels keep the *raw full outer-product* state, without the map's coefficients:

    T0 = sum_j v_j            T1[a] = sum_j k_ja v_j          T2[(a,b)] = sum_j k_ja k_jb v_j     ([*, Dv])
    z0 = sum_j 1              z1[a] = sum_j k_ja              z2[(a,b)] = sum_j k_ja k_jb

over the visible (unpadded) keys of the previous chunks, all float32 in registers, so that

    num_i = T0 + scale q_i.T1 + (scale^2/2) phi2(q_i).T2 + sum_{j in chunk, j <= i} w_ij v_j
    den_i = the same with z, out_i = num_i / den_i        (phi2(x)_(a,b) = x_a x_b)

phi2(q) and phi2(k) are built on the fly in registers as [C, A*BD] tiles (the outer product of the chunk's
[C, A] row slice and its [C, BD] tile, reshaped) and go through tl.dot on tensor cores; the L x M feature
matrices never reach memory. The exported / imported decoding state is the *symmetric* map of ``feature_map.py``:
kv[0] = T0, kv[1+a] = c1 T1[a], kv[1+D+a] = c2 T2[(a,a)], kv[cross(a,b)] = c3 T2[(a,b)] (a < b), and
the same for k_sum with z (c1 = sqrt(scale), c2 = scale/sqrt(2), c3 = scale).

Programs. One program owns one (batch*head, value block, role) and walks the chunks in order:
* role "base": the constant and linear features (T0, T1) and the intra-chunk quadratic part;
* role "quad": the quadratic features of rows a in [row0, row0 + A), all b (a state block [A*BD, BDV]).
FUSED (D <= 16): one program plays every role and writes the output directly (no atomics, deterministic).
Split (larger D, or few programs): roles run in parallel programs and add float32 partial sums with
atomics (summation order, hence the last bits, may vary run to run); the division happens afterwards.

Backward (g_i = dO_i / Z_i, delta_i = g_i . out_i), recomputing in the quadratic form inside chunks:
* "dq" programs walk the chunks forward with the (k, v) state:
      dq_i = scale (T1 g_i - z1 delta_i) + scale^2 sum_b U_i[(a,b)] q_ib + intra,
      U_i = T2 g_i - z2 delta_i   (= J_phi(q_i)^T (S_i g_i - z_i delta_i) in the raw coordinates);
* "dk/dv" programs walk the chunks backward with the (q, g, delta) state of the later chunks,
      R0 = sum g_i, R1[a] = sum q_ia g_i, R2[(a,b)] = sum q_ia q_ib g_i, r1, r2 the same with delta:
      dv_j = R0 + scale k_j.R1 + (scale^2/2) phi2(k_j).R2 + intra,
      dk_j = scale (R1 v_j - r1) + scale^2 sum_b W_j[(a,b)] k_jb + intra,  W_j = R2 v_j - r2.
(U, W symmetric in (a, b), so each quadratic block only produces its own rows' columns of dq and dk; the
sums over b are a reshape to [C, A, BD] and a reduction.) Causal: intra-chunk terms in the quadratic form.
Split mode adds dq, dk, dv with float32 atomics and casts afterwards. Non-causal: the state over all keys (queries) first, then one pass over the queries (keys); Lq != Lk is fine.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ....feature_map import feature_dim
from .common import block_dim, bwd_preprocess, dot_mode, mm, mm_exact_a, new_output

__all__ = ["ChunkConfig", "chunk_config", "chunk_fwd", "chunk_bwd"]

# Block sizes. A quadratic-feature state block is [A * BLOCK_D, BLOCK_DV] float32 held in registers for
# the whole sequence, next to [C, A * BLOCK_D] feature tiles; these bound both (ptxas spills beyond them,
# see tests/triton_compile_check.py). Tuned for D = 16, Dv = 64 by compiling only: retune on a GPU
# (bench/triton_gpu_bench.py sweeps them).
FUSED_MAX_FEATURES = 256  # FUSED needs all BLOCK_D^2 quadratic features in one block: D <= 16
SPLIT_BLOCK_FEATURES = 128  # split mode: A = SPLIT_BLOCK_FEATURES // BLOCK_D rows per block (>= 1)
# Forward and backward defaults measured on an H200 (bf16, B=16, H=16, D=16, Dv=64, causal, L=1024;
# bench/results/gpu/triton_gpu_bench.json, sweep rows): forward C=32 with all 64 value columns in one program
# and 8 warps 0.587 ms, against 0.788 ms for C=32 / 32 columns / 4 warps (the old default) and 0.662 ms for
# C=16 / 32 / 4; backward C=32 / 8 warps 1.165 ms against 1.449 ms for C=16 / 8 warps (the old default).
FWD_CHUNK = 32  # C of the forward
FWD_BLOCK_DV = 64  # value columns per forward program (programs = value blocks x B*H x roles)
FWD_BLOCK_DV_FP32 = 32  # float32 (tf32x3 dots: three times the operand tiles)
BWD_CHUNK = 32  # C of the backward
BWD_CHUNK_FP32 = 16  # float32 (tf32x3 dots): not measured at 32 (more spills), the earlier default kept
BWD_MAX_BLOCK_DV = 64  # the fused backward holds all of Dv (dq sums over it): fused needs Dv <= 64
BWD_MAX_BLOCK_DV_FP32 = 32  # float32 (tf32x3 dots): 64 needs up to 274 KB of shared memory (> 227 KB on H100)
# Below this many programs the kernels spread over more of them, to fill a GPU when B*H is small (B = 1
# prefill): the forward first narrows its value blocks, then both directions split roles across programs.
MIN_PROGRAMS = 264  # two waves on an H100 (132 SMs)
# The forward narrows its value blocks only below one wave: 256 programs of 64 columns beat 512 of 32 (above).
FWD_MIN_PROGRAMS = 132


# ----------------------------------------------------------------------------------------------------
# small jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _sym_index(a, b, D):
    """Index of the symmetric-map feature x_a x_b (a <= b) in feature_map.py's order."""
    diag = 1 + D + a
    cross = 1 + 2 * D + a * D - (a * (a + 1)) // 2 + (b - a - 1)
    return tl.where(a == b, diag, cross)


@triton.jit
def _tile(X, rows, row_ok, cols, D):
    """[len(rows), len(cols)] tile X[rows, cols] (row stride D) in float32; 0 outside the bounds and in the rows
    that are not ``row_ok`` (key tiles pass their padding mask: a padded key loads as 0, whatever it holds)."""
    ok = row_ok[:, None] & (cols[None, :] < D)
    return tl.load(X + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _phi2(xr, x):
    """phi2 tile [C, A*BD]: phi2[i, a*BD + b] = xr[i, a] * x[i, b]  (xr = x[:, row0:row0+A], [C, A])."""
    C: tl.constexpr = x.shape[0]
    A: tl.constexpr = xr.shape[1]
    BD: tl.constexpr = x.shape[1]
    return tl.reshape(xr[:, :, None] * x[:, None, :], (C, A * BD))


@triton.jit
def _phi2_t(xr, x):
    """The transposed tile [A*BD, C] = phi2(xr, x)^T, built from the small transposes."""
    C: tl.constexpr = x.shape[0]
    A: tl.constexpr = xr.shape[1]
    BD: tl.constexpr = x.shape[1]
    return tl.reshape(tl.trans(xr)[:, None, :] * tl.trans(x)[None, :, :], (A * BD, C))


@triton.jit
def _rows_dot(u, x, A: tl.constexpr):
    """out[i, a] = sum_b u[i, a*BD + b] * x[i, b]: [C, A*BD] x [C, BD] -> [C, A]."""
    C: tl.constexpr = x.shape[0]
    BD: tl.constexpr = x.shape[1]
    return tl.sum(tl.reshape(u, (C, A, BD)) * x[:, None, :], axis=2)


@triton.jit
def _emit(ptr, val, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zero_scalar():
    return tl.sum(tl.zeros([16], dtype=tl.float32), axis=0)


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_role(
    Q, K, V, MASK, KV0, KS0, O, Z, NUM, DEN, KV1, KS1,
    bh, b, pid_v, row0, scale, c1, LQ, LK, M,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, WRITE_STATE: tl.constexpr,
    BASE: tl.constexpr, QUAD: tl.constexpr, FINAL: tl.constexpr, MODE: tl.constexpr,
):
    BF: tl.constexpr = A * BD
    half_s2 = 0.5 * scale * scale
    c2 = scale * 0.7071067811865476
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = pid_v * BDV + tl.arange(0, BDV)
    offs_f = tl.arange(0, BF)
    fa = row0 + offs_f // BD  # quadratic feature f = (a, b)
    fb = offs_f % BD
    d_ok = offs_d < D
    v_ok = offs_v < DV
    f_ok = (fa < D) & (fb < D)
    offs_r = row0 + tl.arange(0, A)  # this block's rows a
    Qb = Q + bh * LQ * D
    Kb = K + bh * LK * D
    Vb = V + bh * LK * DV

    t0 = tl.zeros([BDV], dtype=tl.float32)
    t1 = tl.zeros([BD, BDV], dtype=tl.float32)
    z0 = _zero_scalar()
    z1 = tl.zeros([BD], dtype=tl.float32)
    t2 = tl.zeros([BF, BDV], dtype=tl.float32)
    z2 = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:  # symmetric map -> raw full-map state
        kv0 = KV0 + bh * M * DV
        ks0 = KS0 + bh * M
        if BASE:
            t0 = tl.load(kv0 + offs_v, mask=v_ok, other=0.0)
            z0 = tl.load(ks0)
            t1 = tl.load(kv0 + (1 + offs_d)[:, None] * DV + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :], other=0.0) / c1
            z1 = tl.load(ks0 + 1 + offs_d, mask=d_ok, other=0.0) / c1
        if QUAD:
            lo = tl.minimum(fa, fb)
            hi = tl.maximum(fa, fb)
            idx = _sym_index(lo, hi, D)
            coef = tl.where(fa == fb, c2, scale)
            t2 = tl.load(kv0 + idx[:, None] * DV + offs_v[None, :], mask=f_ok[:, None] & v_ok[None, :], other=0.0)
            t2 = t2 / coef[:, None]
            z2 = tl.load(ks0 + idx, mask=f_ok, other=0.0) / coef

    if not CAUSAL:  # phase 1: the state over all keys
        for ck in range(0, tl.cdiv(LK, C)):
            offs_j = ck * C + offs_c
            j_ok = offs_j < LK
            key_ok = j_ok
            if HAS_MASK:
                pad = tl.load(MASK + b * LK + offs_j, mask=j_ok, other=1)
                key_ok = key_ok & (pad == 0)
            kf = key_ok.to(tl.float32)
            k = _tile(Kb, offs_j, key_ok, offs_d, D)
            v = _tile(Vb, offs_j, key_ok, offs_v, DV)
            if BASE:
                t0 += tl.sum(v, 0)  # padded keys loaded as 0
                z0 += tl.sum(kf, 0)
                t1 += mm(tl.trans(k), v, MODE)
                z1 += tl.sum(k, 0)
            if QUAD:
                if A == BD:
                    kr = k
                else:
                    kr = _tile(Kb, offs_j, key_ok, offs_r, D)
                pkt = _phi2_t(kr, k)
                t2 += mm_exact_a(pkt, v, MODE)  # the exported state stays float32-accurate
                z2 += tl.sum(pkt, 1)

    for cq in range(0, tl.cdiv(LQ, C)):
        offs_i = cq * C + offs_c
        i_ok = offs_i < LQ
        q = _tile(Qb, offs_i, i_ok, offs_d, D)
        num = tl.zeros([C, BDV], dtype=tl.float32)
        den = tl.zeros([C], dtype=tl.float32)
        if CAUSAL:  # this chunk's keys sit at the queries' positions
            key_ok = i_ok
            if HAS_MASK:
                pad = tl.load(MASK + b * LK + offs_i, mask=i_ok, other=1)
                key_ok = key_ok & (pad == 0)
            kf = key_ok.to(tl.float32)
            k = _tile(Kb, offs_i, key_ok, offs_d, D)
            v = _tile(Vb, offs_i, key_ok, offs_v, DV)
        if BASE:
            num += t0[None, :] + scale * mm(q, t1, MODE)
            den += z0 + scale * tl.sum(q * z1[None, :], 1)
            if CAUSAL:
                s = mm(q, tl.trans(k), MODE) * scale
                valid = (offs_c[None, :] <= offs_c[:, None]) & key_ok[None, :]
                p = tl.where(valid, 1.0 + s * (1.0 + 0.5 * s), 0.0)
                num += mm(p, v, MODE)
                den += tl.sum(p, 1)
                t0 += tl.sum(v, 0)  # padded keys loaded as 0
                z0 += tl.sum(kf, 0)
                t1 += mm(tl.trans(k), v, MODE)
                z1 += tl.sum(k, 0)
        if QUAD:
            if A == BD:
                qr = q
            else:
                qr = _tile(Qb, offs_i, i_ok, offs_r, D)
            pq = _phi2(qr, q)
            num += half_s2 * mm(pq, t2, MODE)
            den += half_s2 * tl.sum(pq * z2[None, :], 1)
            if CAUSAL:
                if A == BD:
                    kr = k
                else:
                    kr = _tile(Kb, offs_i, key_ok, offs_r, D)
                pkt = _phi2_t(kr, k)
                t2 += mm_exact_a(pkt, v, MODE)  # the exported state stays float32-accurate
                z2 += tl.sum(pkt, 1)
        o_off = bh * LQ * DV + offs_i[:, None] * DV + offs_v[None, :]
        o_ok = i_ok[:, None] & v_ok[None, :]
        if FINAL:
            seen = den != 0.0
            out = num / tl.where(seen, den, 1.0)[:, None]
            out = tl.where(seen[:, None], out, 0.0)
            tl.store(O + o_off, out.to(O.dtype.element_ty), mask=o_ok)
            tl.store(Z + bh * LQ + offs_i, den, mask=i_ok & (pid_v == 0))
        else:
            tl.atomic_add(NUM + o_off, num, mask=o_ok)
            tl.atomic_add(DEN + bh * LQ + offs_i, den, mask=i_ok & (pid_v == 0))

    if WRITE_STATE:  # raw full-map state -> symmetric map
        kv1 = KV1 + bh * M * DV
        ks1 = KS1 + bh * M
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
def _chunk_fwd_kernel(
    Q, K, V, MASK, KV0, KS0, O, Z, NUM, DEN, KV1, KS1,
    scale, c1, LQ, LK, H, M,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, WRITE_STATE: tl.constexpr,
    FUSED: tl.constexpr, MODE: tl.constexpr,
):
    # float scalars arrive as fp64 when torch.compile (inductor) launches the kernel: keep the math fp32
    scale = tl.cast(scale, tl.float32)
    c1 = tl.cast(c1, tl.float32)
    bh_i = tl.program_id(0)  # B*H on axis 0: axes 1 and 2 are limited to 65535
    pid_v = tl.program_id(1)
    role = tl.program_id(2)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    if FUSED:
        _fwd_role(Q, K, V, MASK, KV0, KS0, O, Z, NUM, DEN, KV1, KS1, bh, b, pid_v, 0, scale, c1, LQ, LK, M,
                  D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, HAS_INIT, WRITE_STATE, True, True, True, MODE)
    else:
        if role == 0:
            _fwd_role(Q, K, V, MASK, KV0, KS0, O, Z, NUM, DEN, KV1, KS1, bh, b, pid_v, 0, scale, c1, LQ, LK, M,
                      D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, HAS_INIT, WRITE_STATE, True, False, False, MODE)
        else:
            _fwd_role(Q, K, V, MASK, KV0, KS0, O, Z, NUM, DEN, KV1, KS1, bh, b, pid_v, (role - 1) * A, scale, c1,
                      LQ, LK, M, D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, HAS_INIT, WRITE_STATE, False, True, False, MODE)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dq_role(
    Q, K, V, MASK, DO, DELTA, RZ, DQ,
    bh, b, pid_v, row0, scale, LQ, LK,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BASE: tl.constexpr, QUAD: tl.constexpr,
    ATOMIC: tl.constexpr, MODE: tl.constexpr,
):
    BF: tl.constexpr = A * BD
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = pid_v * BDV + tl.arange(0, BDV)
    offs_f = tl.arange(0, BF)
    fa = row0 + offs_f // BD
    fb = offs_f % BD
    d_ok = offs_d < D
    v_ok = offs_v < DV
    offs_r = row0 + tl.arange(0, A)
    r_ok = offs_r < D
    first = (pid_v == 0).to(tl.float32)  # the delta terms are counted by the first value block only
    Qb = Q + bh * LQ * D
    Kb = K + bh * LK * D
    Vb = V + bh * LK * DV
    DOb = DO + bh * LQ * DV

    t1 = tl.zeros([BD, BDV], dtype=tl.float32)
    z1 = tl.zeros([BD], dtype=tl.float32)
    t2 = tl.zeros([BF, BDV], dtype=tl.float32)
    z2 = tl.zeros([BF], dtype=tl.float32)
    if not CAUSAL:
        for ck in range(0, tl.cdiv(LK, C)):
            offs_j = ck * C + offs_c
            j_ok = offs_j < LK
            key_ok = j_ok
            if HAS_MASK:
                pad = tl.load(MASK + b * LK + offs_j, mask=j_ok, other=1)
                key_ok = key_ok & (pad == 0)
            k = _tile(Kb, offs_j, key_ok, offs_d, D)
            v = _tile(Vb, offs_j, key_ok, offs_v, DV)
            if BASE:
                t1 += mm(tl.trans(k), v, MODE)
                z1 += tl.sum(k, 0)
            if QUAD:
                if A == BD:
                    kr = k
                else:
                    kr = _tile(Kb, offs_j, key_ok, offs_r, D)
                pkt = _phi2_t(kr, k)
                t2 += mm(pkt, v, MODE)
                z2 += tl.sum(pkt, 1)

    for cq in range(0, tl.cdiv(LQ, C)):
        offs_i = cq * C + offs_c
        i_ok = offs_i < LQ
        q = _tile(Qb, offs_i, i_ok, offs_d, D)
        rz = tl.load(RZ + bh * LQ + offs_i, mask=i_ok, other=0.0)
        dlt = tl.load(DELTA + bh * LQ + offs_i, mask=i_ok, other=0.0) * first
        g = _tile(DOb, offs_i, i_ok, offs_v, DV) * rz[:, None]
        dq = tl.zeros([C, BD], dtype=tl.float32)
        if CAUSAL:
            key_ok = i_ok
            if HAS_MASK:
                pad = tl.load(MASK + b * LK + offs_i, mask=i_ok, other=1)
                key_ok = key_ok & (pad == 0)
            k = _tile(Kb, offs_i, key_ok, offs_d, D)
            v = _tile(Vb, offs_i, key_ok, offs_v, DV)
        if BASE:
            dq += scale * (mm(g, tl.trans(t1), MODE) - dlt[:, None] * z1[None, :])
            if CAUSAL:
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
            else:
                _emit(DQ + bh * LQ * D + offs_i[:, None] * D + offs_r[None, :], dqr, i_ok[:, None] & r_ok[None, :], ATOMIC)
            if CAUSAL:
                if A == BD:
                    kr = k
                else:
                    kr = _tile(Kb, offs_i, key_ok, offs_r, D)
                pkt = _phi2_t(kr, k)
                t2 += mm(pkt, v, MODE)
                z2 += tl.sum(pkt, 1)
        if BASE or A == BD:
            _emit(DQ + bh * LQ * D + offs_i[:, None] * D + offs_d[None, :], dq, i_ok[:, None] & d_ok[None, :], ATOMIC)


@triton.jit
def _bwd_dkdv_role(
    Q, K, V, MASK, DO, DELTA, RZ, DK, DVO,
    bh, b, pid_v, row0, scale, LQ, LK,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BASE: tl.constexpr, QUAD: tl.constexpr,
    ATOMIC: tl.constexpr, MODE: tl.constexpr,
):
    BF: tl.constexpr = A * BD
    half_s2 = 0.5 * scale * scale
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = pid_v * BDV + tl.arange(0, BDV)
    offs_f = tl.arange(0, BF)
    fa = row0 + offs_f // BD
    fb = offs_f % BD
    d_ok = offs_d < D
    v_ok = offs_v < DV
    offs_r = row0 + tl.arange(0, A)
    r_ok = offs_r < D
    first = (pid_v == 0).to(tl.float32)
    Qb = Q + bh * LQ * D
    Kb = K + bh * LK * D
    Vb = V + bh * LK * DV
    DOb = DO + bh * LQ * DV

    r0 = tl.zeros([BDV], dtype=tl.float32)
    r1 = tl.zeros([BD, BDV], dtype=tl.float32)
    rd1 = tl.zeros([BD], dtype=tl.float32)
    r2 = tl.zeros([BF, BDV], dtype=tl.float32)
    rd2 = tl.zeros([BF], dtype=tl.float32)
    if not CAUSAL:  # phase 1: the state over all queries
        for cq in range(0, tl.cdiv(LQ, C)):
            offs_i = cq * C + offs_c
            i_ok = offs_i < LQ
            q = _tile(Qb, offs_i, i_ok, offs_d, D)
            rz = tl.load(RZ + bh * LQ + offs_i, mask=i_ok, other=0.0)
            dlt = tl.load(DELTA + bh * LQ + offs_i, mask=i_ok, other=0.0) * first
            g = _tile(DOb, offs_i, i_ok, offs_v, DV) * rz[:, None]
            if BASE:
                r0 += tl.sum(g, 0)
                r1 += mm(tl.trans(q), g, MODE)
                rd1 += tl.sum(q * dlt[:, None], 0)
            if QUAD:
                if A == BD:
                    qr = q
                else:
                    qr = _tile(Qb, offs_i, i_ok, offs_r, D)
                pqt = _phi2_t(qr, q)
                r2 += mm(pqt, g, MODE)
                rd2 += tl.sum(pqt * dlt[None, :], 1)

    n_k = tl.cdiv(LK, C)
    for it in range(0, n_k):
        if CAUSAL:
            ck = n_k - 1 - it  # later chunks first: the state holds the queries after this chunk
        else:
            ck = it
        offs_j = ck * C + offs_c
        j_ok = offs_j < LK
        key_ok = j_ok
        if HAS_MASK:
            pad = tl.load(MASK + b * LK + offs_j, mask=j_ok, other=1)
            key_ok = key_ok & (pad == 0)
        kf = key_ok.to(tl.float32)
        k = _tile(Kb, offs_j, key_ok, offs_d, D)
        v = _tile(Vb, offs_j, key_ok, offs_v, DV)
        dk = tl.zeros([C, BD], dtype=tl.float32)
        dv = tl.zeros([C, BDV], dtype=tl.float32)
        if CAUSAL:  # this chunk's queries (same positions as the keys)
            q = _tile(Qb, offs_j, j_ok, offs_d, D)
            rz = tl.load(RZ + bh * LQ + offs_j, mask=j_ok, other=0.0)
            dlt = tl.load(DELTA + bh * LQ + offs_j, mask=j_ok, other=0.0) * first
            g = _tile(DOb, offs_j, j_ok, offs_v, DV) * rz[:, None]
        if BASE:
            dv += r0[None, :] + scale * mm(k, r1, MODE)
            dk += scale * (mm(v, tl.trans(r1), MODE) - rd1[None, :])
            if CAUSAL:
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
            else:
                kr = _tile(Kb, offs_j, key_ok, offs_r, D)
            pk = _phi2(kr, k)
            dv += half_s2 * mm(pk, r2, MODE)
            w = mm(v, tl.trans(r2), MODE) - rd2[None, :]  # [C, BF]
            dkr = (scale * scale) * _rows_dot(w, k, A) * kf[:, None]  # [C, A]: columns offs_r of dk
            if A == BD:
                dk += dkr
            else:
                _emit(DK + bh * LK * D + offs_j[:, None] * D + offs_r[None, :], dkr, j_ok[:, None] & r_ok[None, :], ATOMIC)
            if CAUSAL:
                if A == BD:
                    qr = q
                else:
                    qr = _tile(Qb, offs_j, j_ok, offs_r, D)
                pqt = _phi2_t(qr, q)
                r2 += mm(pqt, g, MODE)
                rd2 += tl.sum(pqt * dlt[None, :], 1)
        dk = dk * kf[:, None]
        dv = dv * kf[:, None]
        if BASE or A == BD:
            _emit(DK + bh * LK * D + offs_j[:, None] * D + offs_d[None, :], dk, j_ok[:, None] & d_ok[None, :], ATOMIC)
        _emit(DVO + bh * LK * DV + offs_j[:, None] * DV + offs_v[None, :], dv, j_ok[:, None] & v_ok[None, :], ATOMIC)


@triton.jit
def _chunk_bwd_kernel(
    Q, K, V, MASK, DO, DELTA, RZ, DQ, DK, DVO,
    scale, LQ, LK, H,
    D, DV, C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, A: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr, MODE: tl.constexpr,
):
    """Grid (B*H, value blocks, jobs); job = 2 * role + direction (direction 0: dq, 1: dk and dv); role 0 = base, role r > 0 = quad rows."""
    # float scalars arrive as fp64 when torch.compile (inductor) launches the kernel: keep the math fp32
    scale = tl.cast(scale, tl.float32)
    bh_i = tl.program_id(0)
    pid_v = tl.program_id(1)
    job = tl.program_id(2)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    role = job // 2
    if FUSED:
        if job == 0:
            _bwd_dq_role(Q, K, V, MASK, DO, DELTA, RZ, DQ, bh, b, pid_v, 0, scale, LQ, LK,
                         D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, True, True, False, MODE)
        else:
            _bwd_dkdv_role(Q, K, V, MASK, DO, DELTA, RZ, DK, DVO, bh, b, pid_v, 0, scale, LQ, LK,
                           D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, True, True, False, MODE)
    else:
        row0 = tl.maximum(role - 1, 0) * A
        if job == 0:
            _bwd_dq_role(Q, K, V, MASK, DO, DELTA, RZ, DQ, bh, b, pid_v, row0, scale, LQ, LK,
                         D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, True, False, True, MODE)
        elif job == 1:
            _bwd_dkdv_role(Q, K, V, MASK, DO, DELTA, RZ, DK, DVO, bh, b, pid_v, row0, scale, LQ, LK,
                           D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, True, False, True, MODE)
        elif job % 2 == 0:
            _bwd_dq_role(Q, K, V, MASK, DO, DELTA, RZ, DQ, bh, b, pid_v, row0, scale, LQ, LK,
                         D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, False, True, True, MODE)
        else:
            _bwd_dkdv_role(Q, K, V, MASK, DO, DELTA, RZ, DK, DVO, bh, b, pid_v, row0, scale, LQ, LK,
                           D, DV, C, BD, BDV, A, CAUSAL, HAS_MASK, False, True, True, MODE)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
class ChunkConfig(NamedTuple):
    chunk: int  # C, tokens per chunk (power of two >= 16)
    block_d: int  # BD
    block_dv: int  # BDV, value columns per program
    rows: int  # A, quadratic-feature rows per state block
    fused: bool  # one program per (value block, b*h) does everything; else roles in parallel + atomics
    num_warps: int


def _n_quad_blocks(d: int, rows: int) -> int:
    return triton.cdiv(d, rows)


def chunk_config(d: int, dv: int, *, backward: bool, programs: int = 1 << 30, chunk: Optional[int] = None,
                 fused: Optional[bool] = None, block_dv: Optional[int] = None,
                 num_warps: Optional[int] = None, fp32: bool = False) -> ChunkConfig:
    """Block sizes and mode for the chunked kernels (``programs`` = B*H, used to fill the GPU).

    ``chunk``, ``fused``, ``block_dv``, ``num_warps`` override the defaults (tests and tuning)."""
    bd = block_dim(d)
    bdv_full = block_dim(dv)
    can_fuse = bd * bd <= FUSED_MAX_FEATURES
    if backward:
        max_bdv = BWD_MAX_BLOCK_DV_FP32 if fp32 else BWD_MAX_BLOCK_DV
        can_fuse = can_fuse and bdv_full <= max_bdv
        want_fused = can_fuse and 2 * programs >= MIN_PROGRAMS // 2  # fused: 2 programs (dq, dk/dv) per head
        if fused is not None:
            want_fused = fused and can_fuse
        bdv = bdv_full if want_fused else min(max_bdv, bdv_full)
        c = chunk or (BWD_CHUNK_FP32 if fp32 else BWD_CHUNK)
    else:
        bdv = min(FWD_BLOCK_DV_FP32 if fp32 else FWD_BLOCK_DV, bdv_full)
        while bdv > 16 and programs * triton.cdiv(dv, bdv) < FWD_MIN_PROGRAMS:
            bdv //= 2
        want_fused = can_fuse and programs * triton.cdiv(dv, bdv) >= MIN_PROGRAMS // 2
        if fused is not None:
            want_fused = fused and can_fuse
        c = chunk or FWD_CHUNK
    if block_dv is not None and not (backward and want_fused):
        bdv = block_dv
    rows = bd if want_fused else max(1, SPLIT_BLOCK_FEATURES // bd)
    if not want_fused and rows >= d:  # keep the split real: at least two quadratic blocks
        rows = max(1, next_lower_pow2(max(1, d - 1)))
    features = rows * bd
    warps = num_warps or (8 if features * bdv > 256 * 32 else 4)
    return ChunkConfig(c, bd, bdv, rows, want_fused, warps)


def next_lower_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _dummy(dtype, device):
    """A 1-element stand-in for a pointer argument a kernel variant never touches. Every pointer argument gets
    its own tensor (never an alias of another argument), so torch.compile's functionalization of the kernel
    call stays correct even if it has to assume that every argument is written."""
    return torch.empty(1, dtype=dtype, device=device)


def _mask_arg(key_padding_mask, device):
    if key_padding_mask is None:
        return _dummy(torch.uint8, device), False
    return key_padding_mask.contiguous().view(torch.uint8), True


def chunk_fwd(
    q, k, v, key_padding_mask, causal: bool, scale: float, *,
    initial_state: Optional[tuple] = None, write_state: bool = False,
    chunk: Optional[int] = None, fused: Optional[bool] = None, block_dv: Optional[int] = None,
    num_warps: Optional[int] = None,
):
    """``(out, Z)`` (and ``kv, k_sum`` when ``write_state``) by the chunked linear form.

    ``initial_state`` / the returned state: ``(kv [B,H,M,Dv], k_sum [B,H,M])`` float32, symmetric map.
    """
    from torch.library import wrap_triton

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, lq, d = q.shape
    lk, d, dv = k.shape[2], int(d), int(v.shape[3])  # ints: the block sizes derive from the head dims
    m = feature_dim(d)
    cfg = chunk_config(d, dv, backward=False, programs=int(b * h), chunk=chunk, fused=fused, block_dv=block_dv,
                       num_warps=num_warps, fp32=q.dtype == torch.float32)
    mask, has_mask = _mask_arg(key_padding_mask, q.device)
    n_roles = 1 if cfg.fused else 1 + _n_quad_blocks(d, cfg.rows)
    f32 = torch.float32
    if initial_state is not None:
        kv0, ks0 = initial_state[0].contiguous(), initial_state[1].contiguous()
    else:
        kv0, ks0 = _dummy(f32, q.device), _dummy(f32, q.device)
    if write_state:
        kv1 = new_output((b, h, m, dv), f32, q.device)
        ks1 = new_output((b, h, m), f32, q.device)
    else:
        kv1, ks1 = _dummy(f32, q.device), _dummy(f32, q.device)
    if cfg.fused:  # written directly: out, Z
        out = new_output((b, h, lq, dv), q.dtype, q.device)
        z = new_output((b, h, lq), f32, q.device)
        num, den = _dummy(f32, q.device), _dummy(f32, q.device)
    else:  # float32 partial sums added with atomics, divided below
        out, z = _dummy(q.dtype, q.device), _dummy(f32, q.device)
        num = torch.zeros((b, h, lq, dv), dtype=f32, device=q.device)
        den = torch.zeros((b, h, lq), dtype=f32, device=q.device)
    grid = (b * h, triton.cdiv(dv, cfg.block_dv), n_roles)
    wrap_triton(_chunk_fwd_kernel)[grid](
        q, k, v, mask, kv0, ks0, out, z, num, den, kv1, ks1,
        scale, math.sqrt(scale), lq, lk, h, m,
        D=d, DV=dv, C=cfg.chunk, BD=cfg.block_d, BDV=cfg.block_dv, A=cfg.rows,
        CAUSAL=causal, HAS_MASK=has_mask, HAS_INIT=initial_state is not None, WRITE_STATE=write_state,
        FUSED=cfg.fused, MODE=dot_mode(q.dtype, chunked=True), num_warps=cfg.num_warps, num_stages=1,
    )
    if not cfg.fused:
        seen = den != 0
        out = torch.where(seen.unsqueeze(-1), num / torch.where(seen, den, 1.0).unsqueeze(-1), 0.0).to(q.dtype)
        z = den
    if write_state:
        return out, z, kv1, ks1
    return out, z


def chunk_bwd(grad_out, q, k, v, key_padding_mask, out, den, causal: bool, scale: float, *,
              chunk: Optional[int] = None, fused: Optional[bool] = None, block_dv: Optional[int] = None,
              num_warps: Optional[int] = None):
    """``(dq, dk, dv)`` in the inputs' dtype by the chunked linear form (see the module docstring)."""
    from torch.library import wrap_triton

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out = grad_out.contiguous(), out.contiguous()
    b, h, lq, d = q.shape
    lk, d, dv = k.shape[2], int(d), int(v.shape[3])  # ints: the block sizes derive from the head dims
    cfg = chunk_config(d, dv, backward=True, programs=int(b * h), chunk=chunk, fused=fused, block_dv=block_dv,
                       num_warps=num_warps, fp32=q.dtype == torch.float32)
    mask, has_mask = _mask_arg(key_padding_mask, q.device)
    delta, rz = bwd_preprocess(out, grad_out, den)
    if cfg.fused:
        dq = new_output(q.shape, q.dtype, q.device)
        dk = new_output(k.shape, k.dtype, k.device)
        dvv = new_output(v.shape, v.dtype, v.device)
        n_jobs = 2
    else:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dvv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        n_jobs = 2 * (1 + _n_quad_blocks(d, cfg.rows))
    grid = (b * h, triton.cdiv(dv, cfg.block_dv), n_jobs)
    wrap_triton(_chunk_bwd_kernel)[grid](
        q, k, v, mask, grad_out, delta, rz, dq, dk, dvv,
        scale, lq, lk, h,
        D=d, DV=dv, C=cfg.chunk, BD=cfg.block_d, BDV=cfg.block_dv, A=cfg.rows,
        CAUSAL=causal, HAS_MASK=has_mask, FUSED=cfg.fused, MODE=dot_mode(q.dtype, chunked=True),
        num_warps=cfg.num_warps, num_stages=1,
    )
    if not cfg.fused:
        dq, dk, dvv = dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)
    return dq, dk, dvv
