"""Command line: ``python -m experiments.lm {train,report,generate} ...``.

    python -m experiments.lm train --attention softmax --lr 1e-3 --seed 0 --run-dir runs/lm/softmax-lr1e-3-s0
    python -m experiments.lm train --attention taylor --feature-dim 16 --run-dir runs/lm/taylor --resume
    python -m experiments.lm train --attention hybrid --window 64 --conv-size 3 --run-dir runs/lm/hybrid
    python -m experiments.lm train --text book.txt --text notes.txt --steps 500 --run-dir runs/lm/mytext
    python -m experiments.lm report runs/lm/* --out experiments/results/lm
    python -m experiments.lm generate runs/lm/hybrid --prompt "The return statement" --new 200 --temperature 0.8

The default corpus is CPython's pydoc_data.topics (see experiments/lm/data.py and experiments/README_lm.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model import ATTENTION_KINDS, POSITIONS, ModelConfig
from .train import TrainConfig


def _optional_int(text: str):
    return None if text.lower() in ("none", "0", "") else int(text)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key.replace("-", "_"), cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key.replace("-", "_"), value.lower() == "true"
    return key.replace("-", "_"), value


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one model, validate every --eval-every steps, write results.json/.md",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d, m = TrainConfig(), ModelConfig()
    p.add_argument("--run-dir", default=d.run_dir)
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="training text file(s), concatenated in order (default: CPython's pydoc_data.topics)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="the last this fraction of the bytes validates")
    g = p.add_argument_group("model")
    g.add_argument("--attention", choices=ATTENTION_KINDS, default=m.attention)
    g.add_argument("--width", type=int, default=m.width)
    g.add_argument("--layers", type=int, default=m.layers)
    g.add_argument("--heads", type=int, default=m.heads)
    g.add_argument("--mlp-ratio", type=int, default=m.mlp_ratio)
    g.add_argument("--context", type=int, default=m.context, help="training window (tokens)")
    g.add_argument("--pos", choices=POSITIONS, default=m.pos, help="learned absolute positions or none")
    g.add_argument("--tie-head", type=_bool, default=m.tie_head, help="output head tied to the byte embedding")
    g.add_argument("--qk-dim", type=_optional_int, default=m.qk_dim, help="softmax: q/k dims per head ('none' = head dim)")
    g.add_argument("--feature-dim", type=_optional_int, default=m.feature_dim,
                   help="taylor/hybrid: q/k dims per head ('none' = head dim)")
    g.add_argument("--backend", default=m.backend, help="taylor/hybrid: linattn_cuda backend")
    g = p.add_argument_group("hybrid options (passed to linattn_cuda.nn.HybridAttention)")
    g.add_argument("--window", type=int, default=64, help="keys with softmax weights (the query's own and window - 1 before)")
    g.add_argument("--conv-size", type=int, default=0, help="short causal depthwise convolution over q, k, v (0 = off)")
    g.add_argument("--learn-scale", type=_bool, default=False, help="learnable per-head temperature of the logits")
    g.add_argument("--hybrid-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other HybridAttention keyword option")
    g = p.add_argument_group("optimization")
    for name in ("steps", "batch_size", "warmup", "seed", "eval_every", "eval_batch_size", "checkpoint_every"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    g.add_argument("--eval-limit", type=_optional_int, default=d.eval_limit, help="at most this many validation windows")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=d.device, choices=("cpu", "cuda", "auto"))
    g.add_argument("--threads", type=_optional_int, default=d.threads, help="torch.set_num_threads (default: torch's)")
    g.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def _config(args) -> TrainConfig:
    hybrid = {"window": args.window, "conv_size": args.conv_size, "learn_scale": args.learn_scale}
    hybrid.update(dict(args.hybrid_option))
    model = ModelConfig(attention=args.attention, width=args.width, layers=args.layers, heads=args.heads,
                        mlp_ratio=args.mlp_ratio, context=args.context, pos=args.pos, tie_head=args.tie_head,
                        qk_dim=args.qk_dim, feature_dim=args.feature_dim, backend=args.backend, hybrid=hybrid)
    keys = set(TrainConfig.__dataclass_fields__) - {"model"}
    return TrainConfig(model=model, **{k: getattr(args, k) for k in keys if hasattr(args, k)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("report", help="tables (mean ± spread over seeds) and curve plot of several run folders")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None, help="write results.md and curves.png into this folder")
    p = sub.add_parser("generate", help="generate text from a prompt with a trained run's decoding cache")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--new", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="re-run the whole sequence per token instead")
    p.add_argument("--check", action="store_true", help="also run without the cache and report whether the bytes agree")
    args = parser.parse_args(argv)

    if args.command == "train":
        from .train import train

        train(_config(args))
    elif args.command == "report":
        from .report import combine

        print(combine([Path(r) for r in args.runs], Path(args.out) if args.out else None), end="")
    elif args.command == "generate":
        from .generate import decode, encode, generate
        from .train import load_model

        model = load_model(args.run_dir)
        kw = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        prompt = encode(args.prompt)
        tokens, info = generate(model, prompt, args.new, use_cache=args.use_cache, **kw)
        print(decode(tokens))
        if info["cache_numel"]:
            print(f"\n[cache elements: {info['cache_numel'][0]:,} after the prompt, {info['cache_numel'][-1]:,} at the end]",
                  file=sys.stderr)
        if args.check:
            other, _ = generate(model, prompt, args.new, use_cache=not args.use_cache, **kw)
            print(f"[cached and full re-run agree: {other == tokens}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
