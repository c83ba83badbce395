"""Command line: the whole learning-rate x variant sweep into one run folder.

    python -m experiments.octmnist [--data-root DIR] [--out runs/octmnist] [--resume] ...
    torchrun --nproc_per_node 2 -m experiments.octmnist ...   (see --dist-mode)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from experiments.common.errors import report_expected_failure

from . import data as data_mod
from .dist import DistContext, setup, teardown
from .model import VARIANTS, build_model, count_trainable_parameters
from .report import best_runs, markdown_tables, write_json, write_plots
from .train import RunConfig, StopRequested, train_config

EXIT_STOPPED = 3
PROG = "python -m experiments.octmnist"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG,
                                description="OCTMNIST CNN learning-rate sweep (course homework 2, Q2).")
    p.add_argument("--data-root", default=None,
                   help="folder holding octmnist.npz (default: medmnist's ~/.medmnist)")
    p.add_argument("--download", choices=data_mod.DOWNLOAD_CHOICES, default="auto",
                   help="auto: use the local file when it passes its MD5 check, else download it (resumed, retried, "
                        "checked); yes: download it again; no: never download")
    p.add_argument("--url", default=data_mod.OCTMNIST_URL, help="where to download octmnist.npz (a mirror, a file:// URL or a local path)")
    p.add_argument("--checksum", default=data_mod.OCTMNIST_MD5,
                   help="expected MD5 of octmnist.npz (default: medmnist's); 'none' skips it, for a synthetic or other local copy")
    p.add_argument("--out", default="runs/octmnist", help="run folder (results, tables, plots, checkpoints)")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dropout", type=float, default=0.7)
    p.add_argument("--limit-train", type=int, default=None, help="use the first N training images")
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", help="process-group backend under torchrun (auto: nccl/gloo)")
    p.add_argument("--dist-mode", choices=("ddp", "sweep"), default="ddp",
                   help="under torchrun: ddp = each global batch split across processes (DDP); "
                        "sweep = configurations spread over processes, each trained alone")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for each process (default on CPU: 1 -- batches of 8 are too "
                        "small to split; 2 threads ran ~17x slower per step on a busy 2-core machine)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="stop the program after checkpointing this epoch (of the first config reaching it)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv=None) -> int:
    """Run the sweep; an expected failure (missing or corrupt data, network, refused run folder, missing
    package) prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except Exception as e:
        code = report_expected_failure(e, PROG)
        if code is None:
            raise
        return code


def _main(args) -> int:
    ctx = setup(args.device, args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif ctx.device.type == "cpu":
        torch.set_num_threads(1)
    log = print if ctx.is_main else (lambda *a, **k: None)
    try:
        return _run(args, ctx, log)
    finally:
        teardown(ctx)


def _run(args, ctx: DistContext, log) -> int:
    out = args.out
    ckpt_dir = os.path.join(out, "checkpoints")
    if ctx.is_main:
        existing = os.path.isdir(ckpt_dir) and any(f.endswith(".ckpt") for f in os.listdir(ckpt_dir))
        if existing and not args.resume:
            print(f"{PROG}: error: {ckpt_dir} already holds checkpoints; pass --resume or choose another --out",
                  file=sys.stderr, flush=True)
            code = 2
        else:
            code = 0
            os.makedirs(ckpt_dir, exist_ok=True)
    else:
        code = 0
    code = max(ctx.all_gather_object(code))
    if code:
        return code

    t0 = time.perf_counter()
    limits = {"train": args.limit_train, "val": args.limit_val, "test": args.limit_test}
    md5 = None if args.checksum.lower() == "none" else args.checksum
    d = data_mod.load_octmnist(args.data_root, args.download, limits, url=args.url, md5=md5, progress=not args.no_progress)
    log(f"OCTMNIST: {len(d['train'])} train / {len(d['val'])} val / {len(d['test'])} test images "
        f"(device {ctx.device}, {ctx.world_size} process(es){', ' + args.dist_mode if ctx.enabled else ''})")
    params = {}
    for v in args.variants:
        params[v] = count_trainable_parameters(build_model(v, args.dropout))
        log(f"{v}: {params[v]:,} trainable parameters")

    configs = [RunConfig(v, lr, args.epochs, args.batch_size, args.seed, args.dropout,
                         len(d["train"]), len(d["val"]), len(d["test"]))
               for v in args.variants for lr in args.lrs]
    single = DistContext(device=ctx.device)  # a process training a configuration alone
    runs, stopped = [], None
    try:
        for i, cfg in enumerate(configs):
            ckpt = os.path.join(ckpt_dir, f"{cfg.name}.ckpt")
            common = dict(resume=args.resume, stop_after_epoch=args.stop_after_epoch,
                          progress=not args.no_progress)
            if ctx.enabled and args.dist_mode == "sweep":
                if i % ctx.world_size != ctx.rank:
                    continue
                runs.append(train_config(cfg, d, single, ckpt, log=print, writer=True, **common))
            else:
                runs.append(train_config(cfg, d, ctx, ckpt, log=log, **common))
    except StopRequested as e:
        stopped = str(e)
    if ctx.enabled and args.dist_mode == "sweep":
        gathered = ctx.all_gather_object((runs, stopped))
        runs = [r for rs, _ in gathered for r in rs]
        stopped = next((s for _, s in gathered if s), None)
    if stopped:
        log(stopped)
        return EXIT_STOPPED

    order = {c.name: i for i, c in enumerate(configs)}
    runs.sort(key=lambda r: order[r["name"]])
    if ctx.is_main:
        best = best_runs(runs)
        payload = {
            "experiment": "octmnist_cnn (course homework 2, Q2)",
            "settings": {k: v for k, v in vars(args).items() if k not in ("resume", "stop_after_epoch")},
            "environment": {"torch": torch.__version__, "device": str(ctx.device),
                            "world_size": ctx.world_size,
                            "dist_mode": args.dist_mode if ctx.enabled else "single"},
            "data": {s: len(d[s]) for s in data_mod.SPLITS},
            "trainable_parameters": params,
            "best": {k: b["name"] for k, b in best.items()},
            "runs": runs,
            "wall_seconds": time.perf_counter() - t0,
        }
        write_json(os.path.join(out, "results.json"), payload)
        table = markdown_tables(runs)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write("# OCTMNIST CNN: learning-rate sweep\n\n" + table)
        if not args.no_plots:
            write_plots(runs, os.path.join(out, "plots"))
        log("\n" + table)
        log(f"wrote {out}/results.json, results.md" + ("" if args.no_plots else ", plots/"))
    ctx.barrier()
    return 0
