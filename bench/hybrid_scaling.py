"""Hybrid attention's cost against the sequence length, side by side with Taylor attention and softmax (SDPA).

    python -m bench.hybrid_scaling [--device cpu] [--lengths 1024,2048,4096,8192,16384] [--window 64] [--threads 1]

Times causal forward and forward+backward of ``hybrid_attention`` (softmax in a window of W keys, Taylor beyond;
``--backend``, default the fused cpu kernel), ``taylor_attention`` (same backend) and
``F.scaled_dot_product_attention`` (causal, the default backend) at B=1, H=4, D=16, Dv=64 (the head shape of
bench.scaling), fp32. The calls are interleaved (every implementation once per round, ``--repeats`` rounds after a
warm-up) and the median is kept, so that a shared machine's load drifts into all of them alike. Besides wall time
it records the process's CPU time per call: with one thread (``--threads 1``) that is the work itself, unaffected
by waiting for a core on a loaded machine (wall times there favour short calls, which find a free core more often,
and inflate fitted exponents). SDPA is timed up to ``--sdpa-max-length``. Also records the
bytes each implementation saves for its backward (saved-tensor hooks, distinct storages; q, k, v included) and the
machine load (1-minute load average) before and after. Fits ``t ~ L^p`` over the lengths and writes
``bench/results/hybrid_scaling.{json,md,png}``.

Work per query (FLOPs) of the fused hybrid kernel: Taylor part 4 M Dv (as Taylor's chunked form, M = 153 for D = 16),
window part 2 (C + W) (D + Dv) with C = 64-row blocks (one C x (C + W - 1) logit block per C queries); so its time
should grow like L with a constant about 1.2 times Taylor's at W = 64.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.fitting import fit_exponent
from bench.machine import format_machine_header, machine_info

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "fwdbwd")


def _impls(backend: str, window: int):
    import linattn_cuda as la

    return {
        f"hybrid_{backend} (W={window})": lambda q, k, v: la.hybrid_attention(q, k, v, window=window, backend=backend),
        f"taylor_{backend}": lambda q, k, v: la.taylor_attention(q, k, v, causal=True, backend=backend),
        "softmax_sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return None


def saved_bytes(fn, q, k, v) -> int:
    """Bytes of the distinct storages autograd saves for fn's backward (inputs included)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(seen.values())


def run(device: str, lengths, window: int, backend: str, repeats: int, batch: int, heads: int, d: int, dv: int,
        sdpa_max_length: int = 1 << 62):
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows, memory = [], []
    impls = _impls(backend, window)
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        q, k = (torch.randn(batch, heads, length, d, generator=gen).to(dev) for _ in range(2))
        v = torch.randn(batch, heads, length, dv, generator=gen).to(dev)
        grad = torch.randn(batch, heads, length, dv, generator=gen).to(dev)
        calls = {}
        for name, fn in impls.items():
            if name == "softmax_sdpa" and length > sdpa_max_length:
                continue
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(q, k, v)

            def fwdbwd(fn=fn, leaves=leaves):
                torch.autograd.backward(fn(*leaves), grad)

            calls[(name, "fwd")], calls[(name, "fwdbwd")] = fwd, fwdbwd
            memory.append({"impl": name, "length": length, "saved_mib": saved_bytes(fn, q, k, v) / 2**20})
        times = {key: [] for key in calls}
        cpu = {key: [] for key in calls}
        for key, call in calls.items():  # warm-up
            call()
            sync()
        for _ in range(repeats):
            for key, call in calls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                sync()
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
        for (name, mode), ts in times.items():
            ms, cpu_ms = statistics.median(ts) * 1e3, statistics.median(cpu[(name, mode)]) * 1e3
            rows.append({"impl": name, "mode": mode, "length": length, "ms": ms, "cpu_ms": cpu_ms})
            print(f"L={length:6d} {name:24s} {mode:7s} {ms:9.2f} ms wall {cpu_ms:9.2f} ms cpu", flush=True)
    return rows, memory


def _table(rows, key: str, impls, lengths, fmt, mode=None, exponent=True) -> list[str]:
    head = "| impl | " + " | ".join(f"L={n}" for n in lengths) + (" | exponent |" if exponent else " |")
    lines = [head, "|---|" + "---|" * (len(lengths) + (1 if exponent else 0))]
    for impl in impls:
        t = {r["length"]: r[key] for r in rows if r["impl"] == impl and (mode is None or r["mode"] == mode)}
        cells = " | ".join(fmt(t[n]) if n in t else "—" for n in lengths)
        if exponent:
            fit = fit_exponent(list(t), list(t.values()))
            lines.append(f"| {impl} | {cells} | {fit.exponent:.2f} |" if fit else f"| {impl} | {cells} | — |")
        else:
            lines.append(f"| {impl} | {cells} |")
    return lines


