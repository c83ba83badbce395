"""Public entry points: taylor_attention, taylor_attention_prefill, taylor_attention_step."""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._checks import check_attention_inputs, check_state, check_step_inputs
from .backends import resolve_backend
from .feature_map import resolve_scale
from .reference import TaylorState

__all__ = ["taylor_attention", "taylor_attention_prefill", "taylor_attention_step"]


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
    backend: str = "auto",
) -> torch.Tensor:
    """Second-order Taylor attention, ``[B,H,Lq,D], [B,H,Lk,D], [B,H,Lk,Dv] -> [B,H,Lq,Dv]``.

    Equivalent to (plain PyTorch, float64 for clarity)::

        s = scale * q @ k.transpose(-1, -2)              # scale defaults to 1/sqrt(D)
        w = 1 + s + s**2 / 2                             # >= 1/2 everywhere
        w = w.masked_fill(causal_mask | key_padding_mask[:, None, None, :], 0)
        out = (w @ v) / w.sum(-1, keepdim=True)          # 0 where a query sees no key

    ``key_padding_mask`` is ``[B, Lk]`` bool, True marking padding (as in nn.MultiheadAttention).
    ``backend``: "auto", "reference", "cpu", "triton" or "cuda"; see ``available_backends(device)``.
    The output has the input dtype; accumulation and division happen in float32 (float64 for float64).
    """
    check_attention_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    scale = resolve_scale(scale, q.shape[-1])
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    impl = resolve_backend(backend, q, causal=causal, training=training)
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
    backend: str = "auto",
) -> tuple[torch.Tensor, TaylorState]:
    """Causal Taylor attention over a prompt that also returns the decoding state.

    Returns ``(out, state)`` with ``out`` equal to ``taylor_attention(q, k, v, causal=True)`` (plus the
    contribution of ``initial_state``, the state of a preceding prefix) and ``state`` the
    :class:`TaylorState` after the last token, to continue with :func:`taylor_attention_step`.
    Padded keys (``key_padding_mask`` True) do not enter the state.

    The fused backends' prefill is inference-only; when gradients are needed the differentiable
    reference (chunked form) is used.
    """
    check_attention_inputs(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    b, h, _, d = q.shape
    if initial_state is not None:
        check_state(initial_state, b, h, d, v.shape[-1], q.device)
        initial_state = TaylorState(*initial_state)
    scale = resolve_scale(scale, d)
    impl = resolve_backend(backend, q, causal=True, kind="prefill")
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
    backend: str = "auto",
) -> tuple[torch.Tensor, TaylorState]:
    """One decoding step: attend from the new token to all previous tokens and itself; O(M * Dv).

    ``q, k``: ``[B, H, D]`` (or ``[B, H, 1, D]``), ``v``: ``[B, H, Dv]`` (or ``[B, H, 1, Dv]``);
    ``state`` from :func:`taylor_attention_prefill` or :func:`linattn_cuda.empty_state`.
    Returns ``(out, new_state)``; ``out`` has the shape convention of ``q``. The old state is not modified.
    """
    squeeze = isinstance(q, torch.Tensor) and q.dim() == 4
    if squeeze:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != 1:
                raise ValueError(f"{name} must have shape [B, H, 1, *] when q is 4-D, got {tuple(getattr(x, 'shape', ()))}")
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    check_step_inputs(q, k, v, state)
    state = TaylorState(*state)
    scale = resolve_scale(scale, q.shape[-1])
    impl = resolve_backend(backend, q, causal=True, kind="step")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *state))
    if q.numel() == 0 or needs_grad:
        out, new_state = ref.taylor_attention_step_reference(q, k, v, state, scale=scale)
    else:
        out, new_state = impl.step(q, k, v, state, scale)
    return (out.unsqueeze(2) if squeeze else out), new_state
