"""Benchmark of the Triton kernels on a CUDA GPU, with peers side by side; writes JSON + a markdown table.

    python bench/triton_gpu_bench.py --out runs/triton_bench          # GPU, ~2-3 minutes on an H100
    python bench/triton_gpu_bench.py --dry-run --out /tmp/tb          # CPU, tiny shapes, Triton interpreter

Times (median of ``triton.testing.do_bench``; wall clock in --dry-run) at the Based shape: bfloat16,
H=16, D=16, Dv=64, B=16, L in {1024, 2048, 4096, 8192}:
* ``triton-auto`` (the form ``backend="triton"`` picks), ``triton-parallel`` (quadratic) and
  ``triton-chunk`` (chunked linear), forward and forward+backward, causal and non-causal;
* peers: ``sdpa-flash`` (torch scaled_dot_product_attention, flash backend, head dim 64 for q, k and v),
  ``fla-parallel_based`` and ``fla-fused_chunk_based`` (flash-linear-attention, causal only, [B,T,H,D]);
* a small sweep of chunked-kernel block sizes at the longest L (to retune chunk.py's constants);
* the decoding step at B*H = 1024..4096 (M=153 features, Dv=64, float32 state): achieved GB/s on the
  state bytes (read + write) against a measured device-to-device copy.
A failing peer or configuration is recorded with its error and the run goes on.

FLOP conventions (for the TFLOP/s columns): Taylor attention counts the quadratic form,
2 * B*H * Lq*Lk * (D + Dv) for the forward (half when causal) and 2.5x that for the backward, whatever
form ran; SDPA counts 4 * B*H * L^2 * 64 (half when causal), backward 2.5x, as flash-attention does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Chunked-kernel configurations timed at the longest L (causal): (C, BDV, warps, fused) and (C, warps, fused).
# (C, BDV, warps, fused) around the defaults of linattn_cuda/ops/taylor/triton/chunk.py (first: the default; then its
# neighbours; last: the previous default, C=32 BDV=32 warps=4 fwd / C=16 warps=8 bwd, as the reference).
SWEEP_FWD = [(32, 64, 8, True), (64, 64, 8, True), (16, 64, 8, True), (32, 64, 4, True), (16, 32, 4, True),
             (32, 32, 4, True)]
SWEEP_BWD = [(32, 8, True), (64, 8, True), (32, 4, True), (16, 8, True)]

# (LINATTN_CUDA_DV_SLICE, LINATTN_CUDA_SEGMENTS) for the CUDA causal forward at the longest length
CUDA_SWEEP = [(64, 1), (32, 1), (64, 2), (32, 2)]
# (BLOCK_M, BLOCK_DV, num_warps) of the Triton decode step (first: the default of linattn_cuda/ops/taylor/triton/step.py)
# (256 and 128 rows: the whole state, or half, in one or two iterations, more programs over narrower columns)
STEP_SWEEP = [(64, 64, 4), (32, 64, 4), (64, 32, 4), (32, 32, 4), (16, 64, 2), (64, 64, 8), (128, 32, 4), (256, 16, 4)]

TARGETS = {
    "causal_fwd_ms_B16_L8192": 1.5,  # causal forward at B=16, L=8192 at most this many ms
    "causal_fwdbwd_speedup_vs_fla_L4096plus": 2.0,  # vs the fastest fla based kernel
    "noncausal_fwdbwd_speedup_vs_sdpa_L8192": 3.0,  # vs SDPA flash, head dim 64
    "decode_fraction_of_copy_bw": 0.5,
}


def _setup(dry_run: bool):
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def _timer(device: str, warmup_ms: float, rep_ms: float):
    if device == "cuda":
        import triton.testing

        def bench(fn, grad_to_none=None):
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                 return_mode="median"))

        return bench

    def bench(fn, grad_to_none=None):  # CPU / interpreter: wall clock, median of 3
        times = []
        for _ in range(3):
            if grad_to_none:
                for x in grad_to_none:
                    x.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    return bench


def _taylor_flops(b, h, lq, lk, d, dv, causal, backward):
    f = 2.0 * b * h * lq * lk * (d + dv) * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def _sdpa_flops(b, h, l, hd, causal, backward):
    f = 4.0 * b * h * l * l * hd * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def run(out_dir: str, *, dry_run: bool = False, lengths=None, batch=16, heads=16, d=16, dv=64,
        decode_bh=(1024, 2048, 4096), sweep=True, peers=True, warmup_ms=10.0, rep_ms=50.0, log=print) -> dict:
    """Run the benchmark; write ``triton_gpu_bench.json`` and ``triton_gpu_bench.md`` to ``out_dir``."""
    _setup(dry_run)
    import torch
    import triton

    import linattn_cuda.ops.taylor.triton.ops  # noqa: F401  (registers torch.ops.linattn_cuda.triton_*)
    from linattn_cuda._extension import has_kernel
    from linattn_cuda.feature_map import feature_dim
    from linattn_cuda.ops.taylor.triton import chunk as chunk_mod
    from linattn_cuda.ops.taylor.triton.backend import choose_form

    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on CPU")
    if dry_run:
        lengths = lengths or [40]
        batch, heads = 1, 2
        decode_bh = (4,)
    lengths = lengths or [1024, 2048, 4096, 8192]
    dtype = torch.bfloat16
    scale = d**-0.5
    bench = _timer(device, warmup_ms, rep_ms)
    rows: list[dict] = []

    def record(impl, mode, causal, L, fn, flops, grad_to_none=None, **extra):
        row = dict(impl=impl, mode=mode, causal=causal, B=batch, H=heads, L=L, D=d, Dv=dv, dtype="bf16", **extra)
        try:
            ms = bench(fn, grad_to_none)
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12 if flops else None)
            log(f"  {impl:28s} {mode:7s} {'causal' if causal else 'full':6s} L={L:5d} {ms:9.3f} ms {extra or ''}")
        except Exception as exc:  # noqa: BLE001 - a failing peer or config must not stop the run
            row.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            log(f"  {impl:28s} {mode:7s} {'causal' if causal else 'full':6s} L={L:5d} FAILED {row['error']}")
            if os.environ.get("LINATTN_BENCH_TRACEBACK"):
                traceback.print_exc()
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()

    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dt=dtype, grad=False):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt).requires_grad_(grad)

    fla = None
    if peers:
        try:
            from fla.ops.based import fused_chunk_based, parallel_based

            fla = {"fla-parallel_based": parallel_based, "fla-fused_chunk_based": fused_chunk_based}
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(impl="fla", error=f"not importable: {type(exc).__name__}: {exc}"))
            log(f"  flash-linear-attention not importable ({exc})")

    for L in lengths:
        log(f"L = {L}")
        q, k, v = rnd(batch, heads, L, d, grad=True), rnd(batch, heads, L, d, grad=True), rnd(batch, heads, L, dv, grad=True)
        g = rnd(batch, heads, L, dv)
        for causal in (True, False):
            auto = choose_form(L, L, d, dv, causal)
            for form in ("auto", "parallel", "chunk"):
                chunked = (auto if form == "auto" else form) == "chunk"
                name = f"triton-{form}" + (f"({auto})" if form == "auto" else "")

                def fwd(chunked=chunked, causal=causal):
                    return torch.ops.linattn_cuda.triton_fwd(q, k, v, None, causal, scale, chunked)[0]

                def fwdbwd(fwd=fwd):
                    fwd().backward(g)

                with torch.no_grad():
                    record(name, "fwd", causal, L, fwd, _taylor_flops(batch, heads, L, L, d, dv, causal, False))
                record(name, "fwd+bwd", causal, L, fwdbwd, _taylor_flops(batch, heads, L, L, d, dv, causal, True),
                       grad_to_none=[q, k, v])
        # the CUDA C++ kernels (csrc/cuda), side by side, when the extension was built with them
        if device == "cuda" and has_kernel("CUDA"):
            import linattn_cuda.ops.taylor.registration  # noqa: F401  (autograd for taylor_fwd)

            for causal in (True, False):
                def c_fwd(causal=causal):
                    return torch.ops.linattn_cuda.taylor_fwd(q, k, v, None, causal, scale)[0]

                def c_fwdbwd(c_fwd=c_fwd):
                    c_fwd().backward(g)

                with torch.no_grad():
                    record("cuda-ext", "fwd", causal, L, c_fwd, _taylor_flops(batch, heads, L, L, d, dv, causal, False))
                record("cuda-ext", "fwd+bwd", causal, L, c_fwdbwd, _taylor_flops(batch, heads, L, L, d, dv, causal, True),
                       grad_to_none=[q, k, v])
        del q, k, v, g
        if peers:
            qs, ks, vs = (rnd(batch, heads, L, 64, grad=True) for _ in range(3))
            gs = rnd(batch, heads, L, 64)
            for causal in (True, False):
                def sdpa(causal=causal):
                    if device == "cuda":
                        from torch.nn.attention import SDPBackend, sdpa_kernel

                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                    return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)

                def sdpa_fb(sdpa=sdpa):
                    sdpa().backward(gs)

                with torch.no_grad():
                    record("sdpa-flash(hd64)", "fwd", causal, L, sdpa, _sdpa_flops(batch, heads, L, 64, causal, False))
                record("sdpa-flash(hd64)", "fwd+bwd", causal, L, sdpa_fb, _sdpa_flops(batch, heads, L, 64, causal, True),
                       grad_to_none=[qs, ks, vs])
            del qs, ks, vs, gs
            if fla is not None:
                qf, kf = rnd(batch, L, heads, d, grad=True), rnd(batch, L, heads, d, grad=True)
                vf, gf = rnd(batch, L, heads, dv, grad=True), rnd(batch, L, heads, dv)
                for name, fn in fla.items():
                    def f_fwd(fn=fn):
                        return fn(qf, kf, vf, scale=scale)

                    def f_fb(f_fwd=f_fwd):
                        f_fwd().backward(gf)

                    with torch.no_grad():
                        record(name, "fwd", True, L, f_fwd, _taylor_flops(batch, heads, L, L, d, dv, True, False))
                    record(name, "fwd+bwd", True, L, f_fb, _taylor_flops(batch, heads, L, L, d, dv, True, True),
                           grad_to_none=[qf, kf, vf])
                del qf, kf, vf, gf

    if sweep:
        L = max(lengths)  # the longest, whatever the order the lengths were given in
        log(f"chunked-kernel block sizes at L = {L} (causal)")
        q, k, v = rnd(batch, heads, L, d), rnd(batch, heads, L, d), rnd(batch, heads, L, dv)
        g = rnd(batch, heads, L, dv)
        for c, bdv, warps, fused in SWEEP_FWD if not dry_run else [(16, 16, 4, True)]:
            def sw_fwd(c=c, bdv=bdv, warps=warps, fused=fused):
                return chunk_mod.chunk_fwd(q, k, v, None, True, scale, chunk=c, block_dv=bdv, num_warps=warps, fused=fused)

            record("triton-chunk-sweep", "fwd", True, L, sw_fwd, _taylor_flops(batch, heads, L, L, d, dv, True, False),
                   config=f"C={c} BDV={bdv} warps={warps} {'fused' if fused else 'split'}")
        with torch.no_grad():
            out, den = chunk_mod.chunk_fwd(q, k, v, None, True, scale)
        for c, warps, fused in SWEEP_BWD if not dry_run else [(16, 4, True)]:
            def sw_bwd(c=c, warps=warps, fused=fused):
                return chunk_mod.chunk_bwd(g, q, k, v, None, out, den, True, scale, chunk=c, num_warps=warps, fused=fused)

            record("triton-chunk-sweep", "bwd", True, L, sw_bwd, _taylor_flops(batch, heads, L, L, d, dv, True, True) / 3.5 * 2.5,
                   config=f"C={c} warps={warps} {'fused' if fused else 'split'}")
        del q, k, v, g, out, den
        if device == "cuda" and has_kernel("CUDA"):
            # the CUDA kernels' switches (read per call): value columns per block, sequence segments
            q, k, v = rnd(batch, heads, L, d), rnd(batch, heads, L, d), rnd(batch, heads, L, dv)
            for ds, segs in CUDA_SWEEP:
                saved = {n: os.environ.get(n) for n in ("LINATTN_CUDA_DV_SLICE", "LINATTN_CUDA_SEGMENTS")}
                os.environ["LINATTN_CUDA_DV_SLICE"] = str(ds)
                os.environ["LINATTN_CUDA_SEGMENTS"] = str(segs)
                try:
                    def cu_fwd():
                        return torch.ops.linattn_cuda.taylor_fwd(q, k, v, None, True, scale)[0]

                    with torch.no_grad():
                        record("cuda-ext-sweep", "fwd", True, L, cu_fwd, _taylor_flops(batch, heads, L, L, d, dv, True, False),
                               config=f"DV_SLICE={ds} SEGMENTS={segs}")
                finally:
                    for n, val in saved.items():
                        if val is None:
                            os.environ.pop(n, None)
                        else:
                            os.environ[n] = val
            del q, k, v

    # decoding step vs a device-to-device copy
    log("decode step")
    m = feature_dim(d)
    decode = []
    copy_gbs = None
    try:
        nbytes = (256 << 20) if device == "cuda" else (4 << 20)
        src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
        dst = torch.empty_like(src)
        copy_ms = bench(lambda: dst.copy_(src))
        copy_gbs = 2 * nbytes / (copy_ms * 1e-3) / 1e9
        log(f"  device-to-device copy: {copy_gbs:.0f} GB/s")
        del src, dst
    except Exception as exc:  # noqa: BLE001
        log(f"  copy bandwidth failed: {exc}")
    from linattn_cuda.ops.taylor.triton import step as step_mod

    def graphed(fn):
        """``fn`` captured in a CUDA graph: its replay times the kernels without the Python launch cost."""
        if device != "cuda":
            return fn
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compile and warm outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    for bh in decode_bh:
        b = max(1, bh // heads)
        hh = bh // b
        row = dict(impl="triton-step", B=b, H=hh, D=d, Dv=dv, M=m)
        try:
            qd, kd, vd = rnd(b, hh, d), rnd(b, hh, d), rnd(b, hh, dv)
            kv = torch.randn(b, hh, m, dv, device=device, generator=gen)
            ks = torch.rand(b, hh, m, device=device, generator=gen) + 1.0
            state_bytes = 2 * (kv.numel() + ks.numel()) * 4

            def gbs_of(ms):
                return state_bytes / (ms * 1e-3) / 1e9

            def t_step():
                return torch.ops.linattn_cuda.triton_step(qd, kd, vd, kv, ks, scale)

            ms = bench(t_step)
            gbs = gbs_of(ms)
            row.update(ms=ms, state_GBps=gbs, fraction_of_copy=(gbs / copy_gbs) if copy_gbs else None)
            log(f"  B*H={bh:5d} {ms:8.4f} ms {gbs:8.1f} GB/s" + (f" ({gbs / copy_gbs:.0%} of copy)" if copy_gbs else ""))
            # the same in a CUDA graph (no launch cost: the kernel's own time), then block-size variants
            ms_g = bench(graphed(t_step))
            row.update(graph_ms=ms_g, graph_fraction_of_copy=(gbs_of(ms_g) / copy_gbs) if copy_gbs else None)
            log(f"  B*H={bh:5d} graph {ms_g:8.4f} ms {gbs_of(ms_g):8.1f} GB/s")
            sweep_rows = []
            for bm, bdv, warps in ((STEP_SWEEP if not dry_run else [(32, 32, 4)]) if sweep else []):
                def t_var(bm=bm, bdv=bdv, warps=warps):
                    return step_mod.step_fwd(qd, kd, vd, kv, ks, scale, block_m=bm, block_dv=bdv, num_warps=warps)

                try:
                    ms_v = bench(graphed(t_var))
                    sweep_rows.append(dict(config=f"BM={bm} BDV={bdv} warps={warps}", graph_ms=ms_v,
                                           state_GBps=gbs_of(ms_v)))
                    log(f"    step BM={bm:3d} BDV={bdv:3d} warps={warps} graph {ms_v:8.4f} ms {gbs_of(ms_v):8.1f} GB/s")
                except Exception as exc:  # noqa: BLE001
                    sweep_rows.append(dict(config=f"BM={bm} BDV={bdv} warps={warps}", error=str(exc)[:300]))
            if sweep_rows:
                row["sweep"] = sweep_rows
            if device == "cuda" and has_kernel("CUDA", "taylor_step"):
                def c_step():
                    return torch.ops.linattn_cuda.taylor_step(qd, kd, vd, kv, ks, scale)

                ms_c = bench(c_step)
                ms_cg = bench(graphed(c_step))
                row.update(cuda_ms=ms_c, cuda_state_GBps=gbs_of(ms_c), cuda_graph_ms=ms_cg)
                log(f"  cuda-ext step B*H={bh:5d} {ms_c:8.4f} ms {gbs_of(ms_c):8.1f} GB/s; graph {ms_cg:8.4f} ms")
        except Exception as exc:  # noqa: BLE001
            row.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            log(f"  B*H={bh} FAILED {row['error']}")
        decode.append(row)

    result = dict(
        machine=_machine(device),
        shape=dict(B=batch, H=heads, D=d, Dv=dv, dtype="bf16", lengths=lengths),
        flop_convention=__doc__.split("FLOP conventions")[1].strip(),
        attention=rows,
        decode=dict(copy_GBps=copy_gbs, rows=decode),
        targets=_targets(rows, decode, batch, lengths),
        dry_run=dry_run,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "triton_gpu_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out_dir, "triton_gpu_bench.md"), "w") as f:
        f.write(table)
    log(table)
    return result


def _machine(device):
    import torch
    import triton

    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__, device=device)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        info["fla"] = None
    return info


def _best(rows, impl_prefix, mode, causal, L):
    times = [r["ms"] for r in rows if r.get("ms") and r["impl"].startswith(impl_prefix) and r["mode"] == mode
             and r["causal"] == causal and r["L"] == L]
    return min(times) if times else None


def _targets(rows, decode, batch, lengths):
    out = {}
    L = max(lengths)
    t = _best(rows, "triton-auto", "fwd", True, L)
    out["causal_fwd_ms_at_max_L"] = dict(L=L, B=batch, ms=t, target_ms=TARGETS["causal_fwd_ms_B16_L8192"],
                                          met=(t is not None and t <= TARGETS["causal_fwd_ms_B16_L8192"]))
    sp = {}
    for L_ in lengths:
        if L_ >= 4096 or L_ == L:
            ours, fla = _best(rows, "triton-auto", "fwd+bwd", True, L_), _best(rows, "fla-", "fwd+bwd", True, L_)
            sp[L_] = (fla / ours) if (ours and fla) else None
    out["causal_fwdbwd_speedup_vs_fla"] = dict(per_L=sp, target=TARGETS["causal_fwdbwd_speedup_vs_fla_L4096plus"],
                                               met=bool(sp) and all(v is not None and v >= 2.0 for v in sp.values()))
    ours, sdpa = _best(rows, "triton-auto", "fwd+bwd", False, L), _best(rows, "sdpa-", "fwd+bwd", False, L)
    s = (sdpa / ours) if (ours and sdpa) else None
    out["noncausal_fwdbwd_speedup_vs_sdpa"] = dict(L=L, speedup=s, target=TARGETS["noncausal_fwdbwd_speedup_vs_sdpa_L8192"],
                                                   met=s is not None and s >= 3.0)
    fr = [r.get("fraction_of_copy") for r in decode if r.get("fraction_of_copy") is not None]
    out["decode_fraction_of_copy"] = dict(min=min(fr) if fr else None, target=TARGETS["decode_fraction_of_copy_bw"],
                                          met=bool(fr) and min(fr) >= 0.5)
    fg = [r.get("graph_fraction_of_copy") for r in decode if r.get("graph_fraction_of_copy") is not None]
    out["decode_fraction_of_copy_graph"] = dict(min=min(fg) if fg else None, target=TARGETS["decode_fraction_of_copy_bw"],
                                                met=bool(fg) and min(fg) >= 0.5)
    return out


def markdown(result) -> str:
    m = result["machine"]
    lines = [f"### Triton kernels — {m.get('gpu', m.get('cpu'))} (torch {m['torch']}, triton {m['triton']}, fla {m.get('fla')})", ""]
    s = result["shape"]
    lines.append(f"bf16, B={s['B']}, H={s['H']}, D={s['D']}, Dv={s['Dv']} (SDPA: head dim 64). Median ms; "
                 "TFLOP/s in brackets (quadratic-form FLOPs, see the JSON's flop_convention).")
    lines.append("")
    lengths = s["lengths"]
    lines.append("| impl | mode | mask | " + " | ".join(f"L={L}" for L in lengths) + " |")
    lines.append("|---|---|---|" + "---|" * len(lengths))
    keys = []
    for r in result["attention"]:
        if "mode" not in r:
            continue
        key = (r["impl"] + (f" [{r['config']}]" if r.get("config") else ""), r["mode"], r["causal"])
        if key not in keys:
            keys.append(key)
    for impl, mode, causal in keys:
        cells = []
        for L in lengths:
            hit = [r for r in result["attention"] if "mode" in r and (r["impl"] + (f" [{r['config']}]" if r.get("config") else "")) == impl
                   and r["mode"] == mode and r["causal"] == causal and r["L"] == L]
            if not hit:
                cells.append("")
            elif hit[0].get("ms") is None:
                cells.append("error")
            else:
                tf = hit[0].get("tflops")
                cells.append(f"{hit[0]['ms']:.3f}" + (f" ({tf:.0f})" if tf else ""))
        lines.append(f"| {impl} | {mode} | {'causal' if causal else 'full'} | " + " | ".join(cells) + " |")
    errors = [r for r in result["attention"] if r.get("error")]
    if errors:
        lines += ["", "Errors:"] + [f"- {r['impl']} {r.get('mode', '')} L={r.get('L', '')}: {r['error']}" for r in errors[:12]]
    d = result["decode"]
    lines += ["", f"Decode step (state read + write, float32, M=153, Dv=64); device copy {d['copy_GBps'] or float('nan'):.0f} GB/s:", "",
              "| B*H | ms | state GB/s | of copy | in a CUDA graph: ms | of copy | cuda-ext ms | cuda-ext graph ms |",
              "|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    for r in d["rows"]:
        if r.get("ms") is None:
            lines.append(f"| {r['B'] * r['H']} | error | {r.get('error', '')} | | | | | |")
        else:
            lines.append(f"| {r['B'] * r['H']} | {r['ms']:.4f} | {r['state_GBps']:.0f} | {fmt(r.get('fraction_of_copy'), '.0%')} "
                         f"| {fmt(r.get('graph_ms'), '.4f')} | {fmt(r.get('graph_fraction_of_copy'), '.0%')} "
                         f"| {fmt(r.get('cuda_ms'), '.4f')} | {fmt(r.get('cuda_graph_ms'), '.4f')} |")
    sweeps = [(r["B"] * r["H"], x) for r in d["rows"] for x in r.get("sweep", [])]
    if sweeps:
        lines += ["", "Decode step block sizes (CUDA graph replay):", "", "| B*H | config | ms | state GB/s |", "|---|---|---|---|"]
        for bh, x in sweeps:
            lines.append(f"| {bh} | {x['config']} | {fmt(x.get('graph_ms'), '.4f') or 'error'} | {fmt(x.get('state_GBps'), '.0f')} |")
    lines += ["", "Targets:", ""]
    for name, t in result["targets"].items():
        lines.append(f"- {name}: {'MET' if t['met'] else 'not met'} — {json.dumps({k: v for k, v in t.items() if k != 'met'})}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark the Triton Taylor-attention kernels against peers.")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "triton_gpu_bench"), help="output directory")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="skip the chunked-kernel block-size sweep")
    ap.add_argument("--no-peers", action="store_true", help="skip SDPA and flash-linear-attention")
    ap.add_argument("--pythonpath", default=None, help="extra import path (e.g. an unpacked flash-linear-attention)")
    args = ap.parse_args(argv)
    if args.pythonpath:
        sys.path.insert(0, args.pythonpath)
    run(args.out, dry_run=args.dry_run, lengths=args.lengths, sweep=not args.no_sweep, peers=not args.no_peers)


if __name__ == "__main__":
    main()
