"""Quadratic (parallel) form: FlashAttention's dataflow with exp replaced by w = 1 + s + s^2/2.

Forward, one program per (batch*head, query block, value block):
    for each key block:  s = scale q k^T;  p = 1 + s + s^2/2 (0 where masked);  acc += p v;  z += rowsum(p)
    out = acc / z (0 where z == 0),  Z = z saved in float32 for the backward.
w >= 1/2 cannot overflow the way exp does, so no running maximum and no rescaling are needed.

Backward (g = dO / Z, delta_i = g_i . out_i, both from ``common.bwd_preprocess``):
    dw_ij = g_i . v_j - delta_i,  ds_ij = dw_ij (1 + s_ij)
    dv_j = sum_i p_ij g_i,  dk_j = scale sum_i ds_ij q_i     (one program per key block, loops over queries)
    dq_i = scale sum_j ds_ij k_j                               (one program per query block, loops over keys)
Deterministic (no atomics); parallel over L, so B = 1 fills the GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import block_dim, bwd_preprocess, dot_mode, mm, new_output

__all__ = ["parallel_fwd", "parallel_bwd"]


@triton.jit
def _load_keys(K, V, MASK, bh, b, offs_n, offs_d, offs_v, LK, D, DV, HAS_MASK: tl.constexpr):
    """(k, v, key_ok) of the key block offs_n: key_ok = in range and not padded; k, v in float32, with padded
    keys loaded as 0 (whatever they hold, NaN or inf, cannot reach a product)."""
    n_ok = offs_n < LK
    key_ok = n_ok
    if HAS_MASK:
        pad = tl.load(MASK + b * LK + offs_n, mask=n_ok, other=1)
        key_ok = key_ok & (pad == 0)
    k = tl.load(K + bh * LK * D + offs_n[:, None] * D + offs_d[None, :], mask=key_ok[:, None] & (offs_d < D)[None, :],
                other=0.0)
    v = tl.load(V + bh * LK * DV + offs_n[:, None] * DV + offs_v[None, :],
                mask=key_ok[:, None] & (offs_v < DV)[None, :], other=0.0)
    return k.to(tl.float32), v.to(tl.float32), key_ok


@triton.jit
def _parallel_fwd_kernel(
    Q, K, V, MASK, O, Z,
    scale, LQ, LK, H,
    D, DV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
):
    # float scalars arrive as fp64 when torch.compile (inductor) launches the kernel: keep the math fp32
    scale = tl.cast(scale, tl.float32)
    bh_i = tl.program_id(0)  # B*H on axis 0 (axes 1 and 2 are limited to 65535)
    pid_m = tl.program_id(1)
    pid_v = tl.program_id(2)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    v_ok = offs_v < DV
    q = tl.load(Q + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    z = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, key_ok = _load_keys(K, V, MASK, bh, b, offs_n, offs_d, offs_v, LK, D, DV, HAS_MASK)
        s = mm(q, tl.trans(k), MODE) * scale
        p = 1.0 + s * (1.0 + 0.5 * s)
        valid = key_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        acc += mm(p, v, MODE)
        z += tl.sum(p, 1)
    seen = z != 0.0
    out = acc / tl.where(seen, z, 1.0)[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    tl.store(
        O + bh * LQ * DV + offs_m[:, None] * DV + offs_v[None, :],
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None] & v_ok[None, :],
    )
    tl.store(Z + bh * LQ + offs_m, z, mask=m_ok & (pid_v == 0))


@triton.jit
def _parallel_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, DELTA, RZ, DK, DV_OUT,
    scale, LQ, LK, H,
    D, DV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
):
    """One key block: loops over the query blocks that see it; everything transposed ([keys, queries])."""
    # float scalars arrive as fp64 when torch.compile (inductor) launches the kernel: keep the math fp32
    scale = tl.cast(scale, tl.float32)
    bh_i = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < LK
    d_ok = offs_d < D
    v_ok = offs_v < DV
    k, v, key_ok = _load_keys(K, V, MASK, bh, b, offs_n, offs_d, offs_v, LK, D, DV, HAS_MASK)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, LQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < LQ
        q = tl.load(Q + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + bh * LQ * DV + offs_m[:, None] * DV + offs_v[None, :], mask=m_ok[:, None] & v_ok[None, :], other=0.0)
        q = q.to(tl.float32)
        rz = tl.load(RZ + bh * LQ + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * LQ + offs_m, mask=m_ok, other=0.0)
        g = do.to(tl.float32) * rz[:, None]  # [M, DV]
        st = mm(k, tl.trans(q), MODE) * scale  # [N, M]
        valid = key_ok[:, None] & m_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.where(valid, 1.0 + st * (1.0 + 0.5 * st), 0.0)
        dv += mm(pt, g, MODE)
        dpt = mm(v, tl.trans(do), MODE) * rz[None, :] - delta[None, :]  # dO itself in the dot: see the dq kernel
        dst = tl.where(valid, dpt * (1.0 + st), 0.0)
        dk += mm(dst, q, MODE)
    dk = dk * scale
    tl.store(
        DK + bh * LK * D + offs_n[:, None] * D + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_ok[:, None] & d_ok[None, :],
    )
    tl.store(
        DV_OUT + bh * LK * DV + offs_n[:, None] * DV + offs_v[None, :],
        dv.to(DV_OUT.dtype.element_ty),
        mask=n_ok[:, None] & v_ok[None, :],
    )


@triton.jit
def _parallel_bwd_dq_kernel(
    Q, K, V, MASK, DO, DELTA, RZ, DQ,
    scale, LQ, LK, H,
    D, DV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
):
    # float scalars arrive as fp64 when torch.compile (inductor) launches the kernel: keep the math fp32
    scale = tl.cast(scale, tl.float32)
    bh_i = tl.program_id(0)
    pid_m = tl.program_id(1)
    bh = bh_i.to(tl.int64)
    b = (bh_i // H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    v_ok = offs_v < DV
    q = tl.load(Q + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + bh * LQ * DV + offs_m[:, None] * DV + offs_v[None, :], mask=m_ok[:, None] & v_ok[None, :], other=0.0)
    q = q.to(tl.float32)
    rz = tl.load(RZ + bh * LQ + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * LQ + offs_m, mask=m_ok, other=0.0)
    do = do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, key_ok = _load_keys(K, V, MASK, bh, b, offs_n, offs_d, offs_v, LK, D, DV, HAS_MASK)
        s = mm(q, tl.trans(k), MODE) * scale
        valid = key_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        # dw = (dO . v) / Z - delta: the dot takes dO itself (exact in the input dtype), not dO / Z rounded to
        # it, because the subtraction cancels most of the magnitude (bf16 lost the result otherwise)
        dp = mm(do, tl.trans(v), MODE) * rz[:, None] - delta[:, None]
        ds = tl.where(valid, dp * (1.0 + s), 0.0)
        dq += mm(ds, k, MODE)
    dq = dq * scale
    tl.store(
        DQ + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def _mask_arg(key_padding_mask: Optional[torch.Tensor], device):
    """The mask as uint8 [B, Lk] (True = padding), or a 1-element stand-in (its own tensor) when there is none."""
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), False
    return key_padding_mask.contiguous().view(torch.uint8), True


def _fwd_config(d: int, dv: int, dtype: torch.dtype):
    block_dv = min(128, block_dim(dv))
    # float32 ("ieee" FMA dots) at large head dims spills heavily with 64-blocks (ptxas, sm_90)
    block = 32 if dtype == torch.float32 and block_dim(d) >= 64 else 64
    warps = 4 if block_dv <= 64 else 8
    return block, block_dv, warps


def _bwd_config(d: int, dv: int, dtype: torch.dtype):
    block_dv = block_dim(dv)  # the backward needs all of Dv at once (dw = g . v)
    big = block_dv > 64 or (dtype == torch.float32 and block_dim(d) >= 64)
    block = 32 if big else 64
    warps = 8 if block_dv > 64 else 4
    return block, block_dv, warps


def parallel_fwd(q, k, v, key_padding_mask, causal: bool, scale: float, *, block: Optional[int] = None):
    """``(out [B,H,Lq,Dv] in q's dtype, Z [B,H,Lq] float32)`` by the quadratic form."""
    from torch.library import wrap_triton

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, lq, d = q.shape
    lk, d, dv = k.shape[2], int(d), int(v.shape[3])  # ints: the block sizes derive from the head dims
    mask, has_mask = _mask_arg(key_padding_mask, q.device)
    blk, block_dv, warps = _fwd_config(d, dv, q.dtype)
    blk = block or blk
    out = new_output((b, h, lq, dv), q.dtype, q.device)
    den = new_output((b, h, lq), torch.float32, q.device)
    grid = (b * h, triton.cdiv(lq, blk), triton.cdiv(dv, block_dv))
    wrap_triton(_parallel_fwd_kernel)[grid](
        q, k, v, mask, out, den,
        scale, lq, lk, h,
        D=d, DV=dv, BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=block_dim(d), BLOCK_DV=block_dv,
        CAUSAL=causal, HAS_MASK=has_mask, MODE=dot_mode(q.dtype),
        num_warps=warps, num_stages=2,
    )
    return out, den


def parallel_bwd(grad_out, q, k, v, key_padding_mask, out, den, causal: bool, scale: float, *, block: Optional[int] = None):
    """``(dq, dk, dv)`` in the inputs' dtype, from the saved ``out`` and ``Z`` (``den``)."""
    from torch.library import wrap_triton

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out = grad_out.contiguous(), out.contiguous()
    b, h, lq, d = q.shape
    lk, d, dv = k.shape[2], int(d), int(v.shape[3])  # ints: the block sizes derive from the head dims
    mask, has_mask = _mask_arg(key_padding_mask, q.device)
    blk, block_dv, warps = _bwd_config(d, dv, q.dtype)
    blk = block or blk
    delta, rz = bwd_preprocess(out, grad_out, den)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dvv = new_output(v.shape, v.dtype, v.device)
    common = dict(
        D=d, DV=dv, BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=block_dim(d), BLOCK_DV=block_dv,
        CAUSAL=causal, HAS_MASK=has_mask, MODE=dot_mode(q.dtype), num_warps=warps, num_stages=2,
    )
    wrap_triton(_parallel_bwd_dkdv_kernel)[(b * h, triton.cdiv(lk, blk))](
        q, k, v, mask, grad_out, delta, rz, dk, dvv, scale, lq, lk, h, **common
    )
    wrap_triton(_parallel_bwd_dq_kernel)[(b * h, triton.cdiv(lq, blk))](
        q, k, v, mask, grad_out, delta, rz, dq, scale, lq, lk, h, **common
    )
    return dq, dk, dvv
