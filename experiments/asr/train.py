"""Training, validation every epoch and a final test (SPEC section 3), resumable and distributed.

* AdamW (lr 1e-3, weight decay 0.01), batch 64 (eval 16), teacher forcing (input ``tokens[:, :-1]``, target
  ``tokens[:, 1:]``), cross-entropy with label smoothing 0.1 over all positions (padding included).
* LR per epoch: linear warm-up from 1% over 2 epochs, then linear decay to 1% over 12 (the course's
  ``SequentialLR(LinearLR(0.01 -> 1, 2), LinearLR(1 -> 0.01, 12))`` stepped per epoch; :func:`lr_factor`).
* Validation every epoch and test at the end: teacher-forced loss and the greedy-decoding similarities
  (:mod:`.metrics`); greedy decoding uses the decoder's cache.
* Padding (``mask_padding``): ``on`` gives the model each clip's valid frame count, so the encoder
  self-attention, the decoder cross-attention and the decoding caches ignore the padded frames; ``off`` is
  the course (nothing masked); ``auto`` (default) masks whenever a Taylor or hybrid attention is involved
  (a padded key keeps Taylor weight >= 1/2, SPEC section 4) and keeps the course's softmax rows unmasked.
  The resolved choice is ``masked`` in ``config.json`` and the results table.
* A checkpoint (model, optimizer, history, RNG states) after every epoch, written atomically;
  ``resume=True`` continues from it and ends bit-identical to an uninterrupted run (the data order of
  epoch ``e`` depends only on ``seed`` and ``e``).
* CPU or GPU (bf16 autocast on GPU); ``torchrun`` starts DistributedDataParallel (gloo on CPU, nccl on
  GPU). The global batch stays ``batch_size`` (each of ``W`` processes takes ``batch_size / W``).

Reported loss values: train = mean of the epoch's batch losses; validation/test = mean over samples of the
per-sample mean token loss (equal to the course's mean of batch means whenever batches are equal-sized).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .data import LJSPEECH_CLIPS, LJSPEECH_SHA256, LJSPEECH_URL, ASRDataset, FeatureStore, collate, prepare_ljspeech, read_metadata, split_ranges
from experiments.common.errors import ExperimentError
from experiments.common.runs import atomic_save, cpu_model

from .decode import greedy_decode
from .features import FrontEndConfig
from .metrics import METRICS, cut_pair, sum_similarities
from .models import ModelConfig, build_model
from .tokenizer import Tokenizer

__all__ = ["TrainConfig", "MASK_PADDING", "resolve_mask_padding", "lr_factor", "train"]

CHECKPOINT = "checkpoint.pt"
# What a run writes into its folder (removed by --overwrite; anything else there is left alone).
RUN_OUTPUTS = (CHECKPOINT, CHECKPOINT + ".tmp", "config.json", "results.json", "results.md", "examples.md", "predictions.tsv", "plots")
# Settings that may differ on --resume: where data and outputs live, how the run is shown, how long it goes on
# (the LR schedule does not depend on epochs). Every other TrainConfig / ModelConfig field must match.
RESUME_MAY_DIFFER = frozenset({"run_dir", "resume", "overwrite", "progress", "epochs", "num_workers", "examples",
                               "crash_after_epoch", "download", "cache_dir"})
# Command-line spellings of fields whose flag is not "--" + the field name with dashes.
_FLAGS = {"sha256": "--checksum", "filterbank_rate": "--mel-rate", "amp": "--no-amp", "download": "--no-download",
          "progress": "--no-progress", "masked": "--mask-padding", "model.max_frames": "--max-frames",
          "model.max_len": "--max-chars", "model.softmax_feature_dim": "--feature-dim"}


@dataclass
class TrainConfig:
    run_dir: str = "runs/asr"
    # data
    data_dir: str = "data"                 # LJ Speech is downloaded and extracted below this folder
    corpus_dir: Optional[str] = None       # use this folder in LJ Speech layout instead (e.g. a synthetic corpus)
    download: bool = True
    url: str = LJSPEECH_URL
    sha256: Optional[str] = LJSPEECH_SHA256
    cache_dir: Optional[str] = None        # feature cache (default <corpus>/features)
    filterbank_rate: Optional[int] = 16000  # the course's quirk; None = the audio's own rate
    max_frames: int = 2754
    max_chars: int = 97
    limit_train: Optional[int] = None      # use only the first N clips of a split (quick runs)
    limit_eval: Optional[int] = None
    # model
    model: ModelConfig = field(default_factory=ModelConfig)
    # optimization
    epochs: int = 15
    batch_size: int = 64
    eval_batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    warmup_epochs: int = 2
    decay_epochs: int = 12
    lr_floor: float = 0.01
    seed: int = 42
    # execution
    device: str = "auto"                   # auto | cpu | cuda
    amp: bool = True                       # bf16 autocast on CUDA (ignored on CPU)
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False                # replace the outputs of a finished or interrupted run in run_dir
    progress: bool = True
    examples: int = 10
    # padding: "auto" masks the padded encoder frames (encoder self-attention, decoder cross-attention, decoding
    # caches) whenever a Taylor attention is involved and keeps the course's unmasked softmax otherwise
    mask_padding: str = "auto"             # auto | on | off
    masked: Optional[bool] = None          # the resolved choice (set by train(); recorded in config.json and the table)
    crash_after_epoch: Optional[int] = None  # testing aid: SIGKILL this process right after that epoch's checkpoint

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig(**d.get("model", {}))
        if "mask_padding" not in d:  # written before padding masks existed: nothing was masked
            d["mask_padding"], d["masked"] = "off", False
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


MASK_PADDING = ("auto", "on", "off")


def resolve_mask_padding(mask_padding: str, model: ModelConfig) -> bool:
    """``on`` -> True, ``off`` -> False, ``auto`` -> whether the model has a Taylor (or hybrid) attention."""
    if mask_padding not in MASK_PADDING:
        raise ValueError(f"mask_padding must be one of {MASK_PADDING}, got {mask_padding!r}")
    return model.uses_taylor if mask_padding == "auto" else mask_padding == "on"


class RunFolderError(ExperimentError):
    """The run folder holds another run (no --resume/--overwrite), or --resume would mix settings."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _flag(key: str) -> str:
    return _FLAGS.get(key) or "--" + key.split(".")[-1].replace("_", "-")


