"""Public entry points: taylor_attention, taylor_attention_prefill, taylor_attention_step and the packed
variable-length forms taylor_attention_varlen, taylor_attention_prefill_varlen.

Each builds the call's problem description (``ops/problem.py``: every argument checked there), picks a backend
(``ops/dispatch.py``) and runs it. Every backend takes every feature of the problem or says why not; the fused
ops are differentiable in q, k, v and in the initial state, and the returned state is differentiable too."""
from __future__ import annotations

from typing import Optional

import torch

from .ops.dispatch import get_backend, resolve_backend
from .ops.problem import attention_problem, step_problem, varlen_problem
from .ops.taylor.state import TaylorState

__all__ = [
    "taylor_attention",
    "taylor_attention_prefill",
    "taylor_attention_step",
    "taylor_attention_varlen",
    "taylor_attention_prefill_varlen",
]


def _run(p, q, k, v, backend: str):
    # Nothing to fuse (no query and no state wanted, or no key and no state): the reference, which keeps autograd.
    trivial = (p.len_q == 0 and not p.return_state) or (p.len_k == 0 and p.initial_state is None)
    impl = resolve_backend(backend, p)  # checks an explicit backend even for empty inputs
    if trivial:
        impl = get_backend("reference")
    out, state = impl.forward(p, q, k, v)
    return (out, state) if p.return_state else out


def taylor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    initial_state: Optional[TaylorState] = None,
    return_state: bool = False,
    backend: str = "auto",
):
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
    ``initial_state`` (a :class:`TaylorState` ``[B, Hkv, M, Dv]``, ``[B, Hkv, M]``): the state of keys before these;
    every query sees it (``phi(q)^T kv`` joins the numerator, ``phi(q)^T k_sum`` the normalizer). ``return_state``:
    also return the state after every key, ``(out, state)``. Both are differentiable.
    ``backend``: "auto", "reference", "cpu", "triton" or "cuda"; see ``available_backends(device)``.
    The output has the input dtype; accumulation and division happen in float32 (float64 for float64).
    """
    p = attention_problem(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                          enable_gqa=enable_gqa, initial_state=initial_state, return_state=return_state)
    return _run(p, q, k, v, backend)


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

    Returns ``(out, state)``: ``out`` equal to ``taylor_attention(q, k, v, causal=True)`` plus the contribution of
    ``initial_state`` (the state of a preceding prefix), ``state`` the :class:`TaylorState` after the last token, to
    continue with :func:`taylor_attention_step` (or another prefill: chunked prefill). Padded keys
    (``key_padding_mask`` True) do not enter the state. The state depends on keys and values only: it has the
    key/value heads (``[B, Hkv, M, Dv]`` with ``enable_gqa``). Differentiable, the state included.
    """
    return taylor_attention(q, k, v, causal=True, scale=scale, key_padding_mask=key_padding_mask,
                            enable_gqa=enable_gqa, initial_state=initial_state, return_state=True, backend=backend)


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
    With gradients enabled (an input requires grad) the step runs as a one-query fused forward with the state as
    its initial state, which is differentiable.
    """
    squeeze = isinstance(q, torch.Tensor) and q.dim() == 4
    if squeeze:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != 1:
                raise ValueError(f"{name} must have shape [B, H, 1, *] when q is 4-D, got {tuple(getattr(x, 'shape', ()))}")
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    p = step_problem(q, k, v, state, scale=scale, enable_gqa=enable_gqa)
    if p.needs_grad:  # the differentiable route: one query, the state as initial state, the new state returned
        out, new_state = taylor_attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), scale=p.scale,
                                          enable_gqa=enable_gqa, initial_state=p.initial_state, return_state=True,
                                          backend=backend)
        out = out[:, :, 0]
    else:
        impl = resolve_backend(backend, p)
        if q.numel() == 0:
            impl = get_backend("reference")
        out, new_state = impl.step(p, q, k, v, p.initial_state)
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
    initial_state: Optional[TaylorState] = None,
    return_state: bool = False,
    backend: str = "auto",
):
    """Taylor attention over packed variable-length sequences (the layout of ``flash_attn_varlen_func``).

    ``q [Tq, H, D]``, ``k [Tk, Hkv, D]``, ``v [Tk, Hkv, Dv]`` hold N sequences one after another;
    ``cu_seqlens_q`` (int32 ``[N + 1]``, 0 = cu[0] <= ... <= cu[N] = Tq) gives where each starts, ``cu_seqlens_k``
    the same for the keys (default: ``cu_seqlens_q``). Returns ``out [Tq, H, Dv]``, equal to calling
    :func:`taylor_attention` on each sequence alone (``q[cu_q[n]:cu_q[n+1]]`` against ``k[cu_k[n]:cu_k[n+1]]``):
    an empty sequence contributes nothing, a query of a sequence without keys gets 0. ``causal`` is end-aligned
    per sequence (needs Lq <= Lk in each one); ``enable_gqa``, ``initial_state`` (``[N, Hkv, ...]``: one state per
    sequence) and ``return_state`` as in :func:`taylor_attention`. Every sequence runs in one fused call.
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    p = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, enable_gqa=enable_gqa,
                       initial_state=initial_state, return_state=return_state)
    return _run(p, q, k, v, backend)


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
    """
    return taylor_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, scale=scale,
                                   enable_gqa=enable_gqa, initial_state=initial_state, return_state=True,
                                   backend=backend)
