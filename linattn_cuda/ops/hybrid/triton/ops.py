"""The Triton kernels of the hybrid attention as custom ops ``torch.ops.linattn_cuda.hybrid_triton_*``
(``torch.library.triton_op``: visible to torch.compile, no graph break; fake kernels traced from the same code).

    hybrid_triton_fwd(q, k, v, key_padding_mask?, far_weight?, window, causal, scale) -> (out, lse)
        differentiable in q, k, v and far_weight (backward: hybrid_triton_bwd)
    hybrid_triton_bwd(grad_out, q, k, v, key_padding_mask?, far_weight?, out, lse, window, causal, scale)
        -> (dq, dk, dv, d_far_weight)
    hybrid_triton_prefill(q, k, v, key_padding_mask?, far_weight?, window, scale) -> (out, kv, k_sum)   causal
    hybrid_triton_step(q, k, v, key_padding_mask?, ring_k!, ring_v!, ring_pad!, kv!, k_sum!, position!,
                       far_weight?, scale) -> out                       the cache tensors (!) updated in place

Shapes and meanings as the C++ ops (csrc/ops.cpp). A forward is two kernels: far.py adds the Taylor part's raw
sums into float32 [B, H, L, Dv] and [B, H, L] buffers (the forward walk, and for non-causal the reverse one), then
band.py runs the window and the one normalizer; the backward runs band.py's and far.py's backward kernels into
float32 gradient buffers.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import triton_op

from ....feature_map import feature_dim
from ...taylor.triton.common import dot_mode, new_output
from .band import BAND_BLOCK, band_bwd, band_fwd
from .far import far_bwd, far_fwd
from .step import step_fwd

__all__ = ["hybrid_triton_fwd", "hybrid_triton_bwd", "hybrid_triton_prefill", "hybrid_triton_step"]


def _mask_u8(key_padding_mask):
    return None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)


def _far_weight(far_weight):
    return None if far_weight is None else far_weight.to(torch.float32).contiguous()


def _forward(q, k, v, key_padding_mask, far_weight, window, causal, scale, state=None):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, length, _ = q.shape
    dv = v.shape[3]
    mask = _mask_u8(key_padding_mask)
    num = torch.zeros(b, h, length, dv, dtype=torch.float32, device=q.device)
    den = torch.zeros(b, h, length, dtype=torch.float32, device=q.device)
    mode = dot_mode(q.dtype, chunked=True)
    if length > window or state is not None:  # some key lies beyond a window (the prefill always writes the state)
        far_fwd(q, k, v, mask, num, den, window=window, scale=scale, reverse=False, mode=mode, state=state)
        if not causal:
            far_fwd(q, k, v, mask, num, den, window=window, scale=scale, reverse=True, mode=mode)
    out = new_output((b, h, length, dv), q.dtype, q.device)
    lse = new_output((b, h, length), torch.float32, q.device)
    band_fwd(q, k, v, mask, num, den, _far_weight(far_weight), out, lse, window=window, causal=causal, scale=scale,
             mode=dot_mode(q.dtype))
    return out, lse


@triton_op("linattn_cuda::hybrid_triton_fwd", mutates_args=())
def hybrid_triton_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                      far_weight: Optional[Tensor], window: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, key_padding_mask, far_weight, window, causal, scale)


def _far_scale(lse, key_padding_mask, far_weight, window: int, causal: bool):
    """fw e^(-lse) of every row that has an unpadded key beyond its window, 0 elsewhere ([B, H, L] float32)."""
    b, h, length = lse.shape
    pos = torch.arange(length, device=lse.device)
    if key_padding_mask is None:
        first = torch.zeros(b, 1, dtype=torch.long, device=lse.device)
        last = torch.full((b, 1), length - 1, dtype=torch.long, device=lse.device)
    else:
        valid = ~key_padding_mask
        idx = torch.where(valid, pos, length)
        first = idx.amin(1, keepdim=True)
        last = torch.where(valid, pos, -1).amax(1, keepdim=True)
    has_far = first <= pos - window
    if not causal:
        has_far = has_far | (last >= pos + window)
    fw = torch.ones(h, device=lse.device) if far_weight is None else far_weight.to(torch.float32)
    scale = fw.view(1, h, 1) * torch.exp(-lse)
    return torch.where(has_far[:, None, :], scale, 0.0).contiguous()


@triton_op("linattn_cuda::hybrid_triton_bwd", mutates_args=())
def hybrid_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                      far_weight: Optional[Tensor], out: Tensor, lse: Tensor, window: int, causal: bool,
                      scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, lse = grad_out.contiguous(), lse.contiguous()
    b, h, length, d = q.shape
    mask = _mask_u8(key_padding_mask)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    f32 = torch.float32
    dq = torch.zeros(q.shape, dtype=f32, device=q.device)
    dk = torch.zeros(k.shape, dtype=f32, device=q.device)
    dv = torch.zeros(v.shape, dtype=f32, device=q.device)
    blocks = triton.cdiv(length, BAND_BLOCK)
    window_sum = torch.zeros(b * h, blocks, dtype=f32, device=q.device)
    band_bwd(q, k, v, mask, grad_out, delta, lse, dq, dk, dv, window_sum, window=window, causal=causal, scale=scale,
             mode=dot_mode(q.dtype))
    if length > window:
        fs = _far_scale(lse, key_padding_mask, far_weight, window, causal)
        mode = dot_mode(q.dtype, chunked=True)
        far_bwd(q, k, v, mask, grad_out, delta, fs, dq, dk, dv, window=window, scale=scale, reverse=False, mode=mode)
        if not causal:
            far_bwd(q, k, v, mask, grad_out, delta, fs, dq, dk, dv, window=window, scale=scale, reverse=True, mode=mode)
    if far_weight is not None:
        dfw = (-window_sum.view(b, h, blocks).sum((0, 2)) / far_weight.to(f32)).to(far_weight.dtype)
    else:
        dfw = torch.zeros(h, dtype=f32, device=q.device)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dfw


@triton_op("linattn_cuda::hybrid_triton_prefill", mutates_args=())
def hybrid_triton_prefill(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                          far_weight: Optional[Tensor], window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, hk, d, dv = q.shape[0], k.shape[1], q.shape[3], v.shape[3]
    m = feature_dim(int(d))
    kv = new_output((b, hk, m, dv), torch.float32, q.device)
    k_sum = new_output((b, hk, m), torch.float32, q.device)
    out, _ = _forward(q, k, v, key_padding_mask, far_weight, window, True, scale, state=(kv, k_sum))
    return out, kv, k_sum


@triton_op("linattn_cuda::hybrid_triton_step",
           mutates_args=("ring_k", "ring_v", "ring_pad", "kv", "k_sum", "position"))
def hybrid_triton_step(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], ring_k: Tensor,
                       ring_v: Tensor, ring_pad: Tensor, kv: Tensor, k_sum: Tensor, position: Tensor,
                       far_weight: Optional[Tensor], scale: float) -> Tensor:
    return step_fwd(q.contiguous(), k.contiguous(), v.contiguous(),
                    None if key_padding_mask is None else key_padding_mask.contiguous(), ring_k, ring_v, ring_pad,
                    kv, k_sum, position, _far_weight(far_weight), scale)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, far_weight, window, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, far_weight, out, lse)
    ctx.window, ctx.causal, ctx.scale = window, causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, far_weight, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dfw = torch.ops.linattn_cuda.hybrid_triton_bwd(
        grad_out, q, k, v, key_padding_mask, far_weight, out, lse, ctx.window, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, (dfw if far_weight is not None else None), None, None, None


hybrid_triton_fwd.register_autograd(_backward, setup_context=_setup_context)
