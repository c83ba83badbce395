"""Public functions of the hybrid attention: ``hybrid_attention``, ``hybrid_attention_prefill`` and
``hybrid_attention_step``, with their argument checks and the backend choice.

Backends (``backend=``):
    "cpu"        the fused C++ kernels (csrc/cpu/hybrid_cpu.cpp; CPU tensors),
    "triton"     the fused Triton kernels (linattn_cuda/ops/hybrid/triton; CUDA tensors, or CPU tensors under
                 TRITON_INTERPRET=1), float16 / bfloat16 / float32,
    "reference"  plain PyTorch, blocked (linattn_cuda/ops/hybrid/blocked.py): every device and dtype, slower,
                 and the only one whose prefill is differentiable,
    "auto"       "cpu" for CPU tensors, "triton" for CUDA tensors. It never falls back to "reference" silently:
                 a call the fused backend cannot serve (no extension, float64 on a GPU, ...) raises an error that
                 says why and names the alternatives.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...feature_map import resolve_scale
from . import blocked
from .cache import HybridCache, check_cache, empty_hybrid_cache
from .checks import check_far_weight, check_hybrid_inputs, check_window

__all__ = ["hybrid_attention", "hybrid_attention_varlen", "hybrid_attention_prefill", "hybrid_attention_step", "empty_hybrid_cache",
           "HybridCache", "hybrid_backends"]

BACKENDS = ("auto", "cpu", "triton", "reference")


def _impl(name: str):
    if name == "cpu":
        from . import cpp

        return cpp
    if name == "triton":
        from .triton import backend

        return backend
    return None


def _unavailable(name: str, q: torch.Tensor) -> Optional[str]:
    if name == "reference":
        return None
    try:
        impl = _impl(name)
    except ImportError as exc:
        return f"import failed: {exc}"
    return impl.unavailable_reason(q.device) or (impl.dtype_problem(q.dtype) if hasattr(impl, "dtype_problem") else None)


def hybrid_backends(device="cpu", dtype=torch.float32) -> list[str]:
    """The backends that can serve hybrid attention for tensors of ``device`` and ``dtype``."""
    q = torch.empty(0, device=device, dtype=dtype)
    return [n for n in BACKENDS[1:] if _unavailable(n, q) is None]


def _resolve(backend, q: torch.Tensor) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for hybrid attention; choose one of {list(BACKENDS)}")
    name = backend
    if name == "auto":
        if q.device.type == "cpu":
            name = "cpu"
        elif q.device.type == "cuda":
            name = "triton"
        else:
            raise ValueError(f"hybrid attention has no fused kernel for {q.device.type} tensors; pass "
                             "backend='reference' (plain PyTorch)")
    reason = _unavailable(name, q)
    if reason is not None:
        via = f" (chosen by backend='auto' for {q.device.type} tensors)" if backend == "auto" else ""
        raise RuntimeError(f"hybrid attention backend {name!r}{via} cannot serve this call: {reason}. "
                           f"backend='reference' computes it in plain PyTorch (slower); available here: "
                           f"{hybrid_backends(q.device, q.dtype)}")
    return name


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window,
    causal: bool = True,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    far_weight: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention with exact softmax weights inside a window of ``window`` keys and the Taylor weight beyond it,
    in one normalizer. Equivalent to (float64 for clarity; :func:`hybrid_attention_reference`)::

        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)    # enable_gqa
        s = scale * q @ k.transpose(-1, -2)                 # scale defaults to 1/sqrt(D)
        inside = (0 <= i - j < W) if causal else (|i - j| < W)
        outside = (i - j >= W) if causal else not inside
        w = where(inside, exp(s), where(outside, far_weight[h] * (1 + s + s**2 / 2), 0))
        w = w.masked_fill(key_padding_mask[:, None, None, :], 0)
        out = (w @ v) / w.sum(-1, keepdim=True)             # 0 where a query sees no unpadded key

    ``q [B, H, L, D]``, ``k [B, Hkv, L, D]``, ``v [B, Hkv, L, Dv]`` (one length), ``key_padding_mask [B, L]`` bool
    (True = padding). ``window``: a positive integer (Python, numpy or torch); W >= L makes it softmax attention.
    ``far_weight [H]``: finite, positive per-head factors of the Taylor weights (None = 1), differentiable.
    ``enable_gqa``: k and v with Hkv heads, H % Hkv == 0, read in place. Linear in L (the window's exact band plus
    the Taylor state of the keys beyond it, in one fused pass); stabilized, so that logits in the hundreds neither
    overflow nor leave the Taylor part as 0/0. Accumulation in float32 (float64 for float64), output in q's dtype.
    ``backend``: "auto", "cpu", "triton" or "reference" (module docstring).
    """
    check_hybrid_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa)
    window = check_window(window)
    far_weight = check_far_weight(far_weight, q.shape[1], q.device)
    scale = resolve_scale(scale, q.shape[-1])
    name = _resolve(backend, q)
    if q.numel() == 0 or q.shape[2] == 0 or name == "reference":
        return blocked.hybrid_attention_blocked(q, k, v, window=window, causal=bool(causal), scale=scale,
                                                key_padding_mask=key_padding_mask, far_weight=far_weight)
    return _impl(name).attention(q, k, v, window=window, causal=bool(causal), scale=scale,
                                 key_padding_mask=key_padding_mask, far_weight=far_weight)


