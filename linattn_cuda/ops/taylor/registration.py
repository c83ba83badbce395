"""Python side of the C++/CUDA custom ops ``torch.ops.linattn_cuda.*``: fake (meta) kernels for
torch.compile and autograd for ``taylor_fwd``. The schemas live in csrc/ops.cpp."""
from __future__ import annotations

import torch

from ..._extension import extension_loaded

_ACC = {torch.float64: torch.float64}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return _ACC.get(dtype, torch.float32)


def _fwd_fake(q, k, v, key_padding_mask, causal, scale):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D")
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    den = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=_acc_dtype(q.dtype))
    return out, den


def _bwd_fake(grad_out, q, k, v, key_padding_mask, out, den, causal, scale):
    # the CPU and CUDA kernels return contiguous gradients whatever the input strides
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _prefill_fake(q, k, v, key_padding_mask, kv, k_sum, scale):
    b, h, _, d = q.shape
    hk = k.shape[1]  # the state has the key/value heads
    m = 1 + d + d * (d + 1) // 2
    acc = kv.dtype if kv is not None else _acc_dtype(q.dtype)
    out = q.new_empty(b, h, q.shape[2], v.shape[3])
    return out, q.new_empty(b, hk, m, v.shape[3], dtype=acc), q.new_empty(b, hk, m, dtype=acc)


# Packed varlen ops: q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv]; den [H, Tq]; state [N, Hkv, M, Dv].
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale):
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "q, k, v must be 3-D ([T, H, *])")
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    return out, q.new_empty(q.shape[1], q.shape[0], dtype=_acc_dtype(q.dtype))


def _varlen_bwd_fake(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, out, den, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_prefill_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, kv, k_sum, scale):
    n, hk, d = cu_seqlens_q.shape[0] - 1, k.shape[1], q.shape[2]
    m = 1 + d + d * (d + 1) // 2
    acc = kv.dtype if kv is not None else _acc_dtype(q.dtype)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    return out, q.new_empty(n, hk, m, v.shape[2], dtype=acc), q.new_empty(n, hk, m, dtype=acc)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, out, den)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(den)


def _varlen_backward(ctx, grad_out, grad_den):
    q, k, v, cu_seqlens_q, cu_seqlens_k, out, den = ctx.saved_tensors
    dq, dk, dv = torch.ops.linattn_cuda.taylor_varlen_bwd(
        grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, out, den, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


def _step_fake(q, k, v, kv, k_sum, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), kv.new_empty(kv.shape), k_sum.new_empty(k_sum.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, den)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(den)


def _backward(ctx, grad_out, grad_den):
    q, k, v, key_padding_mask, out, den = ctx.saved_tensors
    dq, dk, dv = torch.ops.linattn_cuda.taylor_bwd(
        grad_out, q, k, v, key_padding_mask, out, den, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, None


if extension_loaded():
    torch.library.register_fake("linattn_cuda::taylor_fwd")(_fwd_fake)
    torch.library.register_fake("linattn_cuda::taylor_bwd")(_bwd_fake)
    torch.library.register_fake("linattn_cuda::taylor_prefill")(_prefill_fake)
    torch.library.register_fake("linattn_cuda::taylor_step")(_step_fake)
    torch.library.register_autograd("linattn_cuda::taylor_fwd", _backward, setup_context=_setup_context)
    torch.library.register_fake("linattn_cuda::taylor_varlen_fwd")(_varlen_fwd_fake)
    torch.library.register_fake("linattn_cuda::taylor_varlen_bwd")(_varlen_bwd_fake)
    torch.library.register_fake("linattn_cuda::taylor_varlen_prefill")(_varlen_prefill_fake)
    torch.library.register_autograd(
        "linattn_cuda::taylor_varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context
    )
