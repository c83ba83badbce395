"""Shared pieces of the Triton kernels: dtype-dependent matmul precision, block sizes, debug hooks.

Conventions of every kernel in this package:
* inputs are made contiguous ``[B, H, L, *]`` (``[B, H, *]`` for decoding) by the launchers;
* loads are converted to float32 at once; all accumulation, the normalizer and the division are float32;
* ``tl.dot`` operands follow ``MODE`` (see :func:`dot_mode`); every dot has M, N, K >= 16;
* the ``[B*H]`` program index is widened to int64 before it multiplies a length.

Environment:
  LINATTN_POISON_OUTPUTS=1  allocate kernel outputs filled with NaN instead of uninitialized memory
                            (tests run with it, so an element a kernel forgets to write shows up).
  TRITON_INTERPRET=1        run the kernels with Triton's CPU interpreter (CPU tensors; slow; for tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "poison_outputs",
    "new_output",
    "next_pow2",
    "block_dim",
    "dot_mode",
    "mm",
    "mm_exact_a",
    "bwd_preprocess",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# MODE values (a tl.constexpr of every kernel): how tl.dot operands are formed.
MODE_IEEE = 0  # float32 inputs: float32 operands, input_precision="ieee" (FMAs, no TF32 rounding)
MODE_BF16 = 1  # bfloat16 inputs: operands (incl. float32 intermediates such as P) cast to bfloat16
MODE_TF32 = 2  # float16 inputs: float32 operands, TF32 tensor cores (fp16 values are exact in TF32 and
#                P = 1 + s + s^2/2 may exceed the float16 range, so it is never cast to float16)
MODE_TF32X3 = 3  # float32 inputs of the chunked kernels: input_precision="tf32x3", float32-accurate on tensor
#                  cores ("ieee" FMAs spill heavily with their [256, Dv] states)


def poison_outputs() -> bool:
    """Whether LINATTN_POISON_OUTPUTS asks for NaN-filled output buffers (read at each call)."""
    return os.environ.get("LINATTN_POISON_OUTPUTS", "0").lower() in ("1", "true", "yes", "on")


def new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer every element of which a kernel must write: NaN-filled under LINATTN_POISON_OUTPUTS."""
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_dim(n: int) -> int:
    """A feature / value dim padded to a power of two >= 16 (tl.dot's minimum on GPUs)."""
    return max(16, next_pow2(n))


def dot_mode(dtype: torch.dtype, chunked: bool = False) -> int:
    if dtype == torch.float32:
        return MODE_TF32X3 if chunked else MODE_IEEE
    if dtype == torch.bfloat16:
        # The interpreter multiplies bfloat16 as raw uint16 bits (Triton 3.8), so it gets float32 operands.
        return MODE_TF32 if INTERPRET else MODE_BF16
    if dtype == torch.float16:
        return MODE_TF32
    raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 tensors, got {dtype}")


@triton.jit
def mm(a, b, MODE: tl.constexpr):
    """``a @ b`` with float32 accumulation; operand precision by MODE (see the module constants)."""
    if MODE == 1:
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif MODE == 2:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif MODE == 3:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return c


@triton.jit
def mm_exact_a(a, b, MODE: tl.constexpr):
    """``a @ b`` for a float32 ``a`` that must not be rounded to the operand precision (a feature tile such as
    k_a * k_b, 16 significant bits from bfloat16 inputs) and a ``b`` exact in it (input values): bfloat16 splits
    ``a`` into hi + lo (exact, two dots); float16 / float32 use tf32x3. Keeps the float32 state accurate."""
    if MODE == 1:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b16 = b.to(tl.bfloat16)
        c = tl.dot(a_hi, b16) + tl.dot(a_lo, b16)
    elif MODE == 0:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    return c


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, Z, DELTA, RZ,
    L,
    DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta_i = (dO_i . out_i) / Z_i and rz_i = 1 / Z_i (both 0 where Z_i == 0: a query that sees no key)."""
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    tile = offs_m[:, None] * DV + offs_v[None, :]
    tile_ok = m_ok[:, None] & (offs_v[None, :] < DV)
    o = tl.load(O + bh * L * DV + tile, mask=tile_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + bh * L * DV + tile, mask=tile_ok, other=0.0).to(tl.float32)
    z = tl.load(Z + bh * L + offs_m, mask=m_ok, other=0.0)
    seen = z != 0.0
    rz = tl.where(seen, 1.0 / tl.where(seen, z, 1.0), 0.0)
    delta = tl.sum(o * do, 1) * rz
    tl.store(DELTA + bh * L + offs_m, delta, mask=m_ok)
    tl.store(RZ + bh * L + offs_m, rz, mask=m_ok)


def bwd_preprocess(out: torch.Tensor, grad_out: torch.Tensor, den: torch.Tensor):
    """``(delta, rz)``, float32 ``[B, H, L]``: the per-query terms of the backward (see the module docstrings)."""
    from torch.library import wrap_triton

    b, h, length, dv = out.shape
    delta = new_output((b, h, length), torch.float32, out.device)
    rz = new_output((b, h, length), torch.float32, out.device)
    block_dv = block_dim(dv)
    block_m = max(16, min(64, 8192 // block_dv))
    grid = (b * h, triton.cdiv(length, block_m))
    wrap_triton(_bwd_preprocess_kernel)[grid](
        out, grad_out, den, delta, rz, length, DV=dv, BLOCK_M=block_m, BLOCK_DV=block_dv, num_warps=4
    )
    return delta, rz
