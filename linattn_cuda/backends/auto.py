"""``backend="auto"``: the fastest available backend for the tensors' device and shape.

CPU: the C++ kernels when the extension is built, else the reference.
CUDA: the CUDA kernels or Triton, whichever measured faster for the shape (see bench/results), else reference.
"""
from __future__ import annotations

import torch


def choose_backend(q: torch.Tensor, *, causal: bool, kind: str = "attention") -> str:
    from . import unavailable_reason

    if q.device.type == "cuda":
        # Triton kernels take fp16/bf16/fp32 only (and decoding states are fp32)
        order = ("cuda", "reference") if q.dtype == torch.float64 else ("cuda", "triton", "reference")
    else:
        order = ("cpu", "reference")
    for name in order:
        if unavailable_reason(name, q.device) is None:
            return name
    return "reference"
