"""LJ Speech 1.1: download, checksum, safe extraction, metadata, the course's splits, cached features.

The archive (2,748,572,632 bytes) has the SHA-256 below, as recorded by torchaudio's ``LJSPEECH``
dataset (``torchaudio/datasets/ljspeech.py``) and by independent mirrors. A different archive (a mirror,
a test file) is checked against ``sha256=...`` given by the caller.

On-disk layout (``<root>/LJSpeech-1.1``): ``metadata.csv`` with ``id|transcript|normalized transcript``
lines (no quoting; the course used the normalized transcript) and ``wavs/<id>.wav`` (22,050 Hz mono
16-bit PCM).

Features are computed once per front-end configuration and stored as one float32 memory-mapped array per
corpus (unpadded frames concatenated along time, with an offsets index), so epochs only pad and copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .features import FrontEndConfig, LogMelFrontEnd
from .tokenizer import Tokenizer

LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
LJSPEECH_SHA256 = "be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5"
LJSPEECH_BYTES = 2_748_572_632
LJSPEECH_DIRNAME = "LJSpeech-1.1"
LJSPEECH_CLIPS = 13_100

# The course's split by index in metadata order: train [0, 9825), validation [9825, 10480), test [10480, 13100).
COURSE_SPLIT_BOUNDS = (9825, 10480)
SPLITS = ("train", "validation", "test")

__all__ = [
    "LJSPEECH_URL", "LJSPEECH_SHA256", "Clip", "UnsafeArchiveError", "ChecksumError", "download",
    "sha256_of", "verify_checksum", "safe_extract", "prepare_ljspeech", "read_metadata", "split_ranges",
    "load_wav", "FeatureStore", "ASRDataset", "collate",
]


class UnsafeArchiveError(RuntimeError):
    """An archive member would be written outside the target folder (or is not a plain file/folder/link)."""


class ChecksumError(RuntimeError):
    pass


@dataclass(frozen=True)
class Clip:
    id: str
    text: str
    normalized: str


# --------------------------------------------------------------------------------------------- download

def _progress(total: Optional[int], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


def download(url: str, dest: Path, *, sha256: Optional[str] = None, progress: bool = True, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; verify ``sha256`` when given.

    Writes ``dest.part`` first and renames it only after the checksum matched, so an interrupted or corrupt
    download never looks complete. An existing ``dest`` is verified and reused.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256:
            verify_checksum(dest, sha256, progress=progress)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url) as response, open(part, "wb") as out:
        total = response.headers.get("Content-Length")
        with _progress(int(total) if total else None, f"download {dest.name}", progress) as bar:
            while True:
                block = response.read(chunk)
                if not block:
                    break
                out.write(block)
                bar.update(len(block))
    if sha256:
        try:
            verify_checksum(part, sha256, progress=progress)
        except ChecksumError:
            part.unlink()
            raise
    os.replace(part, dest)
    return dest


def sha256_of(path: Path, *, progress: bool = False, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    path = Path(path)
    with open(path, "rb") as f, _progress(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def verify_checksum(path: Path, sha256: str, *, progress: bool = False) -> None:
    got = sha256_of(path, progress=progress)
    if got.lower() != sha256.lower():
        raise ChecksumError(f"{path}: sha256 {got} does not match the expected {sha256}; delete the file and download again")


# -------------------------------------------------------------------------------------------- extraction

def _inside(root: Path, target: Path) -> bool:
    return target == root or root in target.parents


def check_member(member: tarfile.TarInfo, root: Path) -> None:
    """Raise :class:`UnsafeArchiveError` unless ``member`` stays inside ``root`` (already resolved)."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or os.path.isabs(name):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in Path(name).parts or ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchiveError(f"archive member {name!r} contains '..'")
    dest = (root / name).resolve()
    if not _inside(root, dest):
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {root}")
    if member.issym() or member.islnk():
        link = member.linkname
        if os.path.isabs(link):
            raise UnsafeArchiveError(f"archive link {name!r} -> {link!r} points to an absolute path")
        base = dest.parent if member.issym() else root
        if not _inside(root, (base / link).resolve()):
            raise UnsafeArchiveError(f"archive link {name!r} -> {link!r} points outside {root}")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {name!r} is not a regular file, folder or link")


