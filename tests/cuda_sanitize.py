"""A handful of CUDA kernel calls, once each, for compute-sanitizer (not a pytest module):

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda_sanitize.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python tests/cuda_sanitize.py

Every kernel family runs on small odd shapes (partial tiles, partial chunks, partial value-column slices,
masks with fully masked rows): quadratic forward and backward, tensor-core chunked linear form (causal,
non-causal, 32 and 64 columns per block, fp32 3xTF32 and bf16), state kernels, prefill and decode step.
Prints "ok" and exits 0 when every result is finite.
"""
from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    import linattn_cuda.ops.taylor.registration  # noqa: F401
    from linattn_cuda._extension import require_cuda_kernels

    require_cuda_kernels()
    o = torch.ops.linattn_cuda
    dev = "cuda"
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    results = []
    for dtype in (torch.bfloat16, torch.float32):
        B, H, L, D, Dv = 2, 2, 77, 16, 40
        q, k, v = rnd(B, H, L, D, dtype=dtype), rnd(B, H, L, D, dtype=dtype), rnd(B, H, L, Dv, dtype=dtype)
        mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        mask[0, :20] = True
        mask[1, 50:] = True
        for form, slice_ in (("quadratic", None), ("linear", "32"), ("linear", "64")):
            os.environ["LINATTN_CUDA_FORM"] = form
            if slice_:
                os.environ["LINATTN_CUDA_DV_SLICE"] = slice_
            for causal in (False, True):
                out, den = o.taylor_fwd(q, k, v, mask, causal, 0.25)
                results += [out, den]
                if form == "quadratic":
                    results += list(o.taylor_bwd(torch.randn_like(out), q, k, v, mask, out, den, causal, 0.25))
        os.environ["LINATTN_CUDA_FORM"] = "linear"
        os.environ.pop("LINATTN_CUDA_DV_SLICE", None)
        out, den = o.taylor_fwd(q[:, :, :33], k, v, mask, False, 0.25)  # cross-attention, Lq != Lk
        results += [out, den]
        # D = 24 takes the 32-wide tensor-core kernel; D = 40 the CUDA-core state kernels
        for d in (24, 40):
            qd, kd = rnd(1, 2, 70, d, dtype=dtype), rnd(1, 2, 70, d, dtype=dtype)
            vd = rnd(1, 2, 70, 24, dtype=dtype)
            results += list(o.taylor_fwd(qd, kd, vd, None, False, 0.2))
            results += list(o.taylor_fwd(qd, kd, vd, None, True, 0.2))
            out, kv, ks = o.taylor_prefill(qd, kd, vd, None, None, None, 0.2)
            out2, kv2, ks2 = o.taylor_prefill(qd, kd, vd, None, kv, ks, 0.2)
            results += [out, kv, ks, out2, kv2, ks2]
            results += list(o.taylor_step(qd[:, :, 0], kd[:, :, 0], vd[:, :, 0], kv2, ks2, 0.2))
        os.environ.pop("LINATTN_CUDA_FORM", None)
    torch.cuda.synchronize()
    bad = [i for i, t in enumerate(results) if not torch.isfinite(t.float()).all()]
    if bad:
        print(f"non-finite results at {bad}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
