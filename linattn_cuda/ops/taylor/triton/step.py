"""Fused decoding step: read the symmetric-map state once, add phi(k) v^T, write it once, read out phi(q).

    kv' = kv + phi(k) v^T,   k_sum' = k_sum + phi(k),   out = phi(q)^T kv' / phi(q)^T k_sum'

One program per (batch*head, value block) walks the M features in blocks; phi(q) and phi(k) of a feature
block are computed on the fly from its index (feature_map.py's order, decoded arithmetically), so no
feature vector or index table goes through memory. The state stays float32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ....feature_map import feature_dim
from .common import block_dim, new_output

__all__ = ["step_fwd"]

STEP_BLOCK_M = 64  # state rows per loop iteration
STEP_BLOCK_DV = 64  # value columns per program (programs = B*H x value blocks)
STEP_NUM_WARPS = 4


@triton.jit
def sym_decode(m, D):
    """``(kind, a, b)`` of symmetric-map feature ``m``: kind 0 = the constant 1, 1 = x_a, 2 = x_a^2,
    3 = x_a x_b with a < b (row-major), as in feature_map.py."""
    u = m - 1 - 2 * D  # offset in the cross-term list
    a = tl.zeros_like(m)
    for r in range(1, D):  # row r of the cross terms starts at r*D - r(r+1)/2
        a += ((r * D - (r * (r + 1)) // 2) <= u).to(tl.int32)
    b = u - (a * D - (a * (a + 1)) // 2) + a + 1
    kind = tl.where(m == 0, 0, tl.where(m <= D, 1, tl.where(m <= 2 * D, 2, 3)))
    a = tl.where(kind == 1, m - 1, tl.where(kind == 2, m - 1 - D, a))
    b = tl.where(kind == 3, b, a)
    return kind, a, b


@triton.jit
def _phi(X, kind, a, b, ok, c1, c2, c3):
    xa = tl.load(X + a, mask=ok & (kind >= 1), other=0.0).to(tl.float32)
    xb = tl.load(X + b, mask=ok & (kind >= 2), other=0.0).to(tl.float32)
    val = tl.where(kind == 1, c1 * xa, tl.where(kind == 2, c2 * xa * xb, c3 * xa * xb))
    return tl.where(ok & (kind == 0), 1.0, tl.where(ok, val, 0.0))


@triton.jit
def _step_kernel(
    Q, K, V, KV, KS, O, KV1, KS1,
    scale, c1, M,
    D, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # float scalars arrive as fp64 when torch.compile (inductor) launches the kernel: keep the math fp32
    scale = tl.cast(scale, tl.float32)
    c1 = tl.cast(c1, tl.float32)
    bh = tl.program_id(0).to(tl.int64)  # B*H on axis 0 (axis 1 is limited to 65535)
    pid_v = tl.program_id(1)
    c2 = scale * 0.7071067811865476
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    v = tl.load(V + bh * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    num = tl.zeros([BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    first = pid_v == 0
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        kind, a, b = sym_decode(offs_m, D)
        fq = _phi(Q + bh * D, kind, a, b, m_ok, c1, c2, scale)
        fk = _phi(K + bh * D, kind, a, b, m_ok, c1, c2, scale)
        tile = bh * M * DV + offs_m[:, None] * DV + offs_v[None, :]
        tile_ok = m_ok[:, None] & v_ok[None, :]
        kv = tl.load(KV + tile, mask=tile_ok, other=0.0) + fk[:, None] * v[None, :]
        tl.store(KV1 + tile, kv, mask=tile_ok)
        num += tl.sum(fq[:, None] * kv, 0)
        ks = tl.load(KS + bh * M + offs_m, mask=m_ok, other=0.0) + fk
        tl.store(KS1 + bh * M + offs_m, ks, mask=m_ok & first)
        den += fq * ks
    total = tl.sum(den, 0)
    seen = total != 0.0
    out = tl.where(seen, num / tl.where(seen, total, 1.0), 0.0)
    tl.store(O + bh * DV + offs_v, out.to(O.dtype.element_ty), mask=v_ok)


def step_fwd(q, k, v, kv, k_sum, scale: float, *, block_m: Optional[int] = None, block_dv: Optional[int] = None,
             num_warps: Optional[int] = None):
    """``(out [B,H,Dv], kv', k_sum')``; q, k ``[B,H,D]``, v ``[B,H,Dv]``, state float32 symmetric map.

    ``block_m`` (state rows per iteration), ``block_dv`` (value columns per program) and ``num_warps``
    override the defaults (tests and tuning: bench/triton_gpu_bench.py sweeps them)."""
    from torch.library import wrap_triton

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kv, k_sum = kv.contiguous(), k_sum.contiguous()
    b, h, d = q.shape
    d, dv = int(d), int(v.shape[-1])
    m = feature_dim(d)
    block_dv = block_dv or min(STEP_BLOCK_DV, block_dim(dv))
    block_m = block_m or STEP_BLOCK_M
    num_warps = num_warps or STEP_NUM_WARPS
    out = new_output((b, h, dv), q.dtype, q.device)
    kv1 = new_output(kv.shape, torch.float32, q.device)
    ks1 = new_output(k_sum.shape, torch.float32, q.device)
    grid = (b * h, triton.cdiv(dv, block_dv))
    wrap_triton(_step_kernel)[grid](
        q, k, v, kv, k_sum, out, kv1, ks1, scale, math.sqrt(scale), m,
        D=d, DV=dv, BLOCK_M=block_m, BLOCK_DV=block_dv, num_warps=num_warps,
    )
    return out, kv1, ks1
