"""Hybrid attention's cost against the sequence length, side by side with Taylor attention and softmax (SDPA).

    python -m bench.hybrid_scaling [--device cpu] [--lengths 1024,2048,4096,8192,16384] [--window 64]

Times causal forward and forward+backward of ``hybrid_attention`` (softmax in a window of W keys, Taylor
beyond; ``backend`` as given), ``taylor_attention`` (same backend) and ``F.scaled_dot_product_attention``
(causal) at B=1, H=4, D=16, Dv=64 (the head shape of bench.scaling), fp32; median of ``--repeats`` calls after
a warm-up. Fits ``t ~ L^p`` over the lengths and writes ``bench/results/hybrid_scaling.{json,md}``.
The hybrid's work (FLOPs) per query: window part 2·(2W)·(D+Dv) (blocks of W queries against 2W keys, as
computed), Taylor part 4·M·(Dv+1) (the linear form with one extra value column for the normalizer), so its
time should grow like L, with a constant of about the Taylor part's plus the window's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.fitting import fit_exponent
from bench.machine import format_machine_header, machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _impls(backend: str, window: int):
    import linattn_cuda as la

    return {
        f"hybrid_{backend} (W={window})": lambda q, k, v: la.hybrid_attention(q, k, v, window=window, backend=backend),
        f"taylor_{backend}": lambda q, k, v: la.taylor_attention(q, k, v, causal=True, backend=backend),
        "softmax_sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def run(device: str, lengths, window: int, backend: str, repeats: int, batch: int, heads: int, d: int, dv: int):
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        q, k = (torch.randn(batch, heads, length, d, generator=gen).to(dev) for _ in range(2))
        v = torch.randn(batch, heads, length, dv, generator=gen).to(dev)
        for name, fn in _impls(backend, window).items():
            for mode in ("fwd", "fwdbwd"):
                leaves = [t.detach().clone().requires_grad_(mode == "fwdbwd") for t in (q, k, v)]
                if mode == "fwd":
                    call = lambda: fn(*leaves)  # noqa: E731
                    with torch.no_grad():
                        ms = _time(call, repeats, sync)
                else:
                    grad = torch.randn(batch, heads, length, dv, generator=gen).to(dev)

                    def call():
                        torch.autograd.backward(fn(*leaves), grad)

                    ms = _time(call, repeats, sync)
                rows.append({"impl": name, "mode": mode, "length": length, "ms": ms})
                print(f"L={length:6d} {name:24s} {mode:7s} {ms:9.2f} ms", flush=True)
    return rows


def report(rows, info, args) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    lines = [
        "# Hybrid attention: time against length (causal)", "",
        format_machine_header(info), "",
        f"B={args.batch}, H={args.heads}, D={args.d}, Dv={args.dv}, fp32, window {args.window}, median of "
        f"{args.repeats} calls, milliseconds. Command: `python -m bench.hybrid_scaling --device {args.device} "
        f"--lengths {','.join(map(str, lengths))} --window {args.window} --backend {args.backend}"
        + (f" --threads {args.threads}" if args.threads else "") + "`", "",
    ]
    for mode in ("fwd", "fwdbwd"):
        lines += [f"## {mode}", "", "| impl | " + " | ".join(f"L={n}" for n in lengths) + " | exponent |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for impl in impls:
            t = {r["length"]: r["ms"] for r in rows if r["impl"] == impl and r["mode"] == mode}
            fit = fit_exponent(list(t), list(t.values()))
            cells = " | ".join(f"{t[n]:.2f}" if n in t else "—" for n in lengths)
            lines.append(f"| {impl} | {cells} | {fit.exponent:.2f} |" if fit else f"| {impl} | {cells} | — |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="cpu", help="linattn_cuda backend of the Taylor parts (default cpu)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS / "hybrid_scaling"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    rows = run(args.device, lengths, args.window, args.backend, args.repeats, args.batch, args.heads, args.d, args.dv)
    info = machine_info(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(report(rows, info, args) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
