"""Shared test setup. Triton kernels run on CPU tensors through the interpreter when there is no GPU; the
variable must be set before triton is first imported, hence here."""
import os
import tempfile

import torch

# A fresh inductor cache per run: compiled graphs must reflect the current fake kernels.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="linattn-inductor-"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    # LINATTN_TEST_EMULATE=1: tests/test_cuda.py runs on the CPU through the CUDA emulator (csrc/cuda/emu)
    emulate = os.environ.get("LINATTN_TEST_EMULATE", "0") not in ("", "0")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (emulate and item.path.name == "test_cuda.py"):
            item.add_marker(skip_gpu)
