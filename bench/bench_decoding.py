"""Greedy-decoding throughput of the ASR decoders on one encoder output, and training step time.

    python bench/bench_decoding.py                      # course sizes (width 200, 2 heads, 98 steps, 1377 frames)
    python bench/bench_decoding.py --batch 16 --device cuda --json out.json
    python bench/bench_decoding.py --decoders transformer,taylor,hybrid,hybrid:taylor --frames 1000 --no-train

``--decoders``: comma-separated ``lstm``, ``transformer``, ``taylor``, ``hybrid``; ``NAME:softmax`` / ``NAME:taylor`` sets
that decoder's cross-attention (``hybrid:taylor``: hybrid self-attention, Taylor cross-attention).

Decoding (tokens/s = batch * steps / seconds, median of --repeats, after one warm-up run):
  * ``<decoder> cached``: one token per step through the decoder's cache (LSTM state, softmax key/value cache,
    Taylor recurrent state, the hybrid's window + Taylor state; cross-attention keys/values or Taylor state
    computed once). ``--valid-frames N`` masks the encoder frames beyond N (as training with --mask-padding).
  * ``<decoder> re-feed``: the course's procedure, the whole prefix through the decoder at every step.
Training: one AdamW step (forward, backward, update) of the full model (encoder + decoder) on a batch of
``--train-batch`` clips of ``--frames`` frames, median of --repeats; ``--train-decoder-only`` times the decoder
alone on a fixed encoder output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.asr.decode import greedy_decode_memory  # noqa: E402
from experiments.asr.models import ModelConfig, build_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16, help="decoding batch (the course's eval batch is 16)")
    p.add_argument("--steps", type=int, default=98)
    p.add_argument("--frames", type=int, default=2754, help="feature frames (encoder output has ceil(frames/2))")
    p.add_argument("--width", type=int, default=200)
    p.add_argument("--feature-dim", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--decoders", default="lstm,transformer,taylor")
    p.add_argument("--window", type=int, default=64, help="hybrid decoder's softmax window")
    p.add_argument("--valid-frames", type=int, default=None,
                   help="mask encoder frames beyond ceil(N/2) in cross-attention (default: no mask, as the course)")
    p.add_argument("--backend", default="auto", help="linattn_cuda backend of the Taylor decoder")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    out = {"machine": machine(device), "torch": torch.__version__, "backend": args.backend, "batch": args.batch, "steps": args.steps,
           "frames": args.frames, "decode": {}, "train_step_seconds": {}}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (args.amp and device.type == "cuda") else torch.autocast("cpu", enabled=False)
    memory = torch.randn(args.batch, (args.frames - 1) // 2 + 1, args.width, device=device)
    memory_mask = None
    if args.valid_frames is not None:
        valid = (args.valid_frames - 1) // 2 + 1
        memory_mask = (torch.arange(memory.shape[1], device=device) >= valid)[None].expand(args.batch, -1)
    print(f"# {out['machine']} | torch {torch.__version__} | backend {args.backend} | batch {args.batch}, {args.steps} steps, "
          f"{memory.shape[1]} encoder frames, width {args.width}", flush=True)
    print("| decoder | decoding | tokens/s | seconds |\n|---|---|---|---|", flush=True)
    for name in args.decoders.split(","):
        decoder, _, cross = name.partition(":")
        cfg = ModelConfig(decoder=decoder, width=args.width, mlp=2 * args.width, max_frames=args.frames, feature_dim=args.feature_dim,
                          backend=args.backend, cross_attention=cross or None, window=args.window, max_len=max(98, args.steps))
        model = build_model(cfg).to(device).eval()
        for cached in (True, False):
            with torch.no_grad(), amp:
                seconds = _time(lambda: greedy_decode_memory(model.decoder, memory, steps=args.steps, use_cache=cached,
                                                             memory_mask=memory_mask), device, args.repeats)
            key = f"{name} {'cached' if cached else 're-feed'}"
            rate = args.batch * args.steps / seconds
            out["decode"][key] = {"tokens_per_s": rate, "seconds": seconds}
            print(f"| {name} | {'cached' if cached else 're-feed (course)'} | {rate:,.0f} | {seconds:.3f} |", flush=True)
    base = out["decode"].get("transformer re-feed", {}).get("seconds")
    if base and "taylor cached" in out["decode"]:
        out["taylor_cached_speedup_vs_transformer_refeed"] = base / out["decode"]["taylor cached"]["seconds"]
        print(f"\ntaylor cached vs transformer re-feed: {out['taylor_cached_speedup_vs_transformer_refeed']:.1f}x", flush=True)
    out["speedup"] = {}
    for ref in ("transformer cached", "transformer re-feed"):
        if ref not in out["decode"]:
            continue
        for key, row in out["decode"].items():
            if key.endswith(" cached") and not key.startswith("transformer "):
                ratio = out["decode"][ref]["seconds"] / row["seconds"]
                out["speedup"][f"{key} vs {ref}"] = ratio
                print(f"{key} vs {ref}: {ratio:.2f}x", flush=True)
    if not args.no_train:
        print("\n| decoder | train step (s), batch %d, %d frames |\n|---|---|" % (args.train_batch, args.frames), flush=True)
        feats = torch.randn(args.train_batch, 80, args.frames, device=device)
        tokens = torch.randint(0, 35, (args.train_batch, args.steps + 1), device=device)
        for name in ("transformer", "taylor"):
            torch.manual_seed(0)
            model = build_model(ModelConfig(decoder=name, width=args.width, mlp=2 * args.width, max_frames=args.frames,
                                            max_len=args.steps, feature_dim=args.feature_dim, backend=args.backend)).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

            def step():
                opt.zero_grad(set_to_none=True)
                with amp:
                    logits = model(feats, tokens[:, :-1])
                torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], label_smoothing=0.1).backward()
                opt.step()

            seconds = _time(step, device, args.repeats)
            out["train_step_seconds"][name] = seconds
            print(f"| {name} | {seconds:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
