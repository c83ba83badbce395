"""Write a small synthetic ``octmnist.npz`` in medmnist's on-disk format (for tests and smoke runs).

The class is encoded as a bright 6x6 patch in one of the four quadrants over uniform noise, so the
CNN can learn it in a few hundred steps.  Usage:
    python -m experiments.octmnist.synthetic --out data/octmnist-synthetic [--train 800 --val 200 --test 200]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from .data import npz_filename

_QUADRANT_ORIGIN = ((3, 3), (3, 19), (19, 3), (19, 19))


def make_split(n: int, rng: np.random.Generator, noise: int = 120, label_noise: float = 0.0):
    labels = rng.integers(0, 4, size=n).astype(np.uint8)
    imgs = rng.integers(0, noise, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, q = _QUADRANT_ORIGIN[c]
        imgs[i, r:r + 6, q:q + 6] = 255
    if label_noise:
        flip = rng.random(n) < label_noise
        labels[flip] = rng.integers(0, 4, size=int(flip.sum()))
    return imgs, labels.reshape(n, 1)


def write_synthetic_npz(root: str, n_train=800, n_val=200, n_test=200, seed=0, label_noise=0.0) -> str:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        imgs, labels = make_split(n, rng, label_noise=label_noise)
        arrays[f"{split}_images"] = imgs
        arrays[f"{split}_labels"] = labels
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, npz_filename(28))
    np.savez_compressed(path, **arrays)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0)
    a = p.parse_args(argv)
    print(write_synthetic_npz(a.out, a.train, a.val, a.test, a.seed, a.label_noise))


if __name__ == "__main__":
    main()
