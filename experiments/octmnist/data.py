"""OCTMNIST loading through medmnist's ``OCTMNIST`` class, the pixel scaling and the course's test subset."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

SPLITS = ("train", "val", "test")
# The course evaluated on a class-ordered subset: the first 182/55/42/250 test images of classes 0..3.
COURSE_TEST_COUNTS = (182, 55, 42, 250)
PIXEL_DIVISOR = 256.0  # the course divided uint8 pixels by 256 (not 255)


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


def load_split(split: str, root: str | None = None, download: str = "auto", limit: int | None = None) -> Split:
    """Load one split with ``medmnist.OCTMNIST``.

    ``download``: "auto" uses the file under ``root`` when it exists (without medmnist's MD5 check,
    so a local or synthetic copy works) and downloads it otherwise; "yes" always lets medmnist
    download/verify; "no" never downloads.  ``limit`` keeps the first N images (dataset order).
    """
    from medmnist import OCTMNIST

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    root = os.path.expanduser(root or default_root())
    os.makedirs(root, exist_ok=True)  # medmnist refuses a missing root
    if download == "auto":
        dl = not os.path.exists(os.path.join(root, npz_filename(28)))
    elif download in ("yes", "no"):
        dl = download == "yes"
    else:
        raise ValueError("download must be auto, yes or no")
    ds = OCTMNIST(split=split, root=root, download=dl)
    # ds.imgs / ds.labels are the npz arrays; len(ds) would assert the official sizes, so avoid it.
    imgs, labels = ds.imgs, ds.labels
    if limit is not None:
        imgs, labels = imgs[:limit], labels[:limit]
    imgs = np.ascontiguousarray(imgs)
    if imgs.dtype != np.uint8 or imgs.ndim != 3 or imgs.shape[1:] != (28, 28):
        raise ValueError(f"expected uint8 [N,28,28] images, got {imgs.dtype} {imgs.shape}")
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    return Split(torch.from_numpy(imgs.copy()), torch.from_numpy(labels))


def load_octmnist(root=None, download="auto", limits=None) -> dict[str, Split]:
    limits = limits or {}
    return {s: load_split(s, root, download, limits.get(s)) for s in SPLITS}


def to_inputs(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28] divided by 256 (exact in float32, as in the course)."""
    return images_u8.to(torch.float32).div_(PIXEL_DIVISOR).unsqueeze(1)


def course_test_subset(labels, counts=COURSE_TEST_COUNTS) -> np.ndarray:
    """Indices of the course's class-ordered test subset: the first ``counts[c]`` images of class ``c``
    in dataset order, class 0's first, then class 1's, ...  Fewer are taken where a class has fewer."""
    labels = np.asarray(labels).reshape(-1)
    parts = [np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