def resume_differences(saved: dict, cfg: "TrainConfig") -> List[str]:
    """Settings (dotted field names, ``model.width``) of ``cfg`` that differ from a checkpoint's config ``saved``,
    except :data:`RESUME_MAY_DIFFER`; a field missing from an older checkpoint counts with its default."""
    old = _flat(TrainConfig.from_dict(saved).as_dict())
    new = _flat(cfg.as_dict())
    return [k for k in sorted(old.keys() | new.keys())
            if k.split(".")[0] not in RESUME_MAY_DIFFER and old.get(k) != new.get(k)]


def check_run_dir(cfg: "TrainConfig") -> Optional[dict]:
    """Refuse a run folder that would be overwritten or resumed with other settings; return the checkpoint
    to resume from (``None``: start from epoch 1).

    * not empty, and neither ``resume`` nor ``overwrite``: refused (nothing is touched);
    * ``resume`` with ``checkpoint.pt``: every setting that changes results must equal the checkpoint's
      (:func:`resume_differences`); the message names each one that differs, old and new value;
    * ``resume`` without a checkpoint starts from epoch 1; ``overwrite`` lets :func:`train` remove the
      previous outputs (:data:`RUN_OUTPUTS`).
    """
    run_dir = Path(cfg.run_dir)
    if cfg.resume and cfg.overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--run-dir {run_dir} is a file, not a folder")
    ckpt_path = run_dir / CHECKPOINT
    if not cfg.resume:
        entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        if entries and not cfg.overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise RunFolderError(f"--run-dir {run_dir} is not empty ({shown}); pass --resume to continue that run, "
                                 "--overwrite to replace it, or choose another --run-dir")
        return None
    if not ckpt_path.exists():
        print(f"--resume: no {ckpt_path} yet, starting from epoch 1", flush=True)
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
    except Exception as e:  # an unreadable checkpoint is never resumed from
        raise RunFolderError(f"--resume: cannot read {ckpt_path} ({type(e).__name__}: {e}); "
                             "pass --overwrite to start the run again") from e
    old = _flat(TrainConfig.from_dict(saved).as_dict())
    new = _flat(cfg.as_dict())
    diffs = resume_differences(saved, cfg)
    if diffs:
        listed = "; ".join(f"{k} ({_flag(k)}): {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in diffs)
        raise RunFolderError(f"--resume: {ckpt_path} was written with other settings: {listed}; "
                             "resume with the checkpoint's values, or pass --overwrite (or another --run-dir) to start again")
    return ckpt


def _remove_outputs(run_dir: Path) -> None:
    import shutil

    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def lr_factor(epoch: int, warmup: int = 2, decay: int = 12, floor: float = 0.01) -> float:
    """LR multiplier of 0-based ``epoch``: ``floor -> 1`` linearly over ``warmup`` epochs, then ``1 -> floor`` over ``decay``."""
    if epoch < warmup:
        return floor + (1.0 - floor) * epoch / warmup
    return 1.0 + (floor - 1.0) * min(epoch - warmup, decay) / decay


# ------------------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: List[float], device) -> List[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` in order (evaluation: every sample exactly once overall)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------- helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def _loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().transpose(1, 2), target, label_smoothing=smoothing, reduction=reduction)


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()



def _progress(iterable, enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kw)


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig, device, env: Dist, tokenizer: Tokenizer, *, desc: str, keep_predictions: bool = False):
    """Teacher-forced loss and greedy-decoding similarities over a (sharded) split."""
    model.eval()
    module = model.module if hasattr(model, "module") else model
    totals = dict.fromkeys(["loss", *METRICS], 0.0)
    count = 0
    predictions = []
    steps = cfg.max_chars + 1
    for feats, tokens, index, lengths in _progress(loader, cfg.progress and env.main, desc=desc, leave=False):
        feats, tokens = feats.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        lengths = lengths.to(device) if cfg.masked else None
        with _autocast(device, cfg.amp):
            logits = module(feats, tokens[:, :-1], lengths)
            decoded = greedy_decode(module, feats, steps=steps, use_cache=True, lengths=lengths)
        totals["loss"] += _loss(logits, tokens[:, 1:], cfg.label_smoothing, "none").mean(1).sum().item()
        for k, v in sum_similarities(tokens.cpu(), decoded.cpu()).items():
            totals[k] += v
        count += tokens.shape[0]
        if keep_predictions:
            for i, t, p in zip(index.tolist(), tokens.cpu().tolist(), decoded.cpu().tolist()):
                tc, pc = cut_pair(t, p)
                predictions.append((i, tokenizer.decode(tc, strip=True), tokenizer.decode(pc, strip=True)))
    values = env.sum([totals[k] for k in totals] + [count], device)
    n = max(values[-1], 1)
    result = {k: v / n for k, v in zip(totals, values[:-1])}
    result["samples"] = int(values[-1])
    if keep_predictions:
        predictions = sorted(p for part in env.gather(predictions) for p in part)
    return result, predictions


