"""Compile every Triton kernel launch of linattn_cuda.ops.taylor.triton for NVIDIA GPUs on a machine without a GPU.

The launchers run on fake CUDA tensors (FakeTensorMode) with ``torch.library.wrap_triton`` replaced by a
recorder, so the captured launches carry exactly the block sizes, constexprs, warps and stages the
launchers pick for each shape. Each distinct launch is then compiled ahead of time (Triton -> PTX ->
ptxas, all bundled with the triton wheel) for the chosen architectures, reporting shared memory,
registers and spills. A compile error, or shared memory above the architecture's limit, is a failure.

    python tests/triton_compile_check.py               # the CI set (bench shapes, a few variants)
    python tests/triton_compile_check.py --full        # every launch of the GPU tests and the benchmark
    python tests/triton_compile_check.py --arch 90 80
    python tests/triton_compile_check.py --warm-cuda -j 12  # GPU machine: fill Triton's cache in parallel

Must run without TRITON_INTERPRET (the test runs it in a subprocess with it removed).
"""
from __future__ import annotations

import argparse
import dataclasses
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ (triton_cases)

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
            # fp32 as Triton's launcher types a Python float; LINATTN_COMPILE_CHECK_FLOAT=fp64 types it as
            # torch.compile's inductor launches user kernels (the kernels must stay fp32 inside either way)
            sig[name] = os.environ.get("LINATTN_COMPILE_CHECK_FLOAT", "fp32")
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={val!r}")
    return sig, constexprs, options


def _launch_case(kind, c, opts, device):
    """Run the launchers of one case on ``device`` (fake CUDA tensors when capturing)."""
    from linattn_cuda.feature_map import feature_dim
    from linattn_cuda.ops.taylor.triton import chunk, parallel, step

    def t(*shape, dtype=c.dtype):
        return torch.randn(*shape, device=device).to(dtype)

    q, k, v = t(c.b, c.h, c.lq, c.d), t(c.b, c.h, c.lk, c.d), t(c.b, c.h, c.lk, c.dv)
    kpm = torch.zeros(c.b, c.lk, dtype=torch.bool, device=device) if c.mask != "none" else None
    m = feature_dim(c.d)
    st = (t(c.b, c.h, m, c.dv, dtype=torch.float32), t(c.b, c.h, m, dtype=torch.float32).abs() + 1)
    copts = dict(chunk=c.chunk, fused=c.fused)
    if kind == "fwd_bwd" and c.form == "parallel":
        out, den = parallel.parallel_fwd(q, k, v, kpm, c.causal, c.scale)
        parallel.parallel_bwd(out, q, k, v, kpm, out, den, c.causal, c.scale)
    elif kind == "fwd_bwd":
        out, den = chunk.chunk_fwd(q, k, v, kpm, c.causal, c.scale, **copts)
        chunk.chunk_bwd(out, q, k, v, kpm, out, den, c.causal, c.scale, **copts)
    elif kind == "prefill":
        chunk.chunk_fwd(q, k, v, kpm, True, c.scale, write_state=True, **copts)
        chunk.chunk_fwd(q, k, v, kpm, True, c.scale, initial_state=st, write_state=True, **copts)
    elif kind == "step":
        step.step_fwd(q[:, :, 0], k[:, :, 0], v[:, :, 0], st[0], st[1], c.scale, **opts)
    elif kind == "chunk_fwd":
        chunk.chunk_fwd(q, k, v, kpm, c.causal, c.scale, **opts)
    elif kind == "chunk_bwd":
        out = t(c.b, c.h, c.lq, c.dv)
        den = t(c.b, c.h, c.lq, dtype=torch.float32).abs() + 1
        chunk.chunk_bwd(out, q, k, v, kpm, out, den, c.causal, c.scale, **opts)
    else:
        raise ValueError(kind)


def capture(cases) -> list:
    """Run the launchers on fake CUDA tensors; return the distinct launches [(kernel, sig, constexprs, options)].

    A case is ``(kind, Case, options)``: kind "fwd_bwd" (the form and chunk options of the Case),
    "prefill" (two-part chunked prefill: state out, then state in), "step", or "chunk_fwd"/"chunk_bwd"
    with explicit launcher options (the benchmark's sweep)."""
    import torch.library

    real = torch.library.wrap_triton
    torch.library.wrap_triton = _Recorder
    _Recorder.launches = []
    try:
        with FakeTensorMode():
            for kind, c, opts in cases:
                _launch_case(kind, c, opts, "cuda")
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


