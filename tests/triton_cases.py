"""Cases and checks for tests/test_triton.py: readable ids, seeded inputs, float64 references, tolerances.

Tolerances: float32 kernels against the float64 reference within 1e-4 of the reference's magnitude;
float16/bfloat16 kernels within 2x the error of a plain PyTorch implementation computed in the same
dtype (flash-attention's rule), plus a small absolute term.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch

from linattn_cuda.ops.taylor import naive as ref

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
HALF_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative to the reference's max magnitude
FP32_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    h: int
    lq: int
    lk: int
    d: int
    dv: int
    causal: bool = False
    mask: str = "none"  # "none" | "random" (30% padding) | "fullrow" (random, and the last batch all padding)
    dtype: torch.dtype = torch.float32
    form: str = "parallel"  # "parallel" (quadratic) | "chunk" (chunked linear)
    fused: Optional[bool] = None  # chunk form: force the fused / split mode (None: the launcher's choice)
    chunk: Optional[int] = None  # chunk form: tokens per chunk (None: the launcher's choice)
    block_dv: Optional[int] = None  # chunk form: value columns per forward program (None: the launcher's choice)

    @property
    def id(self) -> str:
        parts = [f"B{self.b}", f"H{self.h}"]
        parts += [f"L{self.lq}"] if self.lq == self.lk else [f"Lq{self.lq}", f"Lk{self.lk}"]
        parts += [f"D{self.d}", f"Dv{self.dv}", "causal" if self.causal else "full", self.mask, _SHORT[self.dtype], self.form]
        if self.fused is not None:
            parts.append("fused" if self.fused else "split")
        if self.chunk is not None:
            parts.append(f"C{self.chunk}")
        if self.block_dv is not None:
            parts.append(f"BDV{self.block_dv}")
        return "-".join(parts)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def scale(self) -> float:
        return self.d**-0.5


def make_inputs(case: Case, device, extra_len: int = 0):
    """Seeded q, k, v in the case's dtype (values drawn in float64, then rounded) and the padding mask."""
    g = torch.Generator().manual_seed(case.seed)
    lq, lk = case.lq + extra_len, case.lk + extra_len
    q = torch.randn(case.b, case.h, lq, case.d, generator=g, dtype=torch.float64)
    k = torch.randn(case.b, case.h, lk, case.d, generator=g, dtype=torch.float64)
    v = torch.randn(case.b, case.h, lk, case.dv, generator=g, dtype=torch.float64)
    kpm = None
    if case.mask != "none":
        kpm = torch.rand(case.b, lk, generator=g) < 0.3
        if case.mask == "fullrow":
            kpm[-1] = True
        kpm = kpm.to(device)
    q, k, v = (x.to(case.dtype).to(device) for x in (q, k, v))
    grad_out = torch.randn(case.b, case.h, lq, case.dv, generator=g, dtype=torch.float64).to(case.dtype).to(device)
    return q, k, v, kpm, grad_out


