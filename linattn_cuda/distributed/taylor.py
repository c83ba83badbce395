"""Taylor attention over a sequence sharded across processes (context parallelism, LASP-2 style).

Rank r holds positions ``[s_r, s_r + L_r)`` of every sequence of the batch (q, k and v of its shard). A rank's
whole influence on the other ranks' outputs is the Taylor state of its keys, ``S_r = sum_j phi(k_j) v_j^T`` and
``z_r = sum_j phi(k_j)`` (``M x (Dv + 1)`` numbers per key/value head, whatever ``L_r``), so one all-gather of the
states replaces moving keys and values around a ring:

    out_i = phi(q_i)^T (P_r + S_i) / phi(q_i)^T (p_r + z_i)
    (P_r, p_r) = sum over r' < r of (S_r', z_r')     causal; non-causal: over r' != r
    (S_i, z_i) = the state of the rank's own keys that query i sees (j <= i causal, all of them non-causal)

The backward is the mirror image: each rank's gradient of its ``P_r`` is all-gathered and rank r' adds up those of
the ranks that read its state (a suffix sum when causal), which flows into its keys and values.

Two schedules compute the same thing (``overlap``):

* fused (``overlap=False``): the state of the local keys, the all-gather, then one fused call with ``P_r`` as its
  initial state (:func:`linattn_cuda.taylor_attention`); autograd runs the backward. Every backend that takes an
  initial state and returns a state serves it. The all-gather waits for the state pass, the fused call for the
  all-gather.
* overlapped (``overlap=True``, the compiled ``cpu`` / ``cuda`` kernels): the all-gather of the states runs
  asynchronously while the local part (keys of this rank only, from a zero state) is computed; then the prefix
  part (``phi(q)^T P_r``, a call with no keys and ``P_r`` as initial state) is added to numerator and normalizer.
  Backward: the prefix part's backward first (it gives the gradient of ``P_r``), its all-gather in flight while the
  local part's backward runs, then the state's backward. It is exact because the backward of ``N / Z`` reads the
  output and normalizer only through ``dO / Z`` and ``dO . out / Z``: each piece's backward given the combined
  output and normalizer yields its exact share of the gradients. It does one more pass (the prefix part) than the
  fused schedule and rounds the local part's output to the input dtype before combining (bf16: about twice the
  rounding error of one process); on CPU, where the all-gathers take ~1 % of a call, it is slower (README).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..api import taylor_attention
from ..ops.dispatch import get_backend, resolve_backend
from ..ops.problem import attention_problem
from ..ops.taylor.cpp import ExtensionBackend
from ..ops.taylor.state import TaylorState, accumulate_dtype, empty_state
from .collectives import Piece, ShardExchange, exchange
from .layout import dtype_code, exchange_call, float_bits

__all__ = ["taylor_attention_cp"]

_STATE_PIECES = (Piece("sum"), Piece("sum"))


def _device_of(*xs) -> Optional[torch.device]:
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def collective_device(group, *tensors) -> torch.device:
    """Where this call's small exchanges live: the inputs' device (nccl needs CUDA tensors, gloo takes CPU ones)."""
    device = _device_of(*tensors)
    if device is not None:
        return device
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _call_fields(p, *, op: int, causal: bool, needs_grad: bool, window: int = 0, extra=()) -> list:
    if p is None:
        return [("operation", op)] + [(name, 0) for name in (
            "batch size B", "query heads H", "key/value heads Hkv", "q/k feature dim D", "value dim Dv", "dtype",
            "causal flag", "window", "key_padding_mask presence", "gradient requirement", "scale")] + list(extra)
    return [
        ("operation", op),
        ("batch size B", p.batch),
        ("query heads H", p.heads),
        ("key/value heads Hkv", p.kv_heads),
        ("q/k feature dim D", p.head_dim),
        ("value dim Dv", p.value_dim),
        ("dtype", dtype_code(p.dtype)),
        ("causal flag", int(causal)),
        ("window", window),
        ("key_padding_mask presence", int(p.key_padding_mask is not None)),
        ("gradient requirement (q, k or v requires grad)", int(needs_grad)),
        ("scale", float_bits(p.scale)),
    ] + list(extra)


def _check_local(q, k, v, *, causal, scale, key_padding_mask, enable_gqa):
    """This rank's own checks: (problem, None) or (None, the exception)."""
    try:
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        p = attention_problem(q, k, v, causal=False, scale=scale, key_padding_mask=key_padding_mask,
                              enable_gqa=enable_gqa)
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(
                "causal context parallelism is self-attention over one sharded sequence: each rank's q and k shards "
                f"need one length, got {q.shape[2]} and {k.shape[2]}")
        return p, None
    except (TypeError, ValueError) as exc:
        return None, exc


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _overlap_reason(p, q, k, v, causal: bool, backend: str) -> Optional[str]:
    """Why the overlapped schedule cannot run this call (None when it can): it calls the op family
    ``torch.ops.linattn_cuda.taylor_fwd/bwd`` of one compiled backend for its three pieces."""
    b, hk = p.batch, p.kv_heads
    state = empty_state(b, hk, p.head_dim, p.value_dim, dtype=accumulate_dtype(p.dtype), device=p.device)
    k0, v0 = k[:, :, :0], v[:, :, :0]
    kw = dict(scale=p.scale, enable_gqa=p.kv_heads != p.heads)
    pieces = (
        attention_problem(q[:, :, :0], k, v, causal=False, key_padding_mask=p.key_padding_mask, return_state=True,
                          **kw),
        attention_problem(q, k, v, causal=causal, key_padding_mask=p.key_padding_mask, **kw),
        attention_problem(q, k0, v0, causal=False, initial_state=state, **kw),
    )
    names = set()
    for piece in pieces:
        try:
            names.add(resolve_backend(backend, piece).name)
        except (ValueError, NotImplementedError) as exc:
            return str(exc)
    if len(names) != 1 or not isinstance(get_backend(names.pop()), ExtensionBackend):
        return (f"the overlapped schedule runs on the compiled 'cpu' / 'cuda' kernels; backend={backend!r} resolves "
                f"to {sorted(names)}")
    return None


