"""The Triton kernels as custom ops ``torch.ops.linattn_cuda.triton_*`` (``torch.library.triton_op``).

``triton_op`` + ``wrap_triton`` make the kernels visible to torch.compile (no graph break; Inductor sees
the kernel launches) and give every op a fake (meta) implementation traced from the same Python code.

    triton_fwd(q, k, v, key_padding_mask?, causal, scale, chunked) -> (out, Z)      differentiable in q, k, v
    triton_bwd(grad_out, q, k, v, key_padding_mask?, out, Z, causal, scale, chunked) -> (dq, dk, dv)
    triton_prefill(q, k, v, key_padding_mask?, kv?, k_sum?, scale) -> (out, kv, k_sum)   causal, no autograd
    triton_step(q, k, v, kv, k_sum, scale) -> (out, kv, k_sum)                          no autograd

``chunked`` picks the algorithm: False = quadratic (parallel.py), True = chunked linear (chunk.py).
Z is the float32 normalizer sum_j w_ij saved for the backward (not differentiable).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from .chunk import chunk_bwd, chunk_fwd
from .parallel import parallel_bwd, parallel_fwd
from .step import step_fwd

__all__ = ["triton_fwd", "triton_bwd", "triton_prefill", "triton_step"]


@triton_op("linattn_cuda::triton_fwd", mutates_args=())
def triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float, chunked: bool
) -> tuple[Tensor, Tensor]:
    if chunked:
        return chunk_fwd(q, k, v, key_padding_mask, causal, scale)
    return parallel_fwd(q, k, v, key_padding_mask, causal, scale)


@triton_op("linattn_cuda::triton_bwd", mutates_args=())
def triton_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
    out: Tensor, den: Tensor, causal: bool, scale: float, chunked: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if chunked:
        return chunk_bwd(grad_out, q, k, v, key_padding_mask, out, den, causal, scale)
    return parallel_bwd(grad_out, q, k, v, key_padding_mask, out, den, causal, scale)


@triton_op("linattn_cuda::triton_prefill", mutates_args=())
def triton_prefill(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
    kv: Optional[Tensor], k_sum: Optional[Tensor], scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    initial = None if kv is None else (kv, k_sum)
    out, _, kv1, ks1 = chunk_fwd(q, k, v, key_padding_mask, True, scale, initial_state=initial, write_state=True)
    return out, kv1, ks1


@triton_op("linattn_cuda::triton_step", mutates_args=())
def triton_step(q: Tensor, k: Tensor, v: Tensor, kv: Tensor, k_sum: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return step_fwd(q, k, v, kv, k_sum, scale)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, chunked = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, den)
    ctx.causal = causal
    ctx.scale = scale
    ctx.chunked = chunked
    ctx.mark_non_differentiable(den)


def _backward(ctx, grad_out, grad_den):
    q, k, v, key_padding_mask, out, den = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.linattn_cuda.triton_bwd(
        grad_out, q, k, v, key_padding_mask, out, den, ctx.causal, ctx.scale, ctx.chunked
    )
    return dq, dk, dv, None, None, None, None


triton_fwd.register_autograd(_backward, setup_context=_setup_context)
