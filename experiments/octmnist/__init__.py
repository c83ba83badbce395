"""OCTMNIST CNN experiment (course homework 2, Q2; SPEC §3).  Run: ``python -m experiments.octmnist``.

Modules: ``data`` (medmnist loading, course test subset), ``model`` (``CNN``), ``train`` (one
configuration, checkpoints, resume), ``dist`` (device / torchrun), ``report`` (JSON, tables, plots),
``cli`` (the sweep), ``synthetic`` (a small fake ``octmnist.npz`` for tests and smoke runs).
"""
from .data import COURSE_TEST_COUNTS, course_test_subset, load_octmnist, load_split, npz_filename
from .model import CNN, build_model, count_trainable_parameters

__all__ = ["CNN", "build_model", "count_trainable_parameters", "course_test_subset", "load_octmnist",
           "load_split", "npz_filename", "COURSE_TEST_COUNTS"]