class _OverlappedTaylorCP(torch.autograd.Function):
    """The overlapped schedule (module docstring) on the op family ``torch.ops.linattn_cuda.taylor_fwd/bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, ex: ShardExchange, causal: bool, scale: float):
        op = torch.ops.linattn_cuda
        q0 = q[:, :, :0]
        _, _, kv, k_sum = op.taylor_fwd(q0, k, v, mask, None, None, None, None, False, scale, True)
        pending = ex.start([kv, k_sum])  # in flight during the local part
        out_l, den_l, _, _ = op.taylor_fwd(q, k, v, mask, None, None, None, None, causal, scale, False)
        kv_p, ks_p = pending.wait()
        k0, v0 = k[:, :, :0], v[:, :, :0]
        out_p, den_p, _, _ = op.taylor_fwd(q, k0, v0, None, None, None, kv_p, ks_p, False, scale, False)
        den = den_l + den_p
        num = out_l.to(den.dtype) * den_l.unsqueeze(-1) + out_p.to(den.dtype) * den_p.unsqueeze(-1)
        ok = (den > 0).unsqueeze(-1)
        out = torch.where(ok, num / torch.where(ok, den.unsqueeze(-1), 1.0), 0.0).to(q.dtype)
        ctx.save_for_backward(q, k, v, mask, kv_p, ks_p, out, den)
        ctx.ex, ctx.causal, ctx.scale = ex, causal, scale
        ctx.mark_non_differentiable(den)
        return out, den

    @staticmethod
    def backward(ctx, grad_out, _grad_den):
        op = torch.ops.linattn_cuda
        q, k, v, mask, kv_p, ks_p, out, den = ctx.saved_tensors
        scale, grad_out = ctx.scale, grad_out.contiguous()
        q0, k0, v0 = q[:, :, :0], k[:, :, :0], v[:, :, :0]
        dq_p, _, _, dkv_p, dks_p = op.taylor_bwd(grad_out, None, None, q, k0, v0, None, None, None, kv_p, ks_p, out,
                                                 den, False, scale)
        pending = ctx.ex.start_adjoint([dkv_p, dks_p], [0, 1])  # in flight during the local part's backward
        dq_l, dk_l, dv_l, _, _ = op.taylor_bwd(grad_out, None, None, q, k, v, mask, None, None, None, None, out, den,
                                               ctx.causal, scale)
        dkv, dks = pending.wait()
        empty_out, empty_den = out[:, :, :0], den[:, :, :0]
        _, dk_s, dv_s, _, _ = op.taylor_bwd(empty_out, dkv, dks, q0, k, v, mask, None, None, None, None, empty_out,
                                            empty_den, False, scale)
        return dq_p + dq_l, dk_l + dk_s, dv_l + dv_s, None, None, None, None


def taylor_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = True,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    overlap: bool = False,
) -> torch.Tensor:
    """Taylor attention over a sequence sharded contiguously across the ranks of ``group`` (None: the default
    process group): a collective call, every rank of the group makes it with its own shard.

    Rank r passes its shard ``q [B, H, L_r, D]``, ``k [B, Hkv, L_r, D]``, ``v [B, Hkv, L_r, Dv]`` (rank order =
    sequence order; shards may differ in length, and may be empty) and ``key_padding_mask [B, L_r]`` (its part of
    the whole mask), and gets its shard of the output, equal to
    ``linattn_cuda.taylor_attention(q_all, k_all, v_all, causal=causal, ...)`` on the whole sequence. Non-causal
    calls may have different query and key shard lengths (q and k sharded independently). Differentiable:
    ``loss.backward()`` on every rank gives every rank its shard's gradients (the backward is collective too: keep
    every rank's output in its loss).

    Communication per call: one all-gather of the ranks' Taylor states forward (``B * Hkv * M * (Dv + 1)``
    numbers per rank, ``M = 1 + D + D(D+1)/2``) and one of their gradients backward, never the sequence, plus a
    fixed-size exchange of the call's shape that checks every rank against the others: a rank whose inputs are
    refused makes every rank raise. ``overlap``: run the all-gathers while the local part is computed (module
    docstring; the compiled ``cpu`` / ``cuda`` kernels; off by default: slower on CPU, README "Context
    parallelism"). ``scale``, ``enable_gqa``, ``backend`` as in :func:`linattn_cuda.taylor_attention`.
    """
    p, error = _check_local(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                            enable_gqa=enable_gqa)
    if error is None and not isinstance(overlap, bool):
        error = TypeError(f"overlap must be a bool, got {type(overlap).__name__}")
    if error is None and overlap:
        why = _overlap_reason(p, q, k, v, causal, backend)
        if why is not None:
            error = NotImplementedError(f"taylor_attention_cp(overlap=True) cannot run this call: {why}")
    needs_grad = _needs_grad(q, k, v)
    device = collective_device(group, q, k, v)
    fields = _call_fields(p, op=1, causal=causal, needs_grad=needs_grad)
    layout = exchange_call("taylor_attention_cp", group, device, fields,
                           length=k.shape[2] if error is None else 0, error=error)
    ex = ShardExchange(layout, group, _STATE_PIECES, causal=causal)
    if overlap:
        out, _ = _OverlappedTaylorCP.apply(q, k, v, p.key_padding_mask, ex, causal and q.shape[2] > 1, p.scale)
        return out
    kw = dict(scale=p.scale, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa, backend=backend)
    _, local = taylor_attention(q[:, :, :0], k, v, return_state=True, **kw)
    prefix = TaylorState(*exchange(ex, local.kv, local.k_sum))
    return taylor_attention(q, k, v, causal=causal, initial_state=prefix, **kw)
