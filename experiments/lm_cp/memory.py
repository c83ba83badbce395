"""Peak memory of one training step per process, one process against the sequence sharded over several.

Each measurement runs in fresh processes (:func:`linattn_cuda.distributed.launch.run_ranks`, gloo, one thread
each): build experiments.lm's model, take one warm-up step at a short context (library initialization and the
optimizer's state are not counted), reset the peak resident memory (``/proc/self/clear_refs``), then one training
step -- forward, backward, gradient all-reduce, AdamW step -- on a batch of random bytes at the given context.
Reported: the step's peak resident memory above what the process held just before it (VmHWM - RSS), per rank
(the largest), in MiB. One process runs experiments.lm's plain ``LanguageModel.forward``; several run the sharded
forward of :mod:`.train`.
"""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist

from experiments.lm.model import LanguageModel
from experiments.lm.train import TrainConfig, _optimizer
from linattn_cuda.distributed import enable_context_parallel, shard_bounds
from linattn_cuda.distributed.launch import run_ranks

from .train import _all_reduce_grads, _shard_loss

__all__ = ["measure_step_memory"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _step(model, optimizer, batch, start, end, sharded: bool) -> None:
    count = batch[:, 1:].numel()
    optimizer.zero_grad(set_to_none=True)
    if sharded:
        (_shard_loss(model, batch, start, end) / count).backward()
        _all_reduce_grads(model)
    else:
        logits = model(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()
    optimizer.step()


def _measure(rank: int, world: int, cfg_dict: dict, context: int) -> dict:
    cfg = TrainConfig.from_dict(cfg_dict)
    cfg.model.context = context
    torch.manual_seed(cfg.seed)
    model = LanguageModel(cfg.model)
    sharded = world > 1
    if sharded:
        enable_context_parallel(model)
    optimizer = _optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    warm = torch.randint(0, 256, (cfg.batch_size, 65), generator=g)
    _step(model, optimizer, warm, *shard_bounds(64, world, rank), sharded)
    batch = torch.randint(0, 256, (cfg.batch_size, context + 1), generator=g)
    start, end = shard_bounds(context, world, rank)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts again from the current resident memory
    except OSError:
        pass
    before = _rss_mib()
    _step(model, optimizer, batch, start, end, sharded)
    extra = _hwm_mib() - before
    if sharded:
        dist.barrier()
    return {"rank": rank, "step_peak_mib": round(extra, 1), "before_mib": round(before, 1)}


def measure_step_memory(cfg: TrainConfig, context: int, world_size: int) -> dict:
    """The largest per-process step peak over the ranks (MiB), and every rank's."""
    ranks = run_ranks(_measure, world_size, cfg.as_dict(), context, timeout=1800, collective_timeout=600)
    return {"context": context, "ranks": world_size, "tokens_per_rank": -(-context // world_size),
            "step_peak_mib": max(r["step_peak_mib"] for r in ranks), "per_rank": ranks}
