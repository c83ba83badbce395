"""Training with every sequence sharded across the ranks of the default process group.

The model, data, optimizer and schedule are experiments.lm's (imported, not copied): the same seed builds the
same model on every rank and every rank draws the same batch; rank r takes positions ``[start_r, end_r)`` of each
window (:func:`linattn_cuda.distributed.shard_bounds`), its attention layers run context-parallel
(:func:`linattn_cuda.distributed.enable_context_parallel`), its learned positions are the table's rows
``[start_r, end_r)``, and its loss is the sum of its predictions' cross-entropies over the number of predictions of
the whole batch. The gradients are summed over ranks (one all-reduce of all of them, as data parallelism does),
so every rank takes the step one process would take. Nothing else differs from ``python -m experiments.lm train``.

Outputs (rank 0) in ``run_dir``: ``config.json`` and ``results.json`` (config, world size and shard bounds,
``train_loss`` of every step, the validation curve, ms/step, each rank's peak resident memory, machine).
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from experiments.common.runs import cpu_model
from experiments.lm.data import load_corpus, train_batch, validation_windows
from experiments.lm.model import LanguageModel, count_parameters
from experiments.lm.train import TrainConfig, _optimizer, lr_at
from linattn_cuda.distributed import enable_context_parallel, shard_bounds

__all__ = ["forward_shard", "train_cp", "peak_rss_mib"]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def forward_shard(model: LanguageModel, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """``LanguageModel.forward`` for the shard ``tokens [B, L_r]`` that starts at position ``start``."""
    x = model._embed(tokens, start)
    for block in model.blocks:
        x = block(x)
    return model.head(model.ln(x))


def _shard_loss(model, windows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Sum of the cross-entropies of this rank's predictions of ``windows [B, T + 1]`` (positions start..end-1)."""
    logits = forward_shard(model, windows[:, start:end], start)
    target = windows[:, start + 1 : end + 1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")


def _all_reduce_grads(model) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def evaluate_cp(model, windows: torch.Tensor, batch_size: int, start: int, end: int) -> dict:
    """experiments.lm.train.evaluate over sharded windows (every rank its positions; sums all-reduced)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size]
        total += _shard_loss(model, batch, start, end).double()
        count += batch[:, 1:].numel()
    dist.all_reduce(total)
    model.train(was_training)
    loss = total.item() / max(count, 1)
    return {"loss": loss, "bits_per_char": loss / math.log(2), "predictions": count}


def train_cp(cfg: TrainConfig) -> dict | None:
    """One context-parallel run (every rank calls it); returns the results dict on rank 0."""
    if cfg.model.attention not in ("taylor", "hybrid"):
        raise ValueError(f"context parallelism covers the taylor and hybrid attention kinds, got {cfg.model.attention!r}")
    if cfg.device != "cpu":
        raise ValueError("this experiment runs on CPU processes (gloo); pass --device cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(cfg.threads or 1)
    context = cfg.model.context
    start, end = shard_bounds(context, world, rank)
    corpus = load_corpus(cfg.text, val_fraction=cfg.val_fraction)
    val = validation_windows(corpus.validation, context, cfg.eval_limit)

    torch.manual_seed(cfg.seed)
    model = LanguageModel(cfg.model)
    enable_context_parallel(model)
    optimizer = _optimizer(model, cfg)
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**cfg.as_dict(), "world_size": world}, indent=2))
        print(f"context parallel over {world} ranks: attention={cfg.model.attention} context={context} "
              f"batch={cfg.batch_size} steps={cfg.steps} threads/rank={torch.get_num_threads()}", flush=True)
    history = {"train_loss": [], "lr": [], "validation": [], "train_seconds": 0.0}
    count = cfg.batch_size * context
    model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_batch(corpus.train, step=step, seed=cfg.seed, batch_size=cfg.batch_size, context=context)
        loss_sum = _shard_loss(model, batch, start, end)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / count).backward()
        _all_reduce_grads(model)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        total = loss_sum.detach().double()
        dist.all_reduce(total)
        value = total.item() / count
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step + 1}")
        history["train_loss"].append(value)
        history["lr"].append(lr)
        history["train_seconds"] += time.perf_counter() - t0
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            result = evaluate_cp(model, val, cfg.eval_batch_size, start, end)
            history["validation"].append({"step": done, "loss": result["loss"], "bits_per_char": result["bits_per_char"]})
            if rank == 0:
                print(f"step {done}/{cfg.steps}: train loss {value:.4f} | val {result['bits_per_char']:.4f} bits/char "
                      f"| {history['train_seconds']:.0f}s", flush=True)
    peaks = [None] * world
    dist.all_gather_object(peaks, round(peak_rss_mib(), 1))
    if rank != 0:
        return None
    final = history["validation"][-1]
    results = {
        "config": cfg.as_dict(),
        "world_size": world,
        "shards": [list(shard_bounds(context, world, r)) for r in range(world)],
        "parameters": count_parameters(model),
        "val_loss": final["loss"],
        "val_bits_per_char": final["bits_per_char"],
        "train_loss": history["train_loss"],
        "lr": history["lr"],
        "validation": history["validation"],
        "train_seconds": history["train_seconds"],
        "ms_per_step": 1000.0 * history["train_seconds"] / max(len(history["train_loss"]), 1),
        "peak_rss_mib_per_rank": peaks,
        "machine": {"cpu": cpu_model(), "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "backend": dist.get_backend()},
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"done: val {final['bits_per_char']:.4f} bits/char, {results['ms_per_step']:.0f} ms/step, peak RSS per rank "
          f"{peaks} MiB -> {run_dir}", flush=True)
    return results
