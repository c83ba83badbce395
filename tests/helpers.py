"""Test helpers: seeded random inputs, float64 references, readable case ids."""
from __future__ import annotations

import itertools
import zlib

import torch

from linattn_cuda.ops.taylor import naive as ref


def seed_for(*parts) -> int:
    """A stable per-case seed, so each case draws its own fresh inputs (never zeros)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def make_inputs(b, h, lq, lk, d, dv, *, dtype=torch.float32, device="cpu", seed=0, mask=None, requires_grad=False):
    """q, k, v (and a key padding mask when ``mask`` is 'random' or 'full-row') with standard normal entries."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, lk, dv, generator=gen, dtype=torch.float64)
    key_padding_mask = None
    if mask is not None:
        key_padding_mask = torch.rand(b, lk, generator=gen) < 0.3
        key_padding_mask[0, : min(3, lk)] = True  # causal rows 0..2 of batch 0 see only padding
        if mask == "full-row" and b > 1:
            key_padding_mask[1] = True  # every query of batch 1 sees only padding
        key_padding_mask = key_padding_mask.to(device)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return (*tensors, key_padding_mask)


def reference_out(q, k, v, *, causal, scale=None, key_padding_mask=None):
    """The float64 quadratic-form reference."""
    return ref.taylor_attention_quadratic(
        q.detach().double(), k.detach().double(), v.detach().double(),
        causal=causal, scale=scale, key_padding_mask=key_padding_mask,
    )


def reference_grads(q, k, v, grad_out, *, causal, scale=None, key_padding_mask=None):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = ref.taylor_attention_quadratic(q64, k64, v64, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    return torch.autograd.grad(out, (q64, k64, v64), grad_out.double())


def max_rel_err(a, b) -> float:
    """max |a - b| / max(1, max |b|): a relative error that is safe where b is small."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def case_id(**kw) -> str:
    return "-".join(f"{k}{v}" for k, v in kw.items())


def grid(**axes):
    keys = list(axes)
    for values in itertools.product(*(axes[k] for k in keys)):
        yield dict(zip(keys, values))


def fwd_args(q, k, v, mask=None, causal=False, scale=0.5, *, cu_q=None, cu_k=None, kv0=None, k_sum0=None,
             return_state=False):
    """The arguments of torch.ops.linattn_cuda.taylor_fwd (and the Triton ops of the same signature)."""
    return (q, k, v, mask, cu_q, cu_k, kv0, k_sum0, causal, scale, return_state)


def bwd_args(grad_out, q, k, v, out, den, mask=None, causal=False, scale=0.5, *, cu_q=None, cu_k=None, kv0=None,
             k_sum0=None, grad_kv=None, grad_k_sum=None):
    """The arguments of torch.ops.linattn_cuda.taylor_bwd."""
    return (grad_out, grad_kv, grad_k_sum, q, k, v, mask, cu_q, cu_k, kv0, k_sum0, out, den, causal, scale)
