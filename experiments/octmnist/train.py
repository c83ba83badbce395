"""Training of one configuration (variant x lr): SGD, per-epoch validation, checkpoints and resume.

Determinism: every configuration starts from ``torch.manual_seed(seed)`` (model init, as the course's
``configure_seed``).  The shuffling uses its own ``torch.Generator`` seeded with ``seed`` and consumes it
exactly like ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` does, so the
batch order is the course's.  Dropout masks for the whole global batch come from a second CPU generator
(seed + 1), so they do not depend on the device or on the number of processes.  Both generator states
and the global RNG states are saved with every checkpoint.

Several processes (``ctx.world_size = W > 1``, mode "ddp"): every rank draws the same permutation and
the same masks; each global batch of ``batch_size`` images is cut into W contiguous shares, rank r
computes ``W * sum(NLL of its share) / len(global batch)`` and DDP averages the gradients, which gives
exactly the gradient of the global batch mean (uneven shares and a short last batch included).
Only the order of floating-point additions differs from a single-process run.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split, course_test_subset, to_inputs
from .dist import DistContext, local_slice
from .model import HIDDEN, build_model, count_trainable_parameters

CKPT_VERSION = 1


@dataclass
class RunConfig:
    variant: str
    lr: float
    epochs: int = 15
    batch_size: int = 8
    seed: int = 42
    dropout: float = 0.7
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0

    @property
    def name(self) -> str:
        return f"{self.variant}_lr{self.lr:g}"

    def identity(self) -> dict:
        """Everything that must match for a checkpoint to be resumed (epochs may grow)."""
        d = asdict(self)
        d.pop("epochs")
        return d


class StopRequested(Exception):
    """Raised after the checkpoint of epoch ``--stop-after-epoch`` (used to simulate a kill)."""


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch of ``DataLoader(shuffle=True, generator=g)`` (single-process loading): creating the
    iterator draws an int64 base seed from ``g``; ``RandomSampler`` then draws ``randperm(n)`` and a
    second, discarded ``randperm(n)`` (its ``[:num_samples % n]`` tail).  Same order, same generator state."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return order


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: str, payload: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@torch.no_grad()
def predict(model, images_u8: torch.Tensor, device, batch: int = 2048) -> torch.Tensor:
    """Predicted class per image (CPU int64 tensor), model in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images_u8.shape[0], batch):
        x = to_inputs(images_u8[i:i + batch].to(device))
        out.append(model(x).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).sum().item()) / max(int(labels.numel()), 1)


