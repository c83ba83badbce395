"""Compile every Triton kernel launch of linattn_cuda.ops.hybrid.triton for NVIDIA GPUs on a machine without a GPU
(the hybrid's counterpart of triton_compile_check.py, whose capture and compile helpers it reuses).

The launchers (forward, backward, prefill, decode step) run on fake CUDA tensors with ``wrap_triton`` replaced by a
recorder; each distinct launch is compiled ahead of time for the chosen architectures (Triton -> PTX -> ptxas),
reporting shared memory, registers and spills. A compile error, or shared memory above the limit, is a failure.

    python tests/hybrid_triton_compile_check.py               # the benchmark and test shapes
    python tests/hybrid_triton_compile_check.py --arch 90 80

Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/

import triton_compile_check as tcc  # noqa: E402  (exits under TRITON_INTERPRET=1)

# (B, H, Hkv, L, D, Dv, window, causal, dtype, mask): the benchmark's Based shape (bf16, causal: forward, backward,
# prefill), grouped heads with padding and a feature dim beyond 16 (split roles, float16), non-causal float32 (the
# reverse walk, tf32x3 / ieee dots) with Dv = 128
CASES = [
    (16, 16, 16, 8192, 16, 64, 64, True, torch.bfloat16, False),
    (2, 8, 2, 1000, 32, 64, 128, True, torch.float16, True),
    (2, 4, 4, 300, 16, 128, 64, False, torch.float32, True),
]
STEP_CASES = [(64, 16, 16, 16, 64, 64), (8, 8, 2, 64, 128, 1)]  # (B, H, Hkv, D, Dv, W): grouped heads, W = 1


def _launch_all(device):
    from linattn_cuda.ops.hybrid.triton import ops

    for b, h, hk, length, d, dv, window, causal, dtype, mask in CASES:
        def t(*shape):
            return torch.randn(*shape, device=device).to(dtype)

        q, k, v = t(b, h, length, d), t(b, hk, length, d), t(b, hk, length, dv)
        kpm = torch.zeros(b, length, dtype=torch.bool, device=device) if mask else None
        fw = torch.ones(h, device=device)
        out, lse = ops.hybrid_triton_fwd(q, k, v, kpm, fw, window, causal, 0.25)
        ops.hybrid_triton_bwd(out, q, k, v, kpm, fw, out, lse, window, causal, 0.25)
        if causal:
            ops.hybrid_triton_prefill(q, k, v, kpm, fw, window, 0.25)
    for b, h, hk, d, dv, window in STEP_CASES:
        m = 1 + d + d * (d + 1) // 2
        f32 = torch.float32
        q = torch.randn(b, h, d, device=device, dtype=torch.bfloat16)
        k, v = torch.randn(b, hk, d, device=device, dtype=q.dtype), torch.randn(b, hk, dv, device=device, dtype=q.dtype)
        ring = window - 1
        ops.hybrid_triton_step(q, k, v, torch.zeros(b, dtype=torch.bool, device=device),
                               torch.zeros(b, hk, ring, d, device=device, dtype=f32),
                               torch.zeros(b, hk, ring, dv, device=device, dtype=f32),
                               torch.ones(b, ring, dtype=torch.bool, device=device),
                               torch.zeros(b, hk, m, dv, device=device, dtype=f32),
                               torch.zeros(b, hk, m, device=device, dtype=f32),
                               torch.zeros(b, dtype=torch.int64, device=device), torch.ones(h, device=device), 0.25)


def capture() -> list:
    import torch.library

    real = torch.library.wrap_triton
    torch.library.wrap_triton = tcc._Recorder
    tcc._Recorder.launches = []
    try:
        with FakeTensorMode():
            _launch_all("cuda")
    finally:
        torch.library.wrap_triton = real
    seen, out = set(), []
    for kernel, _grid, args, kwargs in tcc._Recorder.launches:
        sig, constexprs, options = tcc._signature(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            out.append((kernel, sig, constexprs, options))
    return out


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    args = ap.parse_args(argv)
    launches = capture()
    print(f"triton {triton.__version__}: {len(launches)} distinct hybrid launches, archs {args.arch}")
    failures = 0
    for kernel, sig, constexprs, options in launches:
        brief = ",".join(f"{k}={v}" for k, v in constexprs.items())
        for arch in args.arch:
            t0 = time.time()
            try:
                shared, regs, spill = tcc.compile_one(kernel, sig, constexprs, options, arch)
            except Exception as exc:  # noqa: BLE001 - report every failure, then fail
                failures += 1
                print(f"FAIL sm_{arch} {kernel.__name__} [{brief}] {options}: {type(exc).__name__}: {str(exc)[:2000]}")
                continue
            limit = tcc.SMEM_LIMIT.get(arch, 101376)
            status = "ok  " if shared <= limit else "SMEM"
            failures += shared > limit
            print(f"{status} sm_{arch} {kernel.__name__:28s} smem {shared:6d} regs {regs:3d} spill {spill:5d} "
                  f"{time.time() - t0:5.1f}s [{brief}] {options}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
