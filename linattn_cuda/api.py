"""Public entry points: taylor_attention, taylor_attention_prefill, taylor_attention_step and the packed
variable-length forms taylor_attention_varlen, taylor_attention_prefill_varlen."""
from __future__ import annotations

from typing import Optional

import torch

from .ops.taylor import naive as ref
from .ops.problem import check_attention_inputs, check_state, check_step_inputs, check_varlen_inputs
from .ops.dispatch import call_features, resolve_backend
from .feature_map import resolve_scale
from .ops.taylor.naive import TaylorState

__all__ = [
    "taylor_attention",
    "taylor_attention_prefill",
    "taylor_attention_step",
    "taylor_attention_varlen",
    "taylor_attention_prefill_varlen",
]


def _is_empty(q, k) -> bool:
    return q.numel() == 0 or k.shape[-2] == 0


def taylor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Second-order Taylor attention, ``[B,H,Lq,D], [B,Hkv,Lk,D], [B,Hkv,Lk,Dv] -> [B,H,Lq,Dv]``.

    Equivalent to (plain PyTorch, float64 for clarity)::

        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)   # enable_gqa
        s = scale * q @ k.transpose(-1, -2)              # scale defaults to 1/sqrt(D)
        w = 1 + s + s**2 / 2                             # >= 1/2 everywhere
        causal_mask = ones(Lq, Lk).tril(Lk - Lq) == 0    # end-aligned: query i sees keys j <= i + Lk - Lq
        w = w.masked_fill(causal_mask | key_padding_mask[:, None, None, :], 0)
        out = (w @ v) / w.sum(-1, keepdim=True)          # 0 where a query sees no key

    ``key_padding_mask`` is ``[B, Lk]`` bool, True marking padding (as in nn.MultiheadAttention).
    ``causal=True`` needs ``Lq <= Lk`` (flash-attention's convention: a chunk of new queries at the end).
    ``enable_gqa``: as in SDPA, k and v may have Hkv heads with H % Hkv == 0, query head h reading key/value
    head h // (H // Hkv); the fused kernels read the shared head (no copy).
    ``backend``: "auto", "reference", "cpu", "triton" or "cuda"; see ``available_backends(device)``. Grouped-query
    attention and causal Lq < Lk run on "cpu" and "reference" only so far ("auto" picks one of those).
    The output has the input dtype; accumulation and division happen in float32 (float64 for float64).
    """
    check_attention_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa)
    scale = resolve_scale(scale, q.shape[-1])
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    needs = call_features(q, k, causal=causal)
    impl = resolve_backend(backend, q, causal=causal, training=training, needs=needs)
    if _is_empty(q, k):  # nothing to fuse: the reference handles empty shapes (and keeps autograd)
        return ref.taylor_attention_quadratic(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    return impl.attention(q, k, v, causal, scale, key_padding_mask)


def taylor_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    initial_state: Optional[TaylorState] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, TaylorState]:
    """Causal Taylor attention over a prompt that also returns the decoding state.

    Returns ``(out, state)`` with ``out`` equal to ``taylor_attention(q, k, v, causal=True)`` (plus the
    contribution of ``initial_state``, the state of a preceding prefix) and ``state`` the
    :class:`TaylorState` after the last token, to continue with :func:`taylor_attention_step`.
    Padded keys (``key_padding_mask`` True) do not enter the state. The state depends on keys and values only:
    it has the key/value heads (``[B, Hkv, M, Dv]`` with ``enable_gqa``).

    The fused backends' prefill is inference-only; when gradients are needed the differentiable
    reference (chunked form) is used.
    """
    check_attention_inputs(q, k, v, causal=True, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa)
    b, h, _, d = q.shape
    if initial_state is not None:
        check_state(initial_state, b, k.shape[1], d, v.shape[-1], q.device)
        initial_state = TaylorState(*initial_state)
    scale = resolve_scale(scale, d)
    impl = resolve_backend(backend, q, causal=True, kind="prefill", needs=call_features(q, k, causal=True))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, *(initial_state or ()))
    )
    if _is_empty(q, k) or needs_grad:
        return ref.taylor_attention_chunked(q, k, v, scale=scale, key_padding_mask=key_padding_mask, initial_state=initial_state)
    return impl.prefill(q, k, v, scale, key_padding_mask, initial_state)


def taylor_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: TaylorState,
    *,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, TaylorState]:
    """One decoding step: attend from the new token to all previous tokens and itself; O(M * Dv).

    ``q``: ``[B, H, D]`` (or ``[B, H, 1, D]``), ``k``: ``[B, Hkv, D]``, ``v``: ``[B, Hkv, Dv]`` (or with the
    1-long length dim); Hkv = H unless ``enable_gqa``. ``state`` (``[B, Hkv, ...]``) from
    :func:`taylor_attention_prefill` or :func:`linattn_cuda.empty_state`.
    Returns ``(out, new_state)``; ``out`` has the shape convention of ``q``. The old state is not modified.
    """
    squeeze = isinstance(q, torch.Tensor) and q.dim() == 4
    if squeeze:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != 1:
                raise ValueError(f"{name} must have shape [B, H, 1, *] when q is 4-D, got {tuple(getattr(x, 'shape', ()))}")
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    check_step_inputs(q, k, v, state, enable_gqa=enable_gqa)
    state = TaylorState(*state)
    scale = resolve_scale(scale, q.shape[-1])
    needs = frozenset({"gqa"}) if k.shape[1] != q.shape[1] else frozenset()
    impl = resolve_backend(backend, q, causal=True, kind="step", needs=needs)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *state))
    if q.numel() == 0 or needs_grad:
        out, new_state = ref.taylor_attention_step_reference(q, k, v, state, scale=scale)
    else:
        out, new_state = impl.step(q, k, v, state, scale)
    return (out.unsqueeze(2) if squeeze else out), new_state


def taylor_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Taylor attention over packed variable-length sequences (the layout of ``flash_attn_varlen_func``).

    ``q [Tq, H, D]``, ``k [Tk, Hkv, D]``, ``v [Tk, Hkv, Dv]`` hold N sequences one after another;
    ``cu_seqlens_q`` (int32 ``[N + 1]``, 0 = cu[0] <= ... <= cu[N] = Tq) gives where each starts, ``cu_seqlens_k``
    the same for the keys (default: ``cu_seqlens_q``). Returns ``out [Tq, H, Dv]``, equal to calling
    :func:`taylor_attention` on each sequence alone (``q[cu_q[n]:cu_q[n+1]]`` against ``k[cu_k[n]:cu_k[n+1]]``):
    an empty sequence contributes nothing, a query of a sequence without keys gets 0. ``causal`` is end-aligned
    per sequence (needs Lq <= Lk in each one); ``enable_gqa`` as in :func:`taylor_attention`.
    The cpu backend runs all sequences in one fused call (forward and backward); the reference loops.
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, enable_gqa=enable_gqa)
    scale = resolve_scale(scale, q.shape[-1])
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    needs = call_features(q, k, causal=causal, varlen=True)
    impl = resolve_backend(backend, q, causal=causal, training=training, needs=needs)
    if q.numel() == 0 or k.numel() == 0:  # nothing to fuse (and the reference keeps autograd)
        return ref.taylor_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale)
    return impl.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)


def taylor_attention_prefill_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[TaylorState] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, TaylorState]:
    """Causal prefill of packed prompts of different lengths at once: ``(out [Tq, H, Dv], state)``.

    Shapes as in :func:`taylor_attention_varlen`; ``state`` is the :class:`TaylorState` of every sequence after
    its last token, ``kv [N, Hkv, M, Dv]`` and ``k_sum [N, Hkv, M]``, ready for :func:`taylor_attention_step`
    with a batch of N. ``initial_state`` (same shapes) is a per-sequence state of a preceding prefix.
    Inference-only in the fused backend; when gradients are needed the reference (a loop) is used.
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    n = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, enable_gqa=enable_gqa)
    d = q.shape[-1]
    if initial_state is not None:
        check_state(initial_state, n, k.shape[1], d, v.shape[-1], q.device)
        initial_state = TaylorState(*initial_state)
    scale = resolve_scale(scale, d)
    needs = call_features(q, k, causal=True, varlen=True)
    impl = resolve_backend(backend, q, causal=True, kind="prefill", needs=needs)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, *(initial_state or ()))
    )
    if k.numel() == 0 or needs_grad:
        return ref.taylor_attention_prefill_varlen_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, initial_state=initial_state
        )
    return impl.prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, initial_state)