def train_config(cfg: RunConfig, data: dict[str, Split], ctx: DistContext, ckpt_path: str | None,
                 resume: bool = False, stop_after_epoch: int | None = None, progress: bool = True,
                 log=print, writer: bool | None = None) -> dict:
    """Train one configuration and return its result dict (history, test accuracies, timings).

    ``writer``: whether this process writes the checkpoint (default: rank 0).  With ``ctx.world_size``
    > 1 the batches are split across ranks (DDP); pass a single-process ``ctx`` to train alone.
    """
    from tqdm.auto import tqdm

    writer = ctx.is_main if writer is None else writer
    device, W, rank = ctx.device, ctx.world_size, ctx.rank
    train, val, test = data["train"], data["val"], data["test"]

    seed_everything(cfg.seed)
    model = build_model(cfg.variant, cfg.dropout).to(device)
    n_params = count_trainable_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.0, weight_decay=0.0)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    dropout_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict] = []
    epoch_seconds: list[float] = []
    start_epoch = 0

    if resume and ckpt_path and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        if ck.get("identity") != cfg.identity():
            raise RuntimeError(f"checkpoint {ckpt_path} was made with other settings:\n"
                               f"  {ck.get('identity')}\n  now {cfg.identity()}")
        if ck["epoch"] > cfg.epochs:
            raise RuntimeError(f"checkpoint {ckpt_path} is at epoch {ck['epoch']} > --epochs {cfg.epochs}")
        if ck.get("result") is not None and ck["epoch"] == cfg.epochs:
            log(f"[{cfg.name}] already finished ({ck['epoch']} epochs), taken from {ckpt_path}")
            return ck["result"]
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        shuffle_gen.set_state(ck["shuffle_rng"])
        dropout_gen.set_state(ck["dropout_rng"])
        _set_rng_state(ck["rng"])
        history, epoch_seconds, start_epoch = ck["history"], ck["epoch_seconds"], ck["epoch"]
        log(f"[{cfg.name}] resumed after epoch {start_epoch} from {ckpt_path}")

    ddp_model = model
    if W > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_x, train_y = train.images.to(device), train.labels.to(device)
    n, B = len(train), cfg.batch_size
    n_batches = math.ceil(n / B)
    keep_scale = 1.0 / (1.0 - cfg.dropout) if cfg.dropout < 1 else 0.0

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = epoch_order(n, shuffle_gen).to(device)
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # sum of global batch means
        bar = tqdm(range(n_batches), desc=f"{cfg.name} epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not (progress and ctx.is_main), mininterval=1.0, dynamic_ncols=True)
        for b in bar:
            idx = order[b * B:(b + 1) * B]
            bl = int(idx.numel())
            mask = (torch.rand(bl, HIDDEN, generator=dropout_gen) >= cfg.dropout).to(torch.float32)
            lo, hi = local_slice(bl, W, rank)
            mine = idx[lo:hi]
            x = to_inputs(train_x[mine])
            y = train_y[mine]
            out = ddp_model(x, dropout_mask=mask[lo:hi].mul_(keep_scale).to(device, non_blocking=True))
            loss_sum = F.nll_loss(out, y, reduction="sum")
            loss = loss_sum / bl
            if W > 1:
                loss = loss * W  # DDP divides the summed gradients by W
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_acc += loss_sum.detach().double() / bl
            if progress and ctx.is_main and b % 500 == 499:
                bar.set_postfix(loss=f"{loss_acc.item() / (b + 1):.4f}", refresh=False)
        bar.close()
        ctx.all_reduce_sum(loss_acc)
        batch_loss_sum = float(loss_acc.item())
        val_acc = accuracy(predict(model, val.images, device), val.labels)
        prev_sum = sum(h["batch_loss_sum"] for h in history)
        prev_batches = sum(h["n_batches"] for h in history)
        history.append({
            "epoch": epoch,
            "n_batches": n_batches,
            "batch_loss_sum": batch_loss_sum,
            "train_loss": batch_loss_sum / n_batches,
            "train_loss_cumulative": (prev_sum + batch_loss_sum) / (prev_batches + n_batches),
            "val_acc": val_acc,
        })
        epoch_seconds.append(time.perf_counter() - t0)
        h = history[-1]
        log(f"[{cfg.name}] epoch {epoch}/{cfg.epochs}  train loss {h['train_loss']:.4f}  "
            f"(course cumulative {h['train_loss_cumulative']:.4f})  val acc {val_acc:.4f}  "
            f"{epoch_seconds[-1]:.1f}s")

        result = None
        if epoch == cfg.epochs:
            pred = predict(model, test.images, device)
            sub = torch.from_numpy(course_test_subset(test.labels.numpy()))
            counts = [int((test.labels[sub] == c).sum()) for c in range(4)]
            result = {
                "name": cfg.name, "variant": cfg.variant, "lr": cfg.lr, "config": asdict(cfg),
                "trainable_parameters": n_params, "history": history,
                "final": dict(history[-1]),
                "test_acc": accuracy(pred, test.labels),
                "test_acc_course529": accuracy(pred[sub], test.labels[sub]),
                "course_subset_size": int(sub.numel()), "course_subset_counts": counts,
                "epoch_seconds": epoch_seconds, "train_seconds": sum(epoch_seconds),
            }
            log(f"[{cfg.name}] test acc {result['test_acc']:.4f} (full, {len(test)})  "
                f"{result['test_acc_course529']:.4f} (course subset, {result['course_subset_size']})")
        if writer and ckpt_path:
            save_checkpoint(ckpt_path, {
                "version": CKPT_VERSION, "identity": cfg.identity(), "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "shuffle_rng": shuffle_gen.get_state(), "dropout_rng": dropout_gen.get_state(),
                "rng": _rng_state(), "history": history, "epoch_seconds": epoch_seconds,
                "result": result,
            })
        if result is not None:
            return result
        if stop_after_epoch is not None and epoch == stop_after_epoch:
            ctx.barrier()
            raise StopRequested(f"[{cfg.name}] stopped after epoch {epoch} as asked; rerun with --resume")
    raise AssertionError("unreachable")
