"""Command line: ``python -m experiments.lm_cp {train,compare,memory} ...``.

    torchrun --standalone --nproc_per_node 2 -m experiments.lm_cp train --attention taylor --steps 150 \\
        --run-dir runs/lm_cp/cp2-taylor            # the flags of `python -m experiments.lm train`
    python -m experiments.lm_cp compare runs/lm_cp/cp2-taylor runs/lm_cp/single-taylor --out experiments/results/lm_cp
    python -m experiments.lm_cp memory --attention taylor --contexts 8192,16384,32768 --ranks 1,2 --batch-size 1

``train`` without torchrun runs one process (a group of one). See experiments/README_lm_cp.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from experiments.lm.__main__ import _config, _train_parser


def _init_group() -> None:
    import torch.distributed as dist

    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        return
    import tempfile

    store = Path(tempfile.mkdtemp(prefix="lm_cp-")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def _compare(cp_dir: Path, single_dir: Path, out: Path | None) -> str:
    cp = json.loads((cp_dir / "results.json").read_text())
    one = json.loads((single_dir / "results.json").read_text())
    a, b = cp["train_loss"], one["train_loss"]
    if len(a) != len(b):
        raise SystemExit(f"the runs have {len(a)} and {len(b)} steps")
    diffs = [abs(x - y) for x, y in zip(a, b)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    rel = max(d / abs(y) for d, y in zip(diffs, b))
    val = [(v["step"], v["bits_per_char"], w["bits_per_char"]) for v, w in zip(cp["validation"], one["validation"])]
    lines = [
        f"# {cp['config']['model']['attention']}: {cp['world_size']} processes (sequence sharded) vs one process",
        "",
        f"Machine: {cp['machine']['cpu']}, {cp['machine']['threads_per_rank']} thread(s) per process, torch "
        f"{cp['machine']['torch']}, gloo. Runs: `{cp_dir}` (shards {cp['shards']}) and `{single_dir}` "
        "(`python -m experiments.lm train`, same flags).",
        "",
        "| | sharded | one process |",
        "|---|---|---|",
        f"| steps | {len(a)} | {len(b)} |",
        f"| train loss, step 1 | {a[0]:.6f} | {b[0]:.6f} |",
        f"| train loss, last step | {a[-1]:.6f} | {b[-1]:.6f} |",
        f"| final validation bits/char | {cp['val_bits_per_char']:.6f} | {one['val_bits_per_char']:.6f} |",
        f"| ms per step | {cp['ms_per_step']:.0f} | {one['ms_per_step']:.0f} |",
        f"| peak resident memory per process (MiB, whole run) | {cp['peak_rss_mib_per_rank']} | - |",
        "",
        f"Largest train-loss difference over the {len(a)} steps: {diffs[worst]:.2e} (step {worst + 1}); largest "
        f"relative: {rel:.2e}. Validation bits/char (step: sharded / one process): "
        + ", ".join(f"{s}: {x:.6f} / {y:.6f}" for s, x, y in val) + ".",
        "",
    ]
    text = "\n".join(lines)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        name = f"loss_{cp['config']['model']['attention']}_{cp['world_size']}ranks"
        (out / f"{name}.md").write_text(text)
        (out / f"{name}.json").write_text(json.dumps({"max_abs_diff": diffs[worst], "max_rel_diff": rel,
                                                      "step": worst + 1, "diffs": diffs, "validation": val}, indent=1))
    return text


def _memory(args) -> str:
    from experiments.lm.train import TrainConfig
    from experiments.lm.model import ModelConfig

    from .memory import measure_step_memory

    hybrid = {"window": args.window, "conv_size": args.conv_size}
    cfg = TrainConfig(model=ModelConfig(attention=args.attention, hybrid=hybrid), batch_size=args.batch_size,
                      threads=1)
    rows = []
    for context in args.contexts:
        for ranks in args.ranks:
            r = measure_step_memory(cfg, context, ranks)
            rows.append(r)
            print(f"context {context:>6} on {ranks} process(es): step peak {r['step_peak_mib']:.0f} MiB per process",
                  flush=True)
    from experiments.common.runs import cpu_model

    lines = [f"# Peak memory of one training step per process ({args.attention}, batch {args.batch_size})", "",
             f"Machine: {cpu_model()}, one thread per process, gloo. The step's peak resident memory above what the "
             "process held before it (model, optimizer state and libraries excluded), the largest over the ranks.",
             "", "| context | processes | tokens per process | step peak per process (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['ranks']} | {r['tokens_per_rank']} | {r['step_peak_mib']:.0f} |" for r in rows]
    if args.budget_mib:
        lines.append("")
        for ranks in args.ranks:
            fits = [r["context"] for r in rows if r["ranks"] == ranks and r["step_peak_mib"] <= args.budget_mib]
            lines.append(f"* Budget {args.budget_mib} MiB per process, {ranks} process(es): longest context measured "
                         f"that fits: {max(fits) if fits else 'none'}.")
    text = "\n".join(lines) + "\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"memory_{args.attention}.md").write_text(text)
        (out / f"memory_{args.attention}.json").write_text(json.dumps(rows, indent=1))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.lm_cp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("compare", help="train-loss curves of a sharded run and a one-process run, side by side")
    p.add_argument("cp_run")
    p.add_argument("single_run")
    p.add_argument("--out", default=None)
    p = sub.add_parser("memory", help="peak memory of one training step per process over context and process count")
    p.add_argument("--attention", default="taylor", choices=("taylor", "hybrid"))
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192, 16384])
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--conv-size", type=int, default=0)
    p.add_argument("--budget-mib", type=int, default=None, help="report the longest context within this budget")
    p.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command == "train":
        import torch.distributed as dist

        from .train import train_cp

        _init_group()
        try:
            train_cp(_config(args))
        finally:
            dist.destroy_process_group()
    elif args.command == "compare":
        print(_compare(Path(args.cp_run), Path(args.single_run), Path(args.out) if args.out else None), end="")
    else:
        print(_memory(args), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
