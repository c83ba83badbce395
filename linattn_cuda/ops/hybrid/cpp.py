"""The ``cpu`` backend of the hybrid attention: the C++ kernels of csrc/cpu/hybrid_cpu.cpp behind
``torch.ops.linattn_cuda.hybrid_*`` (schemas in csrc/ops.cpp), with their fake kernels (torch.compile) and the
autograd of ``hybrid_fwd``.

    hybrid_fwd(q, k, v, key_padding_mask?, far_weight?, cu_seqlens?, window, causal, scale) -> (out, lse)
        differentiable in q, k, v and far_weight; packed [T, H, *] sequences with cu_seqlens (lse [H, T])
    hybrid_bwd(grad_out, q, k, v, key_padding_mask?, far_weight?, cu_seqlens?, out, lse, window, causal, scale)
        -> (dq, dk, dv, d_far_weight)
    hybrid_prefill(q, k, v, key_padding_mask?, far_weight?, window, scale) -> (out, kv, k_sum)   causal, no autograd
    hybrid_step(q, k, v, key_padding_mask?, ring_k!, ring_v!, ring_pad!, kv!, k_sum!, position!, far_weight?, scale)
        -> out                                              the cache tensors (!) updated in place, no autograd
"""
from __future__ import annotations

import torch

from ..._extension import EXTENSION_ERROR, REBUILD_HINT, extension_loaded
from ..problem import LIMITS
from ..taylor.state import accumulate_dtype
from .cache import HybridCache, cache_from_prompt

__all__ = ["unavailable_reason", "attention", "prefill", "step", "MAX_HEAD_DIM", "MAX_VALUE_DIM"]

MAX_HEAD_DIM = LIMITS["cpu"].max_head_dim  # the Taylor kernels' limits (ops/problem.py)
MAX_VALUE_DIM = LIMITS["cpu"].max_value_dim


# read once at import (a plain bool keeps the backend choice traceable by torch.compile)
_HAS_OPS = extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("linattn_cuda::hybrid_fwd", "CPU")


def _has_ops() -> bool:
    return _HAS_OPS


def unavailable_reason(device) -> str | None:
    device = torch.device(device)
    if device.type != "cpu":
        return f"the 'cpu' backend takes CPU tensors, got {device.type} tensors"
    if not extension_loaded():
        return f"linattn_cuda._C could not be imported ({EXTENSION_ERROR}); {REBUILD_HINT}"
    if not _has_ops():
        return f"linattn_cuda._C has no hybrid kernels (an older build); {REBUILD_HINT}"
    return None


def _check_limits(q, v) -> None:
    d, dv = q.shape[-1], v.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"backend 'cpu' supports q/k feature dim D <= {MAX_HEAD_DIM} for hybrid attention, got D = {d}")
    if dv > MAX_VALUE_DIM:
        raise ValueError(f"backend 'cpu' supports value dim Dv <= {MAX_VALUE_DIM} for hybrid attention, got Dv = {dv}")


def attention(q, k, v, *, window, causal, scale, key_padding_mask, far_weight, cu_seqlens=None):
    _check_limits(q, v)
    out, _ = torch.ops.linattn_cuda.hybrid_fwd(q, k, v, key_padding_mask, far_weight, cu_seqlens, window, causal,
                                               scale)
    return out


def prefill(q, k, v, *, window, scale, key_padding_mask, far_weight):
    _check_limits(q, v)
    out, kv, k_sum = torch.ops.linattn_cuda.hybrid_prefill(q, k, v, key_padding_mask, far_weight, window, scale)
    from ..taylor.state import TaylorState

    return out, cache_from_prompt(k, v, key_padding_mask, window, TaylorState(kv, k_sum))


def step(q, k, v, cache: HybridCache, *, scale, key_padding_mask, far_weight):
    _check_limits(q, v)
    kv, k_sum = cache.state
    return torch.ops.linattn_cuda.hybrid_step(q, k, v, key_padding_mask, cache.keys, cache.values, cache.key_padding,
                                               kv, k_sum, cache.position, far_weight, scale)


# ----------------------------------------------------------------------------------------------------
# fake kernels and autograd
def _fwd_fake(q, k, v, key_padding_mask, far_weight, cu_seqlens, window, causal, scale):
    acc = accumulate_dtype(q.dtype)
    if cu_seqlens is not None:  # packed: out [T, H, Dv], lse head-major [H, T]
        torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "packed q, k, v must be 3-D")
        return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[1], q.shape[0], dtype=acc)
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D")
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=acc)
    return out, lse


def _bwd_fake(grad_out, q, k, v, key_padding_mask, far_weight, cu_seqlens, out, lse, window, causal, scale):
    fw_dtype = far_weight.dtype if far_weight is not None else accumulate_dtype(q.dtype)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(q.shape[1], dtype=fw_dtype)


def _prefill_fake(q, k, v, key_padding_mask, far_weight, window, scale):
    b, h, length, d = q.shape
    hk, dv = k.shape[1], v.shape[3]
    m = 1 + d + d * (d + 1) // 2
    acc = accumulate_dtype(q.dtype)
    return q.new_empty(b, h, length, dv), q.new_empty(b, hk, m, dv, dtype=acc), q.new_empty(b, hk, m, dtype=acc)


def _step_fake(q, k, v, key_padding_mask, ring_k, ring_v, ring_pad, kv, k_sum, position, far_weight, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, far_weight, cu_seqlens, window, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, far_weight, cu_seqlens, out, lse)
    ctx.window, ctx.causal, ctx.scale = window, causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, far_weight, cu_seqlens, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dfw = torch.ops.linattn_cuda.hybrid_bwd(
        grad_out, q, k, v, key_padding_mask, far_weight, cu_seqlens, out, lse, ctx.window, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, (dfw if far_weight is not None else None), None, None, None, None


if _has_ops():
    torch.library.register_fake("linattn_cuda::hybrid_fwd")(_fwd_fake)
    torch.library.register_fake("linattn_cuda::hybrid_bwd")(_bwd_fake)
    torch.library.register_fake("linattn_cuda::hybrid_prefill")(_prefill_fake)
    torch.library.register_fake("linattn_cuda::hybrid_step")(_step_fake)
    torch.library.register_autograd("linattn_cuda::hybrid_fwd", _backward, setup_context=_setup_context)
