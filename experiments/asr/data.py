"""LJ Speech 1.1: download, checksum, safe extraction, metadata, the course's splits, cached features.

The archive (2,748,572,632 bytes) has the SHA-256 below, as recorded by torchaudio's ``LJSPEECH``
dataset (``torchaudio/datasets/ljspeech.py``) and by independent mirrors. A different archive (a mirror,
a local copy, a test file) is checked against ``sha256=...`` given by the caller.

On-disk layout (``<root>/LJSpeech-1.1``): ``metadata.csv`` with ``id|transcript|normalized transcript``
lines (no quoting; the course used the normalized transcript) and ``wavs/<id>.wav`` (22,050 Hz mono
16-bit PCM).

Nothing half-done is ever taken as complete:

* the archive is downloaded into ``<name>.part`` (resumed with HTTP Range after a dropped connection,
  :mod:`experiments.common.download`) and renamed only once its size and SHA-256 match;
* it is extracted into a temporary folder beside the target; every clip listed in ``metadata.csv`` must
  have its WAV (RIFF/PCM, mono, 16-bit, 22,050 Hz, data chunk as long as its header says), and the
  official archive must hold 13,100 clips; only then is a completion marker written and the folder
  renamed into place. A tree without the marker (an interrupted extraction) is checked the same way and
  re-extracted when it fails;
* features are computed once per front-end configuration and front-end code version into
  ``<key>.partial/`` (resumable: progress is saved every few hundred clips) and renamed to ``<key>/``
  when complete.

Every step runs under a lock file, so several processes (DDP ranks) prepare the data once: the first
does the work, the others wait on the lock (no collective, hence no process-group timeout) and reuse it.

Features are stored as one float32 memory-mapped array per corpus (unpadded frames concatenated along
time, with an offsets index), so epochs only pad and copy.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import lzma
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from experiments.common.download import ChecksumError, DownloadError, download, file_digest, verify_file
from experiments.common.errors import DataMissingError, ExperimentError
from experiments.common.locking import exclusive

from . import features as _features_module
from .features import FrontEndConfig, LogMelFrontEnd
from .tokenizer import Tokenizer

LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
LJSPEECH_SHA256 = "be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5"
LJSPEECH_BYTES = 2_748_572_632
LJSPEECH_DIRNAME = "LJSpeech-1.1"
LJSPEECH_CLIPS = 13_100
LJSPEECH_SAMPLE_RATE = 22_050
COMPLETE_MARKER = ".complete.json"  # written into <root>/LJSpeech-1.1 after a verified extraction

# The course's split by index in metadata order: train [0, 9825), validation [9825, 10480), test [10480, 13100).
COURSE_SPLIT_BOUNDS = (9825, 10480)
SPLITS = ("train", "validation", "test")

__all__ = [
    "LJSPEECH_URL", "LJSPEECH_SHA256", "Clip", "UnsafeArchiveError", "ArchiveError", "ChecksumError",
    "DownloadError", "CorpusError", "ClipError", "download", "sha256_of", "verify_checksum", "safe_extract",
    "prepare_ljspeech", "check_corpus", "check_wav", "read_metadata", "split_ranges", "load_wav", "FeatureStore",
    "ASRDataset", "collate",
]


class UnsafeArchiveError(ExperimentError):
    """An archive member would be written outside the target folder (or is not a plain file/folder/link)."""


class ArchiveError(ExperimentError):
    """The archive cannot be read to its end (truncated or corrupt)."""


class CorpusError(ExperimentError, ValueError):
    """A corpus folder is not complete LJ Speech layout (metadata, a clip's WAV, the clip count)."""


class ClipError(CorpusError):
    """One clip cannot be turned into features; the message names its file."""


@dataclass(frozen=True)
class Clip:
    id: str
    text: str
    normalized: str


# --------------------------------------------------------------------------------------------- download

def sha256_of(path: Path, *, progress: bool = False) -> str:
    return file_digest(path, "sha256", progress=progress)


def verify_checksum(path: Path, sha256: str, *, progress: bool = False) -> None:
    verify_file(path, sha256=sha256, progress=progress, hint="delete the file and download again")


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


def _is_corrupt_read(e: BaseException) -> bool:
    """A decompression / tar-format error (as opposed to, say, a full disk, which has an errno)."""
    return isinstance(e, (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)) or (isinstance(e, OSError) and e.errno is None)


def safe_extract(archive: Path, target: Path, *, progress: bool = True) -> List[str]:
    """Extract a tar archive (any compression) into ``target``; returns the member names.

    Every member is checked before anything is written: absolute paths, ``..`` components, links leading
    outside ``target`` and device/fifo members raise :class:`UnsafeArchiveError`. Permissions are
    sanitized with tarfile's ``data`` filter where Python provides it. A truncated or corrupt archive
    raises :class:`ArchiveError` (the listing reads it to its end before anything is written).
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member, root)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in _iterate(members, f"extract {Path(archive).name}", progress):
                tar.extract(member, root, **kwargs)
    except Exception as e:
        if _is_corrupt_read(e):
            detail = " ".join(str(e).split())
            raise ArchiveError(f"{archive} is truncated or corrupt ({type(e).__name__}: {detail})") from e
        raise
    return [m.name for m in members]


def _iterate(items, desc: str, progress: bool, unit: str = "file", initial: int = 0, total: Optional[int] = None):
    if not progress:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, initial=initial, total=total, dynamic_ncols=True)


@dataclass(frozen=True)
class WavInfo:
    sample_rate: int
    channels: int
    bits: int
    frames: int


def check_wav(path: Path, *, sample_rate: Optional[int] = LJSPEECH_SAMPLE_RATE, channels: int = 1, bits: int = 16) -> WavInfo:
    """Read a WAV file's RIFF header; raise :class:`ClipError` naming ``path`` unless it is uncompressed PCM
    with the given sample rate (``None``: any), channels and bits, and holds as many bytes as its data chunk
    declares (a file cut short by an interrupted extraction fails here)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                raise ClipError(f"{path}: not a RIFF/WAVE file")
            fmt, pos = None, 12
            while True:
                header = f.read(8)
                if len(header) < 8:
                    raise ClipError(f"{path}: no data chunk (the file is cut short)")
                chunk_id, chunk_size = header[:4], struct.unpack("<I", header[4:])[0]
                pos += 8
                if chunk_id == b"fmt ":
                    body = f.read(chunk_size)
                    if len(body) < 16:
                        raise ClipError(f"{path}: fmt chunk cut short")
                    fmt = struct.unpack("<HHIIHH", body[:16])
                    f.seek(chunk_size & 1, 1)
                elif chunk_id == b"data":
                    if fmt is None:
                        raise ClipError(f"{path}: data chunk before the fmt chunk")
                    if pos + chunk_size > size:
                        raise ClipError(f"{path}: cut short: its data chunk declares {chunk_size:,} bytes, "
                                        f"the file holds {size - pos:,}")
                    break
                else:
                    f.seek(chunk_size + (chunk_size & 1), 1)
                pos += chunk_size + (chunk_size & 1)
    except FileNotFoundError:
        raise ClipError(f"{path}: missing (listed in metadata.csv)") from None
    tag, got_channels, rate, _, block, got_bits = fmt
    if tag not in (1, 0xFFFE):
        raise ClipError(f"{path}: WAV format tag {tag:#x}, expected uncompressed PCM (1)")
    if (got_channels, got_bits) != (channels, bits) or (sample_rate is not None and rate != sample_rate):
        expected = f"{channels} channel(s), {bits}-bit" + (f", {sample_rate} Hz" if sample_rate else "")
        raise ClipError(f"{path}: {got_channels} channel(s), {got_bits}-bit, {rate} Hz; expected {expected}")
    return WavInfo(rate, got_channels, got_bits, chunk_size // max(block, 1))


def check_corpus(dataset: Path, *, expected_clips: Optional[int] = None, sample_rate: Optional[int] = LJSPEECH_SAMPLE_RATE) -> List[Clip]:
    """Check that ``metadata.csv`` is well-formed, lists ``expected_clips`` clips (when given) and that each has
    its WAV in the expected format (:func:`check_wav`); raise :class:`CorpusError` naming what is wrong."""
    dataset = Path(dataset)
    clips = read_metadata(dataset)
    if expected_clips is not None and len(clips) != expected_clips:
        raise CorpusError(f"{dataset / 'metadata.csv'} lists {len(clips):,} clips; LJ Speech 1.1 has {expected_clips:,}")
    problems = []
    for clip in clips:
        try:
            check_wav(dataset / "wavs" / f"{clip.id}.wav", sample_rate=sample_rate)
        except ClipError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorpusError(f"{len(problems)} of {len(clips)} clips of {dataset} are bad: {problems[0]}{more}")
    return clips


def _archive_name(url: str) -> str:
    name = Path(urllib.parse.urlparse(url).path).name
    return name or "LJSpeech-1.1.tar.bz2"


def _read_marker(dataset: Path) -> Optional[dict]:
    try:
        return json.loads((dataset / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(dataset: Path, info: dict) -> None:
    tmp = dataset / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, dataset / COMPLETE_MARKER)


def _remove_tree(path: Path) -> None:
    """Rename ``path`` aside (one atomic step) and delete it, so no half-deleted tree is left under its name."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def prepare_ljspeech(
    root: Path,
    *,
    download_if_missing: bool = True,
    url: str = LJSPEECH_URL,
    sha256: Optional[str] = LJSPEECH_SHA256,
    progress: bool = True,
    log: Callable[[str], None] = print,
    retries: int = 8,
    timeout: float = 60.0,
) -> Path:
    """Return ``<root>/LJSpeech-1.1``, complete and checked; download, verify and extract it when needed.

    The official archive (the default ``url``, or the official ``sha256``) must have 2,748,572,632 bytes and
    13,100 clips; any other archive (``url``/``sha256`` of a mirror or a local copy; ``sha256=None`` skips the
    digest) must extract to a complete LJ Speech layout. A truncated archive found on disk is deleted and
    downloaded again; a wrong checksum is refused before anything is extracted.
    """
    root = Path(root)
    dataset = root / LJSPEECH_DIRNAME
    official = url == LJSPEECH_URL or (sha256 or "").lower() == LJSPEECH_SHA256
    size = LJSPEECH_BYTES if official else None
    expected_clips = LJSPEECH_CLIPS if official else None
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f".{LJSPEECH_DIRNAME}.lock", f"preparing {dataset}", log):
        for stale in root.glob(f".{LJSPEECH_DIRNAME}.extract-*"):  # left by a killed extraction
            shutil.rmtree(stale, ignore_errors=True)
        marker = _read_marker(dataset)
        if marker is not None:
            if sha256 and marker.get("sha256") and marker["sha256"] != sha256.lower():
                raise CorpusError(f"{dataset} was extracted from another archive (sha256 {marker['sha256']}, not {sha256.lower()}); "
                                  "delete it or pass the --url/--checksum it was prepared with")
            if expected_clips is not None and marker.get("clips") != expected_clips:
                raise CorpusError(f"{dataset} holds {marker.get('clips')} clips, the official LJ Speech 1.1 has {expected_clips:,}; "
                                  "delete it or pass the --url/--checksum it was prepared with")
            return dataset
        archive = root / _archive_name(url)
        if dataset.exists():  # no marker: an interrupted extraction, or one by an older version of this code
            try:
                clips = check_corpus(dataset, expected_clips=expected_clips)
            except CorpusError as e:
                if not download_if_missing and not archive.exists():  # nothing to rebuild it from: keep it, unused
                    raise CorpusError(f"{dataset} is incomplete ({e}) and there is no {archive} to extract again; "
                                      "leave out --no-download to fetch it") from None
                log(f"{dataset} is incomplete ({e}); extracting it again")
                _remove_tree(dataset)
            else:
                _write_marker(dataset, {"clips": len(clips), "sha256": None, "archive": None, "checked": "existing tree"})
                return dataset
        if not download_if_missing and not archive.exists():
            raise DataMissingError(f"{dataset} not found (nor {archive}); run `python -m experiments.asr download --data-dir {root}` "
                                   "or leave out --no-download")
        for attempt in range(2):
            had_archive = archive.exists()
            if download_if_missing:
                download(url, archive, sha256=sha256, size=size, progress=progress, log=log, retries=retries, timeout=timeout)
            else:
                verify_file(archive, sha256=sha256, size=size, progress=progress,
                            hint="delete it, or leave out --no-download to fetch it again")
            try:
                _extract_verified(archive, root, dataset, expected_clips, sha256, progress)
                return dataset
            except ArchiveError as e:
                archive.unlink()
                if attempt == 0 and had_archive and download_if_missing:
                    log(f"{e}; deleted it, downloading it again")
                    continue
                raise ArchiveError(f"{e}; the archive was deleted" + ("" if download_if_missing else ", rerun without --no-download")) from None
    raise AssertionError("unreachable")


def _extract_verified(archive: Path, root: Path, dataset: Path, expected_clips: Optional[int], sha256: Optional[str], progress: bool) -> None:
    """Extract into a temporary folder beside ``dataset``, check the tree, mark it complete, rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{LJSPEECH_DIRNAME}.extract-", dir=root))
    try:
        safe_extract(archive, tmp, progress=progress)
        inner = tmp / LJSPEECH_DIRNAME
        if not (inner / "metadata.csv").is_file():
            raise CorpusError(f"{archive} does not contain {LJSPEECH_DIRNAME}/metadata.csv")
        clips = check_corpus(inner, expected_clips=expected_clips)
        _write_marker(inner, {"clips": len(clips), "sha256": sha256.lower() if sha256 else None, "archive": archive.name})
        if dataset.exists():
            _remove_tree(dataset)
        os.replace(inner, dataset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- metadata & audio

def read_metadata(dataset: Path) -> List[Clip]:
    """``metadata.csv`` rows in file order (``id|transcript|normalized``; no quoting, as in LJ Speech)."""
    path = Path(dataset) / "metadata.csv"
    if not path.is_file():
        raise DataMissingError(f"{path} not found (not a corpus in LJ Speech layout)")
    clips, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("|")
            if len(fields) != 3:
                raise CorpusError(f"{path} line {number}: expected 3 '|'-separated fields, got {len(fields)}")
            if not fields[0] or fields[0] in seen or "/" in fields[0] or "\\" in fields[0]:
                raise CorpusError(f"{path} line {number}: clip id {fields[0]!r} is empty, repeated or a path")
            seen.add(fields[0])
            clips.append(Clip(*fields))
    return clips


def split_ranges(n: int, *, scale: bool = False) -> Dict[str, range]:
    """The course's index split: exactly [0,9825), [9825,10480), [10480,13100) for LJ Speech's 13,100 clips.

    Another number of clips raises :class:`CorpusError` unless ``scale=True`` (a corpus of another size,
    e.g. a synthetic one), which scales the bounds proportionally.
    """
    if n != LJSPEECH_CLIPS and not scale:
        raise CorpusError(f"the course's splits are defined for LJ Speech's {LJSPEECH_CLIPS:,} clips, the corpus has {n:,}")
    a, b = (n * bound // LJSPEECH_CLIPS for bound in COURSE_SPLIT_BOUNDS)
    return {"train": range(0, a), "validation": range(a, b), "test": range(b, n)}


def load_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Decode a wav with soundfile: ``(float32 mono samples in [-1, 1), sample_rate)``."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0].copy()), rate


# ------------------------------------------------------------------------------------------ feature cache

FEATURE_STORE_FORMAT = 2    # layout of <key>/ (features.f32 time-major + index.json)
PROGRESS_EVERY = 256        # clips between two saved progress records of a build


def _code_fingerprint(source: str) -> str:
    """SHA-256 of a module's syntax tree without docstrings (comments and formatting do not count)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


_WAV_DECODER = load_wav  # the decoder whose code the cache key covers (fixed here, whatever later replaces the name)


@functools.lru_cache(maxsize=None)
def front_end_code_version() -> str:
    """Version of the code that turns a clip into features: ``features.py`` and :func:`load_wav`, by syntax tree."""
    return _code_fingerprint(inspect.getsource(_features_module) + "\n" + inspect.getsource(_WAV_DECODER))[:16]


def _cache_key(dataset: Path, config: FrontEndConfig) -> str:
    meta = Path(dataset) / "metadata.csv"
    if not meta.is_file():
        raise DataMissingError(f"{meta} not found (not a corpus in LJ Speech layout)")
    blob = json.dumps({"front_end": config.as_dict(), "front_end_code": front_end_code_version(),
                       "metadata_sha256": file_digest(meta), "format": FEATURE_STORE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureStore:
    """Unpadded log-mel features of every clip of a corpus, memory-mapped from ``<cache_dir>/<key>/``.

    ``features.f32``: float32 ``[n_mels, total_frames]`` rows concatenated per clip along time;
    ``index.json``: front-end config, clip ids, frame offsets. ``<key>`` hashes the front-end configuration,
    the front-end code version (:func:`front_end_code_version`) and ``metadata.csv``. Built once
    (``build``, resumable); reads are cheap.
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
    def build(cls, dataset: Path, config: FrontEndConfig, cache_dir: Optional[Path] = None, *, progress: bool = True,
              log: Callable[[str], None] = print) -> "FeatureStore":
        """Compute (or reuse, or finish) the features of every clip in ``metadata.csv``.

        Work goes to ``<key>.partial/``, renamed to ``<key>/`` when complete; an interrupted build (killed,
        disk full) resumes from its last saved progress. A clip whose WAV is missing or unreadable raises
        :class:`ClipError` naming the file and removes the partial folder (the corpus needs fixing first).
        """
        folder = cls.folder_for(dataset, config, cache_dir)
        if (folder / "index.json").exists():
            return cls(folder)
        with exclusive(folder.with_name(folder.name + ".lock"), f"computing the features {folder}", log):
            if not (folder / "index.json").exists():
                _build_features(Path(dataset), config, folder, progress, log)
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


def _build_features(dataset: Path, config: FrontEndConfig, folder: Path, progress: bool, log: Callable[[str], None]) -> None:
    clips = read_metadata(dataset)
    paths = [dataset / "wavs" / f"{clip.id}.wav" for clip in clips]
    missing = [p for p in paths if not p.is_file()]
    if missing:  # before anything is written
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ClipError(f"{missing[0]}: missing (listed in {dataset / 'metadata.csv'}){more}; no features were computed")
    work = folder.with_name(folder.name + ".partial")
    ids_sha = hashlib.sha256("\n".join(c.id for c in clips).encode()).hexdigest()
    row_bytes = config.n_mels * 4
    offsets = [0]
    state_path = work / "progress.json"
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
            ok = state["ids_sha256"] == ids_sha and (work / "features.f32").stat().st_size >= state["offsets"][-1] * row_bytes
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            ok = False
        if ok:
            offsets = [int(o) for o in state["offsets"]]
            log(f"resuming the feature cache {folder} at clip {len(offsets) - 1:,} of {len(clips):,}")
        else:
            shutil.rmtree(work)
    elif work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    front = LogMelFrontEnd(config)
    done = len(offsets) - 1
    try:
        mode = "r+b" if done else "wb"
        with open(work / "features.f32", mode) as out:
            out.truncate(offsets[-1] * row_bytes)
            out.seek(offsets[-1] * row_bytes)
            for i in _iterate(range(done, len(clips)), "features", progress, unit="clip", initial=done, total=len(clips)):
                try:
                    wave, rate = load_wav(paths[i])
                    feats = front.features(wave, rate)[:, : config.max_frames]
                except ModuleNotFoundError:
                    raise
                except Exception as e:
                    raise ClipError(f"{paths[i]}: cannot compute its features ({type(e).__name__}: {e})") from e
                out.write(np.ascontiguousarray(feats.numpy().T).tobytes())  # time-major: clips are contiguous
                offsets.append(offsets[-1] + feats.shape[1])
                if (i + 1) % PROGRESS_EVERY == 0 and i + 1 < len(clips):
                    out.flush()
                    os.fsync(out.fileno())
                    _atomic_json(state_path, {"ids_sha256": ids_sha, "offsets": offsets})
            out.flush()
            os.fsync(out.fileno())
    except ClipError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _atomic_json(work / "index.json", {"front_end": config.as_dict(), "ids": [c.id for c in clips], "offsets": offsets,
                                       "front_end_code": front_end_code_version(), "format": FEATURE_STORE_FORMAT})
    state_path.unlink(missing_ok=True)
    if folder.exists():  # an incomplete folder of the same name (no index.json), e.g. copied by hand
        _remove_tree(folder)
    os.replace(work, folder)


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
