"""OCTMNIST loading through medmnist's ``OCTMNIST`` class, the pixel scaling and the course's test subset.

``octmnist.npz`` is fetched with the experiments' shared downloader (:mod:`experiments.common.download`:
resumed after a dropped connection, retried, MD5-checked before it is renamed into place), under a lock
file so that under ``torchrun`` one process downloads while the others wait and then reuse the file. An
existing file is MD5-checked too (``md5=None`` / ``--checksum none`` skips that, for a synthetic or
other local copy); a file that cannot be read as an npz is reported by name, not as a zip error.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

SPLITS = ("train", "val", "test")
# The course evaluated on a class-ordered subset: the first 182/55/42/250 test images of classes 0..3.
COURSE_TEST_COUNTS = (182, 55, 42, 250)
PIXEL_DIVISOR = 256.0  # the course divided uint8 pixels by 256 (not 255)
# medmnist 3.0.2's INFO["octmnist"] "url" and "MD5" (tests check they still agree with the installed medmnist).
OCTMNIST_URL = "https://zenodo.org/records/10519652/files/octmnist.npz?download=1"
OCTMNIST_MD5 = "c68d92d5b585d8d81f7112f81e2d0842"
DOWNLOAD_CHOICES = ("auto", "yes", "no")


def npz_filename(size: int = 28) -> str:
    """The file name medmnist 3.x reads for OCTMNIST (``octmnist.npz`` for 28x28, ``octmnist_64.npz``...)."""
    return "octmnist.npz" if size == 28 else f"octmnist_{size}.npz"


def default_root() -> str:
    from medmnist.info import DEFAULT_ROOT

    return DEFAULT_ROOT


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def ensure_npz(root: str | None = None, download: str = "auto", *, url: str = OCTMNIST_URL,
               md5: Optional[str] = OCTMNIST_MD5, progress: bool = True, log: Callable[[str], None] = print) -> str:
    """Path of a checked ``<root>/octmnist.npz``.

    ``download``: "auto" uses the file when it passes its MD5 check and downloads it when it is missing or
    fails (a corrupt file is replaced); "yes" downloads it again even when present (replacing the old copy
    only once the new one is verified); "no" never downloads: a missing or failing file is an error that
    says which flag to change.
    """
    from experiments.common.download import download as fetch
    from experiments.common.download import verify_file
    from experiments.common.errors import DataMissingError
    from experiments.common.locking import exclusive

    if download not in DOWNLOAD_CHOICES:
        raise ValueError(f"download must be one of {DOWNLOAD_CHOICES}, got {download!r}")
    root = os.path.expanduser(root or default_root())
    os.makedirs(root, exist_ok=True)  # medmnist refuses a missing root
    path = os.path.join(root, npz_filename(28))
    with exclusive(path + ".lock", f"preparing {path}", log):
        if download == "no":
            if not os.path.exists(path):
                raise DataMissingError(f"{path} not found; pass --download auto to fetch it, or --data-root with the folder "
                                       "that holds octmnist.npz")
            verify_file(path, md5=md5, progress=progress,
                        hint="delete it and rerun with --download auto, or pass --checksum none for a local or synthetic copy")
        else:
            fetch(url, path, md5=md5, force=download == "yes", progress=progress, log=log)
    return path


def _read_split(path: str, split: str, limit: int | None) -> Split:
    from medmnist import OCTMNIST

    from experiments.common.errors import ExperimentError

    try:
        ds = OCTMNIST(split=split, root=os.path.dirname(path), download=False)
        # ds.imgs / ds.labels are the npz arrays; len(ds) would assert the official sizes, so avoid it.
        imgs, labels = ds.imgs, ds.labels
        if limit is not None:
            imgs, labels = imgs[:limit], labels[:limit]
        imgs = np.ascontiguousarray(imgs)
        labels = np.asarray(labels)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise ExperimentError(f"{path} cannot be read as OCTMNIST's npz ({type(e).__name__}: {' '.join(str(e).split())}); "
                              "delete it and rerun with --download auto") from e
    if imgs.dtype != np.uint8 or imgs.ndim != 3 or imgs.shape[1:] != (28, 28):
        raise ExperimentError(f"{path}: {split}_images are {imgs.dtype} {imgs.shape}, expected uint8 [N, 28, 28]")
    labels = labels.reshape(-1).astype(np.int64)
    return Split(torch.from_numpy(imgs.copy()), torch.from_numpy(labels))


def load_split(split: str, root: str | None = None, download: str = "auto", limit: int | None = None, *,
               url: str = OCTMNIST_URL, md5: Optional[str] = OCTMNIST_MD5, progress: bool = False) -> Split:
    """Load one split with ``medmnist.OCTMNIST`` from the file :func:`ensure_npz` checked (or fetched).

    ``limit`` keeps the first N images (dataset order).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    return _read_split(ensure_npz(root, download, url=url, md5=md5, progress=progress), split, limit)


def load_octmnist(root=None, download="auto", limits=None, *, url: str = OCTMNIST_URL, md5: Optional[str] = OCTMNIST_MD5,
                  progress: bool = True) -> dict[str, Split]:
    """All three splits; the file is checked (or fetched) once."""
    limits = limits or {}
    path = ensure_npz(root, download, url=url, md5=md5, progress=progress)
    return {s: _read_split(path, s, limits.get(s)) for s in SPLITS}


def to_inputs(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28] divided by 256 (exact in float32, as in the course)."""
    return images_u8.to(torch.float32).div_(PIXEL_DIVISOR).unsqueeze(1)


def course_test_subset(labels, counts=COURSE_TEST_COUNTS) -> np.ndarray:
    """Indices of the course's class-ordered test subset: the first ``counts[c]`` images of class ``c``
    in dataset order, class 0's first, then class 1's, ...  Fewer are taken where a class has fewer."""
    labels = np.asarray(labels).reshape(-1)
    parts = [np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