def hybrid_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    window,
    causal: bool = True,
    scale: Optional[float] = None,
    far_weight: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`hybrid_attention` over packed variable-length sequences (the layout of ``flash_attn_varlen_func``).

    ``q [T, H, D]``, ``k [T, Hkv, D]``, ``v [T, Hkv, Dv]`` hold N sequences one after another; ``cu_seqlens``
    (int32 ``[N + 1]``, 0 = cu[0] <= ... <= cu[N] = T) says where each starts. Returns ``out [T, H, Dv]``, equal to
    :func:`hybrid_attention` on each sequence alone (the window and the Taylor part never cross a sequence's
    boundary; an empty sequence contributes nothing). Differentiable in q, k, v and far_weight. One fused call over
    every sequence on "cpu"; "reference" loops over the sequences in plain PyTorch; the Triton hybrid kernels do
    not take packed sequences yet (an error says so).
    """
    from ..problem import varlen_problem

    varlen_problem(q, k, v, cu_seqlens, cu_seqlens, causal=causal, enable_gqa=enable_gqa)  # the checks
    window = check_window(window)
    far_weight = check_far_weight(far_weight, q.shape[1], q.device)
    scale = resolve_scale(scale, q.shape[-1])
    name = _resolve(backend, q)
    if name == "triton":
        raise NotImplementedError("hybrid_attention_varlen: the triton hybrid kernels do not take packed sequences "
                                  "yet; pass backend='reference' (plain PyTorch, a loop over the sequences) or call "
                                  "hybrid_attention per sequence")
    if name == "reference" or q.numel() == 0:
        bounds = cu_seqlens.tolist()
        outs = [
            blocked.hybrid_attention_blocked(
                q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                window=window, causal=bool(causal), scale=scale, key_padding_mask=None, far_weight=far_weight,
            )[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs) if outs else q.new_empty(0, q.shape[1], v.shape[-1])
    return _impl(name).attention(q, k, v, window=window, causal=bool(causal), scale=scale, key_padding_mask=None,
                                 far_weight=far_weight, cu_seqlens=cu_seqlens)


def hybrid_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    far_weight: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, HybridCache]:
    """Causal hybrid attention over a prompt, and the decoding cache after it, in one fused pass.

    Returns ``(out, cache)``: ``out`` equals ``hybrid_attention(q, k, v, window=window, causal=True, ...)``;
    ``cache`` (:class:`HybridCache`) holds the last W - 1 keys and values in a ring buffer, the Taylor state of
    every key before them and the position L of each row, ready for :func:`hybrid_attention_step`. Padded keys
    (``key_padding_mask``, e.g. a left-padded batch) never enter the window or the state; positions count them, as
    the full forward does. The cache has the key/value heads, in float32 (float64 for float64 inputs).
    Inference-only in the fused backends ("cpu", "triton"): with inputs that need gradients use
    :func:`hybrid_attention` (or backend="reference", differentiable).
    """
    check_hybrid_inputs(q, k, v, causal=True, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa)
    window = check_window(window)
    far_weight = check_far_weight(far_weight, q.shape[1], q.device)
    scale = resolve_scale(scale, q.shape[-1])
    name = _resolve(backend, q)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, far_weight))
    if needs_grad and name != "reference":
        raise RuntimeError(f"hybrid_attention_prefill with backend {name!r} is inference-only, and its inputs need "
                           "gradients: call it under torch.no_grad(), use hybrid_attention for training, or pass "
                           "backend='reference' (differentiable, plain PyTorch)")
    if q.numel() == 0 or q.shape[2] == 0 or name == "reference":
        return blocked.prefill_blocked(q, k, v, window=window, scale=scale, key_padding_mask=key_padding_mask,
                                       far_weight=far_weight)
    return _impl(name).prefill(q, k, v, window=window, scale=scale, key_padding_mask=key_padding_mask,
                               far_weight=far_weight)


def _step_tensor(name: str, x, last: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, heads, {last}], got {type(x).__name__}")
    if x.dim() == 4:
        if x.shape[2] != 1:
            raise ValueError(f"{name} must have shape [B, heads, {last}] or [B, heads, 1, {last}], got {tuple(x.shape)}")
        return x[:, :, 0]
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, heads, {last}] or [B, heads, 1, {last}], got {tuple(x.shape)}")
    return x


def hybrid_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: HybridCache,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    far_weight: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, HybridCache]:
    """One decoding step: the new token attends to the keys inside its window (the ring and itself) with exact
    softmax weights and to the Taylor state beyond it, in one normalizer; O(W (D + Dv) + M Dv) per head.

    ``q [B, H, D]``, ``k [B, Hkv, D]``, ``v [B, Hkv, Dv]`` (or with a length-1 dim 2). ``key_padding_mask [B]``
    bool: True where a row's new token is padding (it gets an output but never enters the cache). ``cache`` from
    :func:`hybrid_attention_prefill` or :func:`empty_hybrid_cache` is **updated in place** (the ring slot, the
    state, the position; no copy of the ring, no host tensor, no value read back: capturable in a CUDA graph) and
    returned. ``scale`` and ``far_weight`` must be the prefill's. Not differentiable.
    """
    squeeze = isinstance(q, torch.Tensor) and q.dim() == 4
    q, k, v = _step_tensor("q", q, "D"), _step_tensor("k", k, "D"), _step_tensor("v", v, "Dv")
    from ..problem import step_problem
    from ..taylor.state import TaylorState

    if not isinstance(cache, HybridCache):
        raise TypeError(f"cache must be a HybridCache (from hybrid_attention_prefill or empty_hybrid_cache), "
                        f"got {type(cache).__name__}")
    step_problem(q, k, v, TaylorState(*cache.state), enable_gqa=enable_gqa)  # the checks
    cache = check_cache(cache, q, k, v)
    b = q.shape[0]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask of a step must be a bool tensor of shape [B] (True = padding)")
        if key_padding_mask.dim() == 2 and key_padding_mask.shape[1] == 1:
            key_padding_mask = key_padding_mask[:, 0]
        if tuple(key_padding_mask.shape) != (b,) or key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask of a step must have shape [B] = [{b}] on q's device, "
                             f"got {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
    far_weight = check_far_weight(far_weight, q.shape[1], q.device)
    scale = resolve_scale(scale, q.shape[-1])
    name = _resolve(backend, q)
    with torch.no_grad():
        if q.numel() == 0 or name == "reference":
            out = blocked.step_blocked(q, k, v, cache, scale=scale, key_padding_mask=key_padding_mask,
                                       far_weight=far_weight)
        else:
            out = _impl(name).step(q, k, v, cache, scale=scale, key_padding_mask=key_padding_mask,
                                   far_weight=far_weight)
    return (out.unsqueeze(2) if squeeze else out), cache