def report(rows, memory, info, args, load) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    hybrid, taylor = impls[0], impls[1]
    load_txt = "" if load[0] is None else f" 1-minute load average {load[0]:.2f} before, {load[1]:.2f} after."
    lines = [
        "# Hybrid attention: time against length (causal)", "",
        format_machine_header(info), "",
        f"B={args.batch}, H={args.heads}, D={args.d}, Dv={args.dv}, fp32, window {args.window}, median of "
        f"{args.repeats} interleaved rounds, milliseconds.{load_txt} Command: `python -m bench.hybrid_scaling "
        f"--device {args.device} --lengths {','.join(map(str, lengths))} --window {args.window} "
        f"--backend {args.backend} --repeats {args.repeats} --sdpa-max-length {args.sdpa_max_length}"
        + (f" --threads {args.threads}" if args.threads else "") + "`",
        "",
    ]
    for mode in MODES:
        lines += [f"## {mode} (wall ms)", ""] + _table(rows, "ms", impls, lengths, lambda x: f"{x:.2f}", mode) + [""]
    for mode in MODES:
        lines += [f"## {mode} (process CPU ms)", ""]
        lines += _table(rows, "cpu_ms", impls, lengths, lambda x: f"{x:.2f}", mode) + [""]
    for key, clock in (("ms", "wall"), ("cpu_ms", "CPU time")):
        ratio = []
        for n in lengths:
            t = {(r["impl"], r["mode"]): r[key] for r in rows if r["length"] == n}
            if all((i, m) in t for i in (hybrid, taylor) for m in MODES):
                ratio.append({"length": n, "fwd": t[(hybrid, "fwd")] / t[(taylor, "fwd")],
                              "fwdbwd": t[(hybrid, "fwdbwd")] / t[(taylor, "fwdbwd")]})
        if ratio:
            lines += [f"## hybrid / Taylor ({clock})", "",
                      "| | " + " | ".join(f"L={r['length']}" for r in ratio) + " |",
                      "|---|" + "---|" * len(ratio),
                      "| fwd | " + " | ".join(f"{r['fwd']:.2f}" for r in ratio) + " |",
                      "| fwd+bwd | " + " | ".join(f"{r['fwdbwd']:.2f}" for r in ratio) + " |", ""]
    lines += ["## saved for backward (MiB, q, k, v included)", ""]
    lines += _table(memory, "saved_mib", impls, lengths, lambda x: f"{x:.1f}", exponent=False) + [""]
    return "\n".join(lines)


def plot(rows, memory, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, mode in zip(axes[:2], MODES):
        for impl in impls:
            pts = sorted((r["length"], r["ms"]) for r in rows if r["impl"] == impl and r["mode"] == mode)
            line, = ax.loglog(*zip(*pts), marker="o", label=f"{impl} (wall)")
            pts = sorted((r["length"], r["cpu_ms"]) for r in rows if r["impl"] == impl and r["mode"] == mode)
            ax.loglog(*zip(*pts), marker=".", linestyle="--", color=line.get_color(), label=f"{impl} (CPU time)")
        ax.set(xlabel="sequence length L", ylabel="ms", title=f"causal {mode.replace('fwdbwd', 'forward+backward')}")
        ax.grid(True, which="both", alpha=0.3)
    for impl in impls:
        pts = sorted((m["length"], m["saved_mib"]) for m in memory if m["impl"] == impl)
        axes[2].loglog(*zip(*pts), marker="o", label=impl)
    axes[2].set(xlabel="sequence length L", ylabel="MiB", title="saved for backward")
    axes[2].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="cpu", help="linattn_cuda backend of hybrid and Taylor (default cpu)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--sdpa-max-length", type=int, default=16384, help="time SDPA up to this length")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "hybrid_scaling"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    load_before = _load()
    rows, memory = run(args.device, lengths, args.window, args.backend, args.repeats, args.batch, args.heads, args.d,
                       args.dv, args.sdpa_max_length)
    load = (load_before, _load())
    info = machine_info(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "args": vars(args), "load_average": load, "rows": rows, "memory": memory}, indent=1))
    out.with_suffix(".md").write_text(report(rows, memory, info, args, load) + "\n")
    if not args.no_plot:
        plot(rows, memory, out.with_suffix(".png"), f"hybrid attention (W={args.window}) vs Taylor vs softmax, "
                                                    f"{info.get('cpu', args.device)}")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