def safe_extract(archive: Path, target: Path, *, progress: bool = True) -> List[str]:
    """Extract a tar archive (any compression) into ``target``; returns the member names.

    Every member is checked before anything is written: absolute paths, ``..`` components, links leading
    outside ``target`` and device/fifo members raise :class:`UnsafeArchiveError`. Permissions are
    sanitized with tarfile's ``data`` filter where Python provides it.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            check_member(member, root)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        from tqdm.auto import tqdm

        for member in tqdm(members, desc=f"extract {Path(archive).name}", unit="file", disable=not progress):
            tar.extract(member, root, **kwargs)
    return [m.name for m in members]


def prepare_ljspeech(
    root: Path,
    *,
    download_if_missing: bool = True,
    url: str = LJSPEECH_URL,
    sha256: Optional[str] = LJSPEECH_SHA256,
    progress: bool = True,
) -> Path:
    """Return ``<root>/LJSpeech-1.1``, downloading, verifying and extracting the archive when it is missing."""
    root = Path(root)
    dataset = root / LJSPEECH_DIRNAME
    if (dataset / "metadata.csv").exists():
        return dataset
    if not download_if_missing:
        raise FileNotFoundError(f"{dataset}/metadata.csv not found; run `python -m experiments.asr download --data-dir {root}`")
    archive = download(url, root / Path(url).name, sha256=sha256, progress=progress)
    safe_extract(archive, root, progress=progress)
    if not (dataset / "metadata.csv").exists():
        raise FileNotFoundError(f"{archive} did not contain {LJSPEECH_DIRNAME}/metadata.csv")
    return dataset


# ------------------------------------------------------------------------------------- metadata & audio

def read_metadata(dataset: Path) -> List[Clip]:
    """``metadata.csv`` rows in file order (``id|transcript|normalized``; no quoting, as in LJ Speech)."""
    clips = []
    with open(Path(dataset) / "metadata.csv", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("|")
            if len(fields) != 3:
                raise ValueError(f"metadata.csv line {number}: expected 3 '|'-separated fields, got {len(fields)}")
            clips.append(Clip(*fields))
    return clips


def split_ranges(n: int) -> Dict[str, range]:
    """The course's index split, scaled to ``n`` clips (exactly [0,9825), [9825,10480), [10480,13100) for 13,100)."""
    a, b = (n * bound // LJSPEECH_CLIPS for bound in COURSE_SPLIT_BOUNDS)
    return {"train": range(0, a), "validation": range(a, b), "test": range(b, n)}


def load_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Decode a wav with soundfile: ``(float32 mono samples in [-1, 1), sample_rate)``."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0].copy()), rate


# ------------------------------------------------------------------------------------------ feature cache

def _cache_key(dataset: Path, config: FrontEndConfig) -> str:
    meta = Path(dataset) / "metadata.csv"
    blob = json.dumps({"front_end": config.as_dict(), "metadata_sha256": sha256_of(meta), "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FeatureStore:
    """Unpadded log-mel features of every clip of a corpus, memory-mapped from ``<cache_dir>/<key>/``.

    ``features.f32``: float32 ``[n_mels, total_frames]`` rows concatenated per clip along time;
    ``index.json``: front-end config, clip ids, frame offsets. Built once (``build``); reads are cheap.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.config = FrontEndConfig(**index["front_end"])
        self.ids: List[str] = index["ids"]
        self.offsets = np.asarray(index["offsets"], dtype=np.int64)
        self._data = None

    @staticmethod
    def folder_for(dataset: Path, config: FrontEndConfig, cache_dir: Optional[Path] = None) -> Path:
        cache_dir = Path(cache_dir) if cache_dir else Path(dataset) / "features"
        return cache_dir / _cache_key(dataset, config)

    @classmethod
    def build(cls, dataset: Path, config: FrontEndConfig, cache_dir: Optional[Path] = None, *, progress: bool = True) -> "FeatureStore":
        """Compute (or reuse) the features of every clip in ``metadata.csv``."""
        folder = cls.folder_for(dataset, config, cache_dir)
        if (folder / "index.json").exists():
            return cls(folder)
        from tqdm.auto import tqdm

        clips = read_metadata(dataset)
        front = LogMelFrontEnd(config)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        offsets = [0]
        with open(tmp / "features.f32", "wb") as out:
            for clip in tqdm(clips, desc="features", unit="clip", disable=not progress):
                wave, rate = load_wav(Path(dataset) / "wavs" / f"{clip.id}.wav")
                feats = front.features(wave, rate)[:, : config.max_frames]
                out.write(np.ascontiguousarray(feats.numpy().T).tobytes())  # time-major: clips are contiguous
                offsets.append(offsets[-1] + feats.shape[1])
        index = {"front_end": config.as_dict(), "ids": [c.id for c in clips], "offsets": offsets}
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(folder)

    def __len__(self) -> int:
        return len(self.ids)

    def frames(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def __getitem__(self, i: int) -> torch.Tensor:
        """Unpadded features of clip ``i``: float32 ``[n_mels, frames]``."""
        if self._data is None:  # opened lazily, so each DataLoader worker maps the file itself
            total = int(self.offsets[-1])
            self._data = np.memmap(self.folder / "features.f32", dtype=np.float32, mode="r", shape=(total, self.config.n_mels))
        rows = np.array(self._data[self.offsets[i] : self.offsets[i + 1]])
        return torch.from_numpy(rows.T.copy())

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None
        return state


class ASRDataset(torch.utils.data.Dataset):
    """``(features [n_mels, max_frames], tokens [max_chars + 2], index, frames)`` of the clips ``indices``.

    ``frames``: the clip's valid (unpadded) feature frames after the crop to ``max_frames``, for the model's
    padding mask; batch with :func:`collate`.
    """

    def __init__(self, store: FeatureStore, clips: Sequence[Clip], indices: Sequence[int], tokenizer: Tokenizer) -> None:
        if len(store) != len(clips):
            raise ValueError(f"feature store has {len(store)} clips, metadata has {len(clips)}")
        self.store, self.clips, self.indices, self.tokenizer = store, clips, list(indices), tokenizer
        self.front = LogMelFrontEnd(store.config)

    def __len__(self) -> int:
        return len(self.indices)

    def frames(self, i: int) -> int:
        """Valid feature frames of item ``i`` (its clip's frames, cropped to ``max_frames``)."""
        return min(self.store.frames(self.indices[i]), self.front.config.max_frames)

    def __getitem__(self, i: int):
        j = self.indices[i]
        return self.front.pad(self.store[j]), self.tokenizer.encode(self.clips[j].normalized), j, self.frames(i)


def collate(batch):
    """``ASRDataset`` items -> ``(features [B, n_mels, T], tokens [B, L], index [B], lengths [B])`` (``lengths``:
    valid feature frames per clip, long)."""
    if not batch:
        raise ValueError("collate: empty batch")
    feats, tokens, index, frames = zip(*batch)
    return (torch.stack(feats), torch.stack(tokens), torch.as_tensor(index, dtype=torch.long),
            torch.as_tensor(frames, dtype=torch.long))