def reference_fwd_bwd(q, k, v, kpm, grad_out, causal: bool, scale: float, lowp: bool = False):
    """(out, dq, dk, dv): float64 ground truth from the (rounded) inputs, or with ``lowp`` a plain PyTorch
    implementation in the inputs' own dtype (the error yardstick for half precision)."""
    dtype = q.dtype if lowp else torch.float64
    q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
    if lowp:
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        w = 1.0 + s + 0.5 * s * s
        keep = torch.ones_like(w, dtype=torch.bool)
        if causal:
            keep = keep & torch.ones(w.shape[-2:], dtype=torch.bool, device=w.device).tril()
        if kpm is not None:
            keep = keep & ~kpm[:, None, None, :]
        w = w.masked_fill(~keep, 0.0)
        den = w.sum(-1, keepdim=True)
        out = torch.where(den != 0, torch.matmul(w, v) / torch.where(den != 0, den, 1.0), 0.0)
    else:
        out = ref.taylor_attention_quadratic(q, k, v, causal=causal, scale=scale, key_padding_mask=kpm)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    return out.detach(), dq, dk, dv


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, lowp: Optional[torch.Tensor] = None, *, case_id: str = ""):
    """Assert ``got`` matches the float64 ``want``; ``lowp`` (same-dtype plain PyTorch result) sets the half tolerance."""
    assert got.shape == want.shape, f"{case_id} {name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~torch.isfinite(got)
    assert not bad.any(), (
        f"{case_id} {name}: {int(bad.sum())} non-finite values (first at {tuple(bad.nonzero()[0].tolist())}); "
        "NaN = an output element the kernel never wrote (outputs are NaN-poisoned) or a 0/0"
    )
    if want.numel() == 0:
        return
    mag = want.abs().max().item() + 1e-30
    err_t = (got.double() - want.double()).abs()
    err = err_t.max().item()
    where = tuple(torch.nonzero(err_t == err_t.max())[0].tolist())
    if got.dtype == torch.float32:
        tol = FP32_RTOL * max(mag, 1.0)
        rule = f"{FP32_RTOL:g} * max(|ref|, 1)"
    else:
        base = max_err(lowp, want) if lowp is not None else 0.0
        tol = 2.0 * base + HALF_ATOL[got.dtype] * max(mag, 1.0)
        rule = f"2 * plain-PyTorch-{_SHORT[got.dtype]} error ({base:.3g}) + {HALF_ATOL[got.dtype]:g} * max(|ref|, 1)"
    assert err <= tol, (
        f"{case_id} {name}: max abs error {err:.3g} at {where} (got {got[where].item():.6g}, "
        f"want {want[where].item():.6g}) exceeds {tol:.3g} = {rule}; |ref| max {mag:.3g}"
    )


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# forward + backward of every kernel at small odd shapes (CPU interpreter on CI; also run on a GPU)
CI_CASES = [
    # quadratic form
    Case(2, 2, 17, 33, 16, 24, causal=False, mask="random"),
    Case(2, 2, 65, 65, 24, 16, causal=True, mask="fullrow"),
    Case(1, 2, 1, 1, 16, 16, causal=True),
    Case(2, 1, 63, 5, 1, 8, causal=False, mask="fullrow"),
    Case(1, 2, 63, 63, 16, 64, causal=True, dtype=BF16),
    Case(2, 1, 17, 40, 8, 24, causal=False, mask="random", dtype=F16),
    # chunked form through the op (small B*H: the split mode with atomics)
    Case(2, 2, 65, 65, 16, 24, causal=True, mask="random", form="chunk"),
    Case(2, 2, 17, 40, 16, 24, causal=False, mask="fullrow", form="chunk"),
    Case(1, 1, 1, 1, 16, 16, causal=True, form="chunk"),
    Case(1, 2, 40, 40, 24, 16, causal=True, mask="fullrow", form="chunk"),
    Case(1, 2, 63, 63, 16, 64, causal=True, dtype=BF16, form="chunk"),
    Case(2, 1, 33, 17, 5, 24, causal=False, mask="random", dtype=F16, form="chunk"),
    # chunked form, forced modes and several chunks per sequence
    Case(2, 2, 65, 65, 16, 24, causal=True, mask="fullrow", form="chunk", fused=True, chunk=16),
    Case(2, 1, 17, 40, 16, 40, causal=False, mask="random", form="chunk", fused=True, chunk=16),
    Case(1, 2, 33, 33, 5, 24, causal=True, mask="random", dtype=BF16, form="chunk", fused=True, chunk=16),
    Case(1, 2, 49, 49, 3, 24, causal=True, mask="random", form="chunk", fused=False, chunk=16),
    # the defaults for many heads (C=32, all 64 value columns in one forward program), at a few heads
    Case(1, 2, 70, 70, 16, 64, causal=True, mask="random", dtype=BF16, form="chunk", fused=True, chunk=32, block_dv=64),
]

# prefill in two parts (state out, then state in)
PREFILL_CASES = [
    Case(2, 2, 37, 37, 16, 24, causal=True, mask="random", form="chunk", fused=True, chunk=16),
    Case(2, 2, 37, 37, 16, 24, causal=True, mask="random", form="chunk", fused=False, chunk=16),
    Case(1, 2, 20, 20, 24, 40, causal=True, form="chunk"),
    Case(2, 1, 9, 9, 1, 3, causal=True, mask="random", dtype=BF16, form="chunk"),
]

# the decoding step: (D, Dv, dtype)
STEP_CASES = [(16, 24, F32), (1, 3, F32), (5, 70, BF16), (24, 16, F16)]

# GPU only: real sizes
GPU_CASES = [
    # the benchmark shape family (bf16, D=16, Dv=64), both forms, causal and not, fused chunk mode
    Case(4, 4, 4097, 4097, 16, 64, causal=True, dtype=BF16, form="parallel"),
    Case(4, 4, 4097, 4097, 16, 64, causal=True, dtype=BF16, form="chunk", fused=True),
    Case(4, 4, 4097, 4097, 16, 64, causal=False, mask="random", dtype=BF16, form="chunk", fused=True),
    Case(2, 3, 1000, 1500, 16, 64, causal=False, mask="fullrow", dtype=BF16, form="parallel"),
    # enough heads for the launcher's own many-head defaults (B*H >= 132: 64 value columns per program)
    Case(12, 12, 1000, 1000, 16, 64, causal=True, mask="random", dtype=BF16, form="chunk"),
    # B=1 prefill-like shape: the split chunk mode (atomics)
    Case(1, 4, 4097, 4097, 16, 64, causal=True, mask="random", dtype=BF16, form="chunk"),
    # head dims: 64 / 128 and Dv 256 (quadratic; chunk once at D=64)
    Case(2, 4, 1000, 1000, 64, 64, causal=True, mask="random", dtype=BF16, form="parallel"),
    Case(2, 2, 1025, 1025, 128, 256, causal=False, dtype=BF16, form="parallel"),
    Case(1, 2, 1000, 1000, 64, 64, causal=True, dtype=BF16, form="chunk"),
    Case(2, 2, 2049, 2049, 16, 256, causal=True, dtype=BF16, form="chunk"),
    # float16 / float32
    Case(2, 4, 2049, 2049, 16, 64, causal=True, mask="random", dtype=F16, form="chunk", fused=True),
    Case(2, 4, 2049, 2049, 64, 64, causal=False, dtype=F16, form="parallel"),
    Case(2, 2, 1000, 1000, 16, 64, causal=True, dtype=F32, form="chunk", fused=True),
    Case(2, 2, 1000, 1000, 128, 64, causal=True, dtype=F32, form="parallel"),
]
