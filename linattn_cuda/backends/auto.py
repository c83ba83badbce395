"""``backend="auto"``: the fastest available backend for the tensors' device, dtype and use.

CPU: the C++ kernels when the extension is built, else the reference.
CUDA, from the H200 measurements in bench/results/gpu/triton_gpu_bench.md (bf16, B=16, H=16, D=16, Dv=64):
  * forward only (inference, prefill): the CUDA kernels (causal L=8192: 2.40 ms vs Triton 6.2 ms);
  * forward + backward (inputs need grad): Triton (causal L=8192: 17.8 ms vs CUDA 20.8 ms; non-causal 12.3 vs 18.4);
  * decode step: Triton (B*H=4096: 0.095 ms vs CUDA 0.160 ms);
  * float64: the CUDA kernels (Triton takes fp16/bf16/fp32 only), else the reference.
"""
from __future__ import annotations

import torch


def choose_backend(q: torch.Tensor, *, causal: bool, kind: str = "attention", training: bool = False,
                   needs: frozenset = frozenset()) -> str:
    """The first available backend of the rule below that has every feature in ``needs`` (grouped-query
    attention, end-aligned causal with Lq < Lk, varlen: today the cpu kernels and the reference)."""
    from . import backend_features, unavailable_reason

    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            order = ("cuda", "reference")
        elif kind == "step" or (kind == "attention" and training):
            order = ("triton", "cuda", "reference")
        else:
            order = ("cuda", "triton", "reference")
    else:
        order = ("cpu", "reference")
    for name in order:
        if unavailable_reason(name, q.device) is None and set(needs) <= backend_features(name):
            return name
    return "reference"
