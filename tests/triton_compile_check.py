"""Compile every Triton kernel launch of linattn_cuda.triton for NVIDIA GPUs on a machine without a GPU.

The launchers run on fake CUDA tensors (FakeTensorMode) with ``torch.library.wrap_triton`` replaced by a
recorder, so the captured launches carry exactly the block sizes, constexprs, warps and stages the
launchers pick for each shape. Each distinct launch is then compiled ahead of time (Triton -> PTX ->
ptxas, all bundled with the triton wheel) for the chosen architectures, reporting shared memory,
registers and spills. A compile error, or shared memory above the architecture's limit, is a failure.

    python tests/triton_compile_check.py               # the CI set (bench shapes, a few variants)
    python tests/triton_compile_check.py --full        # every launch the GPU tests make
    python tests/triton_compile_check.py --arch 90 80

Must run without TRITON_INTERPRET (the test runs it in a subprocess with it removed).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run triton_compile_check.py without TRITON_INTERPRET=1 (it compiles for real GPUs)")

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


class _Recorder:
    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Recorder.launches.append((self.kernel, grid, args, kwargs))

        return launch


def _signature(kernel, args, kwargs):
    names = kernel.arg_names
    values = dict(zip(names, args))
    options = {}
    for key, val in kwargs.items():
        if key in ("num_warps", "num_stages"):
            options[key] = val
        else:
            values[key] = val
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    sig, constexprs = {}, {}
    for name in names:
        val = values[name]
        if name in constexpr_names:
            sig[name] = "constexpr"
            constexprs[name] = val
        elif isinstance(val, torch.Tensor):
            sig[name] = "*" + _TYPES[val.dtype]
        elif isinstance(val, bool):
            sig[name] = "i1"
        elif isinstance(val, int):
            sig[name] = "i32" if -(2**31) <= val < 2**31 else "i64"
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={val!r}")
    return sig, constexprs, options


def capture(cases) -> list:
    """Run the launchers on fake CUDA tensors; return the distinct launches [(kernel, sig, constexprs, options)]."""
    import torch.library

    from linattn_cuda.triton import chunk, parallel, step
    from linattn_cuda.feature_map import feature_dim

    real = torch.library.wrap_triton
    torch.library.wrap_triton = _Recorder
    _Recorder.launches = []
    try:
        with FakeTensorMode():
            for case in cases:
                kind, b, h, lq, lk, d, dv, dtype, causal, masked, extra = case
                dev = "cuda"
                q = torch.empty(b, h, lq, d, dtype=dtype, device=dev)
                k = torch.empty(b, h, lk, d, dtype=dtype, device=dev)
                v = torch.empty(b, h, lk, dv, dtype=dtype, device=dev)
                kpm = torch.zeros(b, lk, dtype=torch.bool, device=dev) if masked else None
                if kind == "parallel":
                    out, den = parallel.parallel_fwd(q, k, v, kpm, causal, 0.25)
                    parallel.parallel_bwd(out, q, k, v, kpm, out, den, causal, 0.25)
                elif kind == "chunk":
                    out, den = chunk.chunk_fwd(q, k, v, kpm, causal, 0.25, **extra)
                    bwd_extra = {key: val for key, val in extra.items() if key in ("fused",)}
                    chunk.chunk_bwd(out, q, k, v, kpm, out, den, causal, 0.25, **bwd_extra)
                elif kind == "prefill":
                    m = feature_dim(d)
                    st = (torch.empty(b, h, m, dv, device=dev), torch.empty(b, h, m, device=dev))
                    chunk.chunk_fwd(q, k, v, kpm, True, 0.25, initial_state=st, write_state=True, **extra)
                elif kind == "step":
                    m = feature_dim(d)
                    st = (torch.empty(b, h, m, dv, device=dev), torch.empty(b, h, m, device=dev))
                    step.step_fwd(q[:, :, 0], k[:, :, 0], v[:, :, 0], st[0], st[1], 0.25)
                else:
                    raise ValueError(kind)
    finally:
        torch.library.wrap_triton = real
    seen, out = set(), []
    for kernel, _grid, args, kwargs in _Recorder.launches:
        sig, constexprs, options = _signature(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            out.append((kernel, sig, constexprs, options))
    return out


def compile_one(kernel, sig, constexprs, options, arch: int):
    """(shared bytes, registers, spill bytes) of one launch compiled for sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    regs = spill = -1
    if os.path.exists(ptxas):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        for line in res.stderr.splitlines():
            if "Used" in line and "registers" in line:
                regs = int(line.split("Used")[1].split("registers")[0])
            if "spill stores" in line:
                spill = int(line.split("bytes spill stores")[0].split(",")[-1])
    return compiled.metadata.shared, regs, spill


def ci_cases():
    bf16, f32 = torch.bfloat16, torch.float32
    return [
        # the benchmark shape (fused chunk path) and the few-program split path, both directions
        ("parallel", 16, 16, 1024, 1024, 16, 64, bf16, True, False, {}),
        ("parallel", 2, 2, 100, 77, 16, 64, bf16, False, True, {}),
        ("chunk", 16, 16, 1024, 1024, 16, 64, bf16, True, False, {}),
        ("chunk", 16, 16, 1024, 1024, 16, 64, bf16, False, False, {}),
        ("chunk", 1, 4, 1024, 1024, 16, 64, bf16, True, True, {}),
        ("prefill", 1, 4, 1000, 1000, 16, 64, bf16, True, False, {}),
        ("step", 64, 16, 1, 1, 16, 64, bf16, True, False, {}),
        ("chunk", 2, 2, 100, 100, 16, 64, f32, True, False, {"fused": True}),
    ]


def full_cases():
    cases = list(ci_cases())
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        for d, dv in ((16, 64), (64, 64), (128, 256), (24, 40), (1, 16)):
            for causal in (True, False):
                cases.append(("parallel", 2, 4, 300, 300, d, dv, dtype, causal, True, {}))
                cases.append(("chunk", 2, 4, 300, 300, d, dv, dtype, causal, True, {}))
                cases.append(("chunk", 64, 16, 300, 300, d, dv, dtype, causal, False, {}))
            cases.append(("prefill", 2, 4, 300, 300, d, dv, dtype, True, False, {}))
            cases.append(("step", 2, 4, 1, 1, d, dv, dtype, True, False, {}))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every launch of the GPU tests (slow: minutes)")
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    args = ap.parse_args(argv)
    launches = capture(full_cases() if args.full else ci_cases())
    print(f"triton {triton.__version__}: {len(launches)} distinct launches, archs {args.arch}")
    failures = 0
    for kernel, sig, constexprs, options in launches:
        brief = ",".join(f"{k}={v}" for k, v in constexprs.items())
        for arch in args.arch:
            t0 = time.time()
            try:
                shared, regs, spill = compile_one(kernel, sig, constexprs, options, arch)
            except Exception as exc:  # noqa: BLE001 - report every failure, then fail
                failures += 1
                print(f"FAIL sm_{arch} {kernel.__name__} [{brief}] {options}: {type(exc).__name__}: {str(exc)[:2000]}")
                continue
            limit = SMEM_LIMIT.get(arch, 101376)
            status = "ok  " if shared <= limit else "SMEM"
            failures += shared > limit
            print(
                f"{status} sm_{arch} {kernel.__name__:28s} smem {shared:6d} regs {regs:3d} spill {spill:5d} "
                f"{time.time() - t0:5.1f}s [{brief}] {options}",
                flush=True,
            )
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