# -------------------------------------------------------------------------------------------- training

def _data(cfg: TrainConfig, env: Dist):
    front = FrontEndConfig(n_mels=cfg.model.n_mels, filterbank_rate=cfg.filterbank_rate, max_frames=cfg.max_frames)
    # Every rank calls the same preparation; each step (download, extraction, feature cache) runs under a lock
    # file, so one process does it while the others wait on the lock -- not in a collective, so no
    # process-group timeout fires however long it takes -- and then reuse the result.
    if cfg.corpus_dir:
        corpus = Path(cfg.corpus_dir)
    else:
        corpus = prepare_ljspeech(Path(cfg.data_dir), download_if_missing=cfg.download, url=cfg.url, sha256=cfg.sha256, progress=cfg.progress)
    store = FeatureStore.build(corpus, front, Path(cfg.cache_dir) if cfg.cache_dir else None, progress=cfg.progress)
    clips = read_metadata(corpus)
    tokenizer = Tokenizer(cfg.max_chars)
    sets = {}
    # prepare_ljspeech guarantees the official archive's 13,100 clips; another corpus (--corpus-dir, or an archive
    # given by --url/--checksum) gets the course's splits scaled, and says so
    splits = split_ranges(len(clips), scale=True)
    if env.main and len(clips) != LJSPEECH_CLIPS:
        print(f"{corpus}: {len(clips):,} clips, not LJ Speech's {LJSPEECH_CLIPS:,}: the course's splits scaled to "
              f"{'/'.join(str(len(r)) for r in splits.values())} (train/validation/test)", flush=True)
    for name, rng in splits.items():
        limit = cfg.limit_train if name == "train" else cfg.limit_eval
        indices = list(rng)[:limit] if limit else list(rng)
        sets[name] = ASRDataset(store, clips, indices, tokenizer)
    return sets, tokenizer, clips