def _warm_worker(cases):
    failures = []
    for kind, c, opts in cases:
        try:
            _launch_case(kind, c, opts, "cuda")
        except Exception as exc:  # noqa: BLE001 - report, the tests will pinpoint it
            failures.append(f"{kind} {c.id} {opts}: {type(exc).__name__}: {str(exc)[:300]}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return failures


def warm_cuda(cases, jobs: int) -> int:
    """Compile (and launch once, on random data) every case's kernels on the local GPU in ``jobs`` worker
    processes: Triton's on-disk cache then serves the tests and the benchmark without compiling."""
    import multiprocessing as mp

    t0 = time.time()
    parts = [cases[i::jobs] for i in range(jobs)]
    with mp.get_context("spawn").Pool(jobs) as pool:
        failures = [f for part in pool.map(_warm_worker, parts) for f in part]
    for f in failures:
        print("FAIL", f)
    print(f"warmed {len(cases)} cases in {time.time() - t0:.1f}s with {jobs} processes; {len(failures)} failure(s)")
    return 1 if failures else 0


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
    """The benchmark shape (fused chunk path, both directions), the few-program split path, prefill, step,
    and one float32 chunk case (tf32x3 dots)."""
    from triton_cases import BF16, F32, Case

    return [
        ("fwd_bwd", Case(16, 16, 1024, 1024, 16, 64, causal=True, dtype=BF16), {}),
        ("fwd_bwd", Case(2, 2, 100, 77, 16, 64, causal=False, mask="random", dtype=BF16), {}),
        ("fwd_bwd", Case(16, 16, 1024, 1024, 16, 64, causal=True, dtype=BF16, form="chunk"), {}),
        ("fwd_bwd", Case(16, 16, 1024, 1024, 16, 64, causal=False, dtype=BF16, form="chunk"), {}),
        ("fwd_bwd", Case(1, 4, 1024, 1024, 16, 64, causal=True, mask="random", dtype=BF16, form="chunk"), {}),
        ("prefill", Case(1, 4, 1000, 1000, 16, 64, causal=True, dtype=BF16, form="chunk"), {}),
        ("step", Case(64, 16, 1, 1, 16, 64, causal=True, dtype=BF16), {}),
        ("fwd_bwd", Case(2, 2, 100, 100, 16, 64, causal=True, dtype=F32, form="chunk", fused=True), {}),
    ]


def full_cases():
    """Every launch of the GPU tests (tests/test_triton.py on CUDA) and of bench/triton_gpu_bench.py."""
    from triton_cases import BF16, CI_CASES, GPU_CASES, PREFILL_CASES, STEP_CASES, Case

    cases = [("fwd_bwd", c, {}) for c in CI_CASES + GPU_CASES]
    cases += [("prefill", c, {}) for c in PREFILL_CASES]
    cases += [("prefill", Case(1, 8, 3000, 3000, 16, 64, causal=True, dtype=BF16, form="chunk"), {})]
    opcheck = Case(2, 2, 70, 70, 16, 32, causal=True, mask="random", dtype=BF16, form="chunk")
    cases += [("fwd_bwd", dataclasses.replace(opcheck, form=f), {}) for f in ("parallel", "chunk")]
    cases += [("prefill", opcheck, {}), ("step", opcheck, {})]
    cases += [("step", Case(2, 3, 1, 1, d, dv, dtype=dt), {}) for d, dv, dt in STEP_CASES]
    cases += [("step", Case(1, 8, 1, 1, 16, 64, dtype=BF16), {})]  # prefill + steps
    bench = Case(16, 16, 8192, 8192, 16, 64, causal=True, dtype=BF16, form="chunk")
    for causal in (True, False):
        for form in ("parallel", "chunk"):
            cases.append(("fwd_bwd", dataclasses.replace(bench, causal=causal, form=form), {}))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from triton_gpu_bench import STEP_SWEEP, SWEEP_BWD, SWEEP_FWD

    for c, bdv, warps, fused in SWEEP_FWD:
        cases.append(("chunk_fwd", bench, dict(chunk=c, block_dv=bdv, num_warps=warps, fused=fused)))
    for c, warps, fused in SWEEP_BWD:
        cases.append(("chunk_bwd", bench, dict(chunk=c, num_warps=warps, fused=fused)))
    cases += [("step", Case(64, 16, 1, 1, 16, 64, dtype=BF16), {})]
    for bm, bdv, warps in STEP_SWEEP:
        cases.append(("step", Case(64, 16, 1, 1, 16, 64, dtype=BF16), dict(block_m=bm, block_dv=bdv, num_warps=warps)))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every launch of the GPU tests (slow: minutes)")
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    ap.add_argument("--warm-cuda", action="store_true",
                    help="on a GPU machine: JIT-compile every --full launch in parallel into Triton's cache")
    ap.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if args.warm_cuda:
        return warm_cuda(full_cases(), args.jobs)
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
