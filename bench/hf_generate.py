"""Hugging Face ``generate()`` per-token cost against the prompt length: Taylor and hybrid attention with the
fixed-size state cache, against the default SDPA softmax attention with its growing key/value cache.

    OMP_NUM_THREADS=1 python -m bench.hf_generate --threads 1            # writes bench/results/hf_generate.*

One tiny Llama built from a config (random weights, no download; ``--hidden 256 --layers 4 --heads 8 --kv-heads 8``:
head dim 32), batch 1, prompts of ``--lengths`` tokens, ``--new-tokens`` greedy tokens, each case run
``--repeats`` times (cases interleaved) after one warm-up, the minimum over the repeats reported. A logits
processor stamps the time at every generated token (wall clock and this thread's CPU time), so the decode figure
is the median interval between consecutive tokens (one forward of one token through the cache: no prefill in it);
``prefill`` is the time to the first token. On a shared machine the CPU time is the figure to read (the wall clock
includes the time other processes hold the core). ``cache bytes`` is what the returned cache holds after the last
token (the state: ``TaylorStateCache.nbytes``; SDPA: its keys and values).

The issue's target: Taylor and hybrid per-token decode time from a 4K prompt within 1.3x of that from a 128-token
prompt, cache bytes identical; SDPA's grows with the prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import format_machine_header, machine_info  # noqa: E402

IMPLS = {"taylor": "Taylor (state cache)", "taylor_hybrid": "hybrid W=64 (state cache)", "sdpa": "SDPA (key/value cache)"}


class _Stamps:
    """A logits processor that records when each generated token's logits arrive: wall clock and the CPU time of
    this thread (with one torch thread all the work runs here, so the CPU time is the cost of the token even when
    other processes share the cores)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def __call__(self, input_ids, scores):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())
        return scores


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def build(attn: str, args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.lengths) + 256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def run_once(model, length: int, args) -> dict:
    """One generate() call; per-token figures are medians over its steps."""
    from transformers import LogitsProcessorList

    ids = torch.randint(3, args.vocab, (1, length), generator=torch.Generator().manual_seed(length))
    stamps = _Stamps()
    start, start_cpu = time.perf_counter(), time.thread_time()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([stamps]), return_dict_in_generate=True)
    end = time.perf_counter()
    steps = [b - a for a, b in zip(stamps.wall[:-1], stamps.wall[1:])]
    steps_cpu = [b - a for a, b in zip(stamps.cpu[:-1], stamps.cpu[1:])]
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return {"total_s": end - start, "prefill_s": stamps.wall[0] - start, "prefill_cpu_s": stamps.cpu[0] - start_cpu,
            "decode_ms": 1e3 * statistics.median(steps), "decode_cpu_ms": 1e3 * statistics.median(steps_cpu),
            "cache_bytes": cache_bytes(cache), "cache_type": type(cache).__name__}


def summarize(length: int, runs: list, args) -> dict:
    """The minimum over the repeats of each figure (interference from other processes only ever adds time)."""
    best = {k: min(r[k] for r in runs) for k in ("total_s", "prefill_s", "prefill_cpu_s", "decode_ms", "decode_cpu_ms")}
    return {"length": length, **best, "decode_tokens_per_s": 1e3 / best["decode_ms"],
            "decode_cpu_tokens_per_s": 1e3 / best["decode_cpu_ms"],
            "generate_tokens_per_s": args.new_tokens / best["total_s"], "cache_bytes": runs[-1]["cache_bytes"],
            "cache_type": runs[-1]["cache_type"], "repeats": runs}