def train(cfg: TrainConfig) -> Optional[dict]:
    """Run (or resume) one training run; returns the results dict on the main process."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    env = init_distributed(cfg.device)
    if cfg.device == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device(cfg.device)
    cfg.model.max_frames, cfg.model.max_len = cfg.max_frames, cfg.max_chars + 1
    cfg.masked = resolve_mask_padding(cfg.mask_padding, cfg.model)
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({env.world})")
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / CHECKPOINT
    ckpt = check_run_dir(cfg)  # every rank, before any collective: all raise alike
    if env.main:
        if cfg.overwrite:
            _remove_outputs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    env.barrier()

    sets, tokenizer, clips = _data(cfg, env)
    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: List[dict] = []
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history, start_epoch = ckpt["history"], ckpt["epoch"] + 1
        _set_rng_state(ckpt["rng"][env.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        if env.main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}", flush=True)
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)

    loader_kw = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda", "persistent_workers": False,
                 "collate_fn": collate}
    train_sampler = DistributedSampler(sets["train"], num_replicas=env.world, rank=env.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(sets["train"], batch_size=cfg.batch_size // env.world, sampler=train_sampler, **loader_kw)
    eval_loaders = {
        name: DataLoader(sets[name], batch_size=cfg.eval_batch_size, sampler=ShardSampler(len(sets[name]), env.rank, env.world), **loader_kw)
        for name in ("validation", "test")
    }
    if env.main:
        (run_dir / "config.json").write_text(json.dumps(cfg.as_dict(), indent=2))
        params = sum(p.numel() for p in model.parameters())
        print(f"decoder={cfg.model.decoder} encoder_attention={cfg.model.encoder_attention} "
              f"mask_padding={cfg.mask_padding} ({'on' if cfg.masked else 'off'}) params={params:,} "
              f"device={device} processes={env.world} train/val/test={[len(sets[s]) for s in ('train', 'validation', 'test')]}", flush=True)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(epoch, cfg.warmup_epochs, cfg.decay_epochs, cfg.lr_floor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_sampler.set_epoch(epoch)
        model.train()
        loss_sum, batches = 0.0, 0
        bar = _progress(train_loader, cfg.progress and env.main, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for feats, tokens, _, lengths in bar:
            feats, tokens = feats.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            lengths = lengths.to(device) if cfg.masked else None
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, cfg.amp):
                logits = model(feats, tokens[:, :-1], lengths)
            loss = _loss(logits, tokens[:, 1:], cfg.label_smoothing)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            batches += 1
            if env.main and cfg.progress:
                bar.set_postfix(loss=f"{loss_sum / batches:.3f}")
        loss_sum, batches = env.sum([loss_sum, batches], device)
        train_time = time.perf_counter() - t0
        val, _ = evaluate(model, eval_loaders["validation"], cfg, device, env, tokenizer, desc="validation")
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(batches, 1), "validation": val,
                  "train_seconds": train_time, "epoch_seconds": time.perf_counter() - t0}
        history.append(record)
        rng = env.gather(_rng_state())
        if env.main:
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.3f} | val loss {val['loss']:.3f} "
                  f"jaccard {val['jaccard']:.3f} cosine {val['cosine']:.3f} DL {val['damerau_levenshtein']:.3f} "
                  f"| {record['epoch_seconds']:.1f}s", flush=True)
            module = model.module if hasattr(model, "module") else model
            atomic_save({"config": cfg.as_dict(), "epoch": epoch, "model": module.state_dict(),
                          "optimizer": optimizer.state_dict(), "history": history, "rng": rng}, ckpt_path)
        env.barrier()
        if cfg.crash_after_epoch is not None and epoch + 1 == cfg.crash_after_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    t_test = time.perf_counter()
    test, predictions = evaluate(model, eval_loaders["test"], cfg, device, env, tokenizer, desc="test", keep_predictions=True)
    test_seconds = time.perf_counter() - t_test
    if not env.main:
        return None
    results = {
        "config": cfg.as_dict(),
        "history": history,
        "test": test,
        "predictions": [{"id": clips[i].id, "target": t, "prediction": p} for i, t, p in predictions],
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                    "processes": env.world, "torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads()},
        "train_seconds_total": sum(h["train_seconds"] for h in history),
        # every epoch (training + validation) and the test pass; resume-safe (sums of recorded times)
        "wall_seconds": sum(h["epoch_seconds"] for h in history) + test_seconds,
        "test_seconds": test_seconds,
    }
    from .report import write_run

    write_run(run_dir, results, examples=cfg.examples)
    print(f"test: loss {test['loss']:.3f} jaccard {test['jaccard']:.3f} cosine {test['cosine']:.3f} "
          f"DL {test['damerau_levenshtein']:.3f} -> {run_dir}", flush=True)
    return results
