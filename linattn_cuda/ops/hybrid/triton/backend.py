"""``backend="triton"`` of the hybrid attention: the adapter between linattn_cuda.ops.hybrid.functions and the
custom ops of ops.py. CUDA tensors (CPU tensors under TRITON_INTERPRET=1, for tests); float16, bfloat16, float32
inputs with D <= 128 and Dv <= 256; the decoding cache in float32."""
from __future__ import annotations

import torch

from ..cache import HybridCache, cache_from_prompt

__all__ = ["unavailable_reason", "dtype_problem", "attention", "prefill", "step"]

MAX_HEAD_DIM = 128
MAX_VALUE_DIM = 256


def unavailable_reason(device) -> str | None:
    device = torch.device(device)
    try:
        from ...taylor.triton import common
    except ImportError as exc:
        return f"triton could not be imported ({exc})"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if common.INTERPRET:
            return None
        return ("the Triton kernels run on CUDA tensors; CPU tensors need Triton's interpreter "
                "(TRITON_INTERPRET=1 set before triton is imported)")
    return f"the 'triton' backend takes cuda tensors (cpu under TRITON_INTERPRET=1), got {device.type}"


def dtype_problem(dtype) -> str | None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32 inputs, got {dtype}"
    return None


def _check(q, v) -> None:
    d, dv = q.shape[-1], v.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"backend 'triton' supports q/k feature dim D <= {MAX_HEAD_DIM} for hybrid attention, got {d}")
    if dv > MAX_VALUE_DIM:
        raise ValueError(f"backend 'triton' supports value dim Dv <= {MAX_VALUE_DIM} for hybrid attention, got {dv}")


def attention(q, k, v, *, window, causal, scale, key_padding_mask, far_weight):
    from . import ops  # noqa: F401  (registers torch.ops.linattn_cuda.hybrid_triton_*)

    _check(q, v)
    out, _ = torch.ops.linattn_cuda.hybrid_triton_fwd(q, k, v, key_padding_mask, far_weight, int(window),
                                                      bool(causal), float(scale))
    return out


def prefill(q, k, v, *, window, scale, key_padding_mask, far_weight):
    from . import ops  # noqa: F401
    from ...taylor.state import TaylorState

    _check(q, v)
    out, kv, k_sum = torch.ops.linattn_cuda.hybrid_triton_prefill(q, k, v, key_padding_mask, far_weight, int(window),
                                                                  float(scale))
    return out, cache_from_prompt(k, v, key_padding_mask, window, TaylorState(kv, k_sum))


def step(q, k, v, cache: HybridCache, *, scale, key_padding_mask, far_weight):
    from . import ops  # noqa: F401

    _check(q, v)
    if cache.state.kv.dtype != torch.float32:
        raise TypeError(f"backend 'triton' keeps the decoding cache in float32, got {cache.state.kv.dtype}")
    for name, t in (("keys", cache.keys), ("values", cache.values), ("key_padding", cache.key_padding),
                    ("state.kv", cache.state.kv), ("state.k_sum", cache.state.k_sum), ("position", cache.position)):
        if not t.is_contiguous():
            raise ValueError(f"cache.{name} must be contiguous (it is updated in place)")
    kv, k_sum = cache.state
    return torch.ops.linattn_cuda.hybrid_triton_step(q, k, v, key_padding_mask, cache.keys, cache.values,
                                                      cache.key_padding, kv, k_sum, cache.position, far_weight,
                                                      float(scale))
