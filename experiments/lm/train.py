"""Training: AdamW on random windows of the training bytes, validation on the fixed windows, resumable.

* AdamW (betas 0.9/0.95, weight decay ``weight_decay`` on matrices and embeddings only, none on biases,
  LayerNorms and other 0/1-d parameters), gradient norm clipped to ``grad_clip`` (1.0).
* LR per step: linear warm-up from 0 over ``warmup`` steps, then a cosine from ``lr`` down to
  ``min_lr_ratio * lr`` at the last step (:func:`lr_at`). The same schedule for every attention kind.
* Loss: cross-entropy over every position of every window (input ``w[:, :-1]``, target ``w[:, 1:]``).
  bits/char = mean NLL (nats) / ln 2, over every prediction of the fixed validation windows (:mod:`.data`).
* Validation every ``eval_every`` steps and after the last step, always on the whole validation set
  (``eval_limit`` windows at most, for quick runs).
* A checkpoint (model, optimizer, step, history, RNG state) every ``checkpoint_every`` steps and at the end,
  written atomically (temp file + ``os.replace``). ``resume=True`` continues from it and ends bit-identical to
  an uninterrupted run: the batch of step ``t`` depends only on ``(seed, t)`` and nothing else is random.
* Outputs in ``run_dir``: ``config.json``, ``checkpoint.pt``, ``results.json`` (config, corpus, parameter
  counts, ``train_loss`` of every step, the ``validation`` curve, ``val_bits_per_char``, timing, machine) and
  ``results.md`` (:mod:`.report`).
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from experiments.common.runs import atomic_save, cpu_model
from .data import load_corpus, train_batch, validation_windows
from .model import LanguageModel, ModelConfig, count_parameters

__all__ = ["TrainConfig", "lr_at", "evaluate", "train", "load_model", "cpu_model"]

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
# settings that must match the checkpoint to resume (the rest only changes how a run is executed)
_RESUME_KEYS = ("model", "text", "val_fraction", "steps", "batch_size", "lr", "min_lr_ratio", "warmup",
                "weight_decay", "grad_clip", "seed", "eval_every", "eval_limit")


@dataclass
class TrainConfig:
    run_dir: str = "runs/lm/run"
    text: List[str] = field(default_factory=list)  # empty: pydoc_data.topics (see .data)
    val_fraction: float = 0.1
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_batch_size: int = 32
    eval_limit: Optional[int] = None        # at most this many validation windows (None: all)
    checkpoint_every: int = 500
    device: str = "cpu"                     # cpu | cuda | auto
    threads: Optional[int] = None           # torch.set_num_threads (None: torch's default)
    resume: bool = False
    progress: bool = True
    stop_after: Optional[int] = None        # testing aid: return right after the checkpoint of this step

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig(**d.get("model", {}))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR of 0-based ``step``: linear warm-up to ``lr`` over ``warmup`` steps, cosine to ``min_lr_ratio * lr`` at the end."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - 1 - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))



def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _loss(model, windows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device) -> dict:
    """Mean NLL (nats) and bits/char over every prediction of ``windows [W, context + 1]``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i:i + batch_size].to(device)
        total += _loss(model, batch, "sum").double().item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "bits_per_char": loss / math.log(2), "predictions": count}



def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_model(run_dir, device="cpu") -> LanguageModel:
    """The model of a run's checkpoint (for generation), in eval mode."""
    ckpt = torch.load(Path(run_dir) / CHECKPOINT, map_location=device, weights_only=False)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = LanguageModel(cfg.model).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def train(cfg: TrainConfig) -> Optional[dict]:
    """Run (or resume) one training run; returns the results dict (None when stopped by ``stop_after``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    corpus = load_corpus(cfg.text, val_fraction=cfg.val_fraction)
    val = validation_windows(corpus.validation, cfg.model.context, cfg.eval_limit)

    torch.manual_seed(cfg.seed)
    model = LanguageModel(cfg.model).to(device)
    optimizer = _optimizer(model, cfg)
    history = {"train_loss": [], "lr": [], "validation": [], "train_seconds": 0.0}
    start = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = TrainConfig.from_dict(ckpt["config"])
        for key in _RESUME_KEYS:
            if getattr(saved, key) != getattr(cfg, key):
                raise ValueError(f"--resume: {key} differs from the checkpoint ({getattr(saved, key)} vs {getattr(cfg, key)})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history, start = ckpt["history"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed from {ckpt_path} at step {start}", flush=True)
    params = count_parameters(model)
    (run_dir / "config.json").write_text(json.dumps(cfg.as_dict(), indent=2))
    print(f"attention={cfg.model.attention} params={params['total']:,} (attention {params['attention']:,}) lr={cfg.lr} "
          f"seed={cfg.seed} context={cfg.model.context} batch={cfg.batch_size} steps={cfg.steps} threads={torch.get_num_threads()} "
          f"corpus={corpus.source} train/val bytes={corpus.train.numel():,}/{corpus.validation.numel():,} "
          f"val windows={val.shape[0]}", flush=True)

    def checkpoint(step: int) -> None:
        atomic_save({"config": cfg.as_dict(), "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "history": history, "rng": torch.get_rng_state()}, ckpt_path)

    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, dynamic_ncols=True,
               desc=f"{cfg.model.attention} lr={cfg.lr:g} seed={cfg.seed}")
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_batch(corpus.train, step=step, seed=cfg.seed, batch_size=cfg.batch_size, context=cfg.model.context).to(device)
        loss = _loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step + 1}")
        history["train_loss"].append(value)
        history["lr"].append(lr)
        history["train_seconds"] += time.perf_counter() - t0
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            result = evaluate(model, val, cfg.eval_batch_size, device)
            history["validation"].append({"step": done, "loss": result["loss"], "bits_per_char": result["bits_per_char"]})
            bar.set_postfix(loss=f"{value:.3f}", val_bpc=f"{result['bits_per_char']:.3f}")
            line = (f"step {done}/{cfg.steps}: train loss {value:.4f} | val {result['bits_per_char']:.4f} bits/char "
                    f"| {history['train_seconds']:.0f}s")
            bar.write(line) if cfg.progress else print(line, flush=True)
        elif cfg.progress:
            bar.set_postfix(loss=f"{value:.3f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint(done)
        if cfg.stop_after is not None and done == cfg.stop_after:
            bar.close()
            return None
    bar.close()

    final = history["validation"][-1]  # the evaluation after the last step (also when resuming a finished run)
    final = {**final, "predictions": int(val[:, 1:].numel())}
    results = {
        "config": cfg.as_dict(),
        "corpus": {**corpus.describe(), "validation_windows": int(val.shape[0]), "validation_predictions": final["predictions"]},
        "parameters": params,
        "val_loss": final["loss"],
        "val_bits_per_char": final["bits_per_char"],
        "train_loss": history["train_loss"],
        "lr": history["lr"],
        "validation": history["validation"],
        "train_seconds": history["train_seconds"],
        "ms_per_step": 1000.0 * history["train_seconds"] / max(len(history["train_loss"]), 1),
        "machine": {"cpu": cpu_model(), "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    from .report import write_run

    write_run(run_dir, results)
    print(f"done: val {final['bits_per_char']:.4f} bits/char, {results['ms_per_step']:.0f} ms/step -> {run_dir}", flush=True)
    return results