def write_report(results: dict, info: dict, args, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(args), "results": results}, indent=1))
    lines = ["# Hugging Face generate(): per-token cost against the prompt length", "", format_machine_header(info), "",
             f"Command: `{args.command}`", "",
             f"Model: Llama from a config, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
             f"({args.kv_heads} key/value heads) of dim {args.hidden // args.heads}, vocab {args.vocab}, float32, "
             f"batch 1, {args.new_tokens} greedy tokens; each figure the minimum over {args.repeats} runs (cases interleaved, "
             "after a warm-up) of the run's median per-token time.", "",
             "Decode: the median time between consecutive generated tokens (one forward of one token through the cache);"
             " CPU = this thread's CPU time (the cost of the token, whatever else shares the cores), wall = wall clock."
             " Prefill: time to the first token (CPU time).", "",
             "| attention | prompt | prefill CPU (s) | decode CPU (ms/token) | decode CPU tokens/s | decode wall (ms/token) | "
             "generate() tokens/s (wall) | cache | cache bytes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for impl, rows in results.items():
        for r in rows:
            lines.append(f"| {IMPLS[impl]} | {r['length']} | {r['prefill_cpu_s']:.3f} | {r['decode_cpu_ms']:.2f} | "
                         f"{r['decode_cpu_tokens_per_s']:.0f} | {r['decode_ms']:.2f} | {r['generate_tokens_per_s']:.1f} | "
                         f"{r['cache_type']} | {r['cache_bytes']:,} |")
    lines += ["", "Per-token decode CPU time at the longest prompt over that at the shortest (target for the state "
              "caches: <= 1.3 from 128 to 4K):", ""]
    for impl, rows in results.items():
        by_len = {r["length"]: r for r in rows}
        lo, hi = min(by_len), max(by_len)
        ratio = by_len[hi]["decode_cpu_ms"] / by_len[lo]["decode_cpu_ms"]
        extra = ""
        if 4096 in by_len and lo != 4096:
            extra = f", 4K / {lo}: {by_len[4096]['decode_cpu_ms'] / by_len[lo]['decode_cpu_ms']:.2f}x"
        same = len({r["cache_bytes"] for r in rows}) == 1
        lines.append(f"- {IMPLS[impl]}: {hi} / {lo}: {ratio:.2f}x{extra}; cache bytes "
                     f"{'identical for every prompt' if same else 'grow with the prompt'}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for impl, rows in results.items():
        xs = [r["length"] for r in rows]
        ax1.plot(xs, [r["decode_cpu_tokens_per_s"] for r in rows], marker="o", label=IMPLS[impl])
        ax2.plot(xs, [r["cache_bytes"] / 2**20 for r in rows], marker="o", label=IMPLS[impl])
    for ax, ylabel in ((ax1, "decode tokens/s (one thread, CPU time)"), (ax2, "cache MiB after generation")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    fig.suptitle(f"generate() on a tiny Llama (head dim {args.hidden // args.heads}), CPU: {info['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128,512,1024,2048,4096,8192")
    p.add_argument("--impls", default="taylor,taylor_hybrid,sdpa")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hf_generate"))
    args = p.parse_args(argv)
    args.command = " ".join(["python -m bench.hf_generate"] + (sys.argv[1:] if argv is None else list(argv)))
    args.lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(args.threads)

    import transformers

    import linattn_cuda.integrations.transformers as la_hf

    transformers.logging.set_verbosity_error()
    la_hf.register("taylor")
    la_hf.register("taylor_hybrid", kind="hybrid", window=args.window)
    info = machine_info("cpu")
    info["transformers"] = transformers.__version__
    info["load_before"] = os.getloadavg()
    if args.note:
        info["note"] = args.note
    impls = args.impls.split(",")
    models = {impl: build(impl, args) for impl in impls}
    for impl in impls:  # warm-up
        run_once(models[impl], args.lengths[0], args)
    runs = {(impl, length): [] for impl in impls for length in args.lengths}
    for rep in range(args.repeats):  # interleaved, so that a busy spell of the machine hits every case alike
        for length in args.lengths:
            for impl in impls:
                row = run_once(models[impl], length, args)
                runs[impl, length].append(row)
                print(f"[{rep}] {impl:14s} L={length:5d} prefill {row['prefill_s']:.3f} s  decode "
                      f"{row['decode_cpu_ms']:.2f} ms/token CPU, {row['decode_ms']:.2f} wall  {row['cache_type']} "
                      f"{row['cache_bytes']:,} B", flush=True)
    results = {impl: [summarize(length, runs[impl, length], args) for length in args.lengths] for impl in impls}
    info["load_after"] = os.getloadavg()
    info["note"] = ((info.get("note") + "; ") if info.get("note") else "") + (
        f"transformers {transformers.__version__}; load average (1, 5, 15 min) before {info['load_before']}, "
        f"after {info['load_after']}")
    write_report(results, info, args, Path(args.out))


if __name__ == "__main__":
    main()
