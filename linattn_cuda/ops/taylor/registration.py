"""Fake (meta) kernels and autograd of the Taylor op family, shared by the compiled ops
``torch.ops.linattn_cuda.taylor_*`` (schemas in csrc/ops.cpp) and the Triton ops ``triton_*`` (same signatures):
one shape rule and one backward formula for every backend.

    fwd(q, k, v, key_padding_mask?, cu_seqlens_q?, cu_seqlens_k?, kv0?, k_sum0?, causal, scale, return_state)
        -> (out, den, kv, k_sum)
    bwd(grad_out, grad_kv?, grad_k_sum?, q, k, v, key_padding_mask?, cu_seqlens_q?, cu_seqlens_k?, kv0?, k_sum0?,
        out, den, causal, scale) -> (grad_q, grad_k, grad_v, grad_kv0, grad_k_sum0)
    step(q, k, v, kv, k_sum, scale) -> (out, kv_out, k_sum_out)

Dense q ``[B, H, Lq, D]`` or packed ``[Tq, H, D]`` (with cu_seqlens); ``den`` has q's shape without D; ``kv [N, Hkv, M,
Dv]`` and ``k_sum [N, Hkv, M]`` (empty unless ``return_state``); the gradients of kv0 / k_sum0 are empty without
them. ``den`` is not differentiable; ``kv`` and ``k_sum`` are (their gradients reach k, v and the initial state).
"""
from __future__ import annotations

import torch

from ..._extension import extension_loaded

__all__ = ["fwd_fake", "bwd_fake", "step_fake", "register_autograd"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _state_dtype(q, kv0):
    return kv0.dtype if kv0 is not None else _acc_dtype(q.dtype)


def fwd_fake(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, kv0, k_sum0, causal, scale, return_state, *extra):
    packed = cu_seqlens_q is not None
    torch._check(q.dim() == (3 if packed else 4), lambda: "q must be [Tq, H, D] (packed) or [B, H, Lq, D]")
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    den = q.new_empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))
    sd = _state_dtype(q, kv0)
    if return_state:
        n = cu_seqlens_q.shape[0] - 1 if packed else q.shape[0]
        d = q.shape[-1]
        m = 1 + d + d * (d + 1) // 2
        kv = q.new_empty(n, k.shape[1], m, v.shape[-1], dtype=sd)
        k_sum = q.new_empty(n, k.shape[1], m, dtype=sd)
    else:
        kv, k_sum = q.new_empty(0, dtype=sd), q.new_empty(0, dtype=sd)
    return out, den, kv, k_sum


def bwd_fake(grad_out, grad_kv, grad_k_sum, q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, kv0, k_sum0,
             out, den, causal, scale, *extra):
    # gradients are contiguous whatever the input strides (every backend)
    sd = _state_dtype(q, kv0)
    dkv0 = kv0.new_empty(kv0.shape) if kv0 is not None else q.new_empty(0, dtype=sd)
    dks0 = k_sum0.new_empty(k_sum0.shape) if k_sum0 is not None else q.new_empty(0, dtype=sd)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dkv0, dks0


def step_fake(q, k, v, kv, k_sum, scale, *extra):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), kv.new_empty(kv.shape), k_sum.new_empty(k_sum.shape)


def register_autograd(fwd_name: str, bwd_op, register=None) -> None:
    """Autograd of the forward op ``fwd_name`` through the backward op ``bwd_op`` (same signatures as taylor_fwd /
    taylor_bwd, plus any trailing ``extra`` arguments of both, e.g. a Triton form switch). ``register``: the
    registration function (``torch.library.register_autograd`` or a triton_op's ``register_autograd``)."""

    def setup_context(ctx, inputs, output):
        q, k, v, mask, cu_q, cu_k, kv0, ks0, causal, scale, return_state, *extra = inputs
        out, den, _, _ = output
        ctx.save_for_backward(q, k, v, mask, cu_q, cu_k, kv0, ks0, out, den)
        ctx.causal, ctx.scale, ctx.return_state, ctx.extra = causal, scale, return_state, tuple(extra)
        ctx.mark_non_differentiable(den)
        if not return_state:
            ctx.mark_non_differentiable(output[2], output[3])

    def backward(ctx, grad_out, grad_den, grad_kv, grad_k_sum):
        q, k, v, mask, cu_q, cu_k, kv0, ks0, out, den = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if not ctx.return_state or (grad_kv is None and grad_k_sum is None):
            grad_kv = grad_k_sum = None
        else:
            zero_kv, zero_ks = _like_state(q, k, v, cu_q, kv0)
            grad_kv = zero_kv if grad_kv is None else grad_kv
            grad_k_sum = zero_ks if grad_k_sum is None else grad_k_sum
        dq, dk, dv, dkv0, dks0 = bwd_op(grad_out, grad_kv, grad_k_sum, q, k, v, mask, cu_q, cu_k, kv0, ks0, out, den,
                                        ctx.causal, ctx.scale, *ctx.extra)
        if kv0 is None:
            dkv0 = dks0 = None
        return (dq, dk, dv, None, None, None, dkv0, dks0, None, None, None) + (None,) * len(ctx.extra)

    (register or (lambda fn, **kw: torch.library.register_autograd(fwd_name, fn, **kw)))(backward, setup_context=setup_context)


def _like_state(q, k, v, cu_q, kv0):
    """An empty (zero) state gradient of the right shape: [N, Hkv, M, Dv]."""
    n = cu_q.shape[0] - 1 if cu_q is not None else q.shape[0]
    d = q.shape[-1]
    m = 1 + d + d * (d + 1) // 2
    sd = _state_dtype(q, kv0)
    return q.new_zeros(n, k.shape[1], m, v.shape[-1], dtype=sd), q.new_zeros(n, k.shape[1], m, dtype=sd)


if extension_loaded():
    torch.library.register_fake("linattn_cuda::taylor_fwd")(fwd_fake)
    torch.library.register_fake("linattn_cuda::taylor_bwd")(bwd_fake)
    torch.library.register_fake("linattn_cuda::taylor_step")(step_fake)
    register_autograd("linattn_cuda::taylor_fwd", lambda *a: torch.ops.linattn_cuda.taylor_bwd(*a))
