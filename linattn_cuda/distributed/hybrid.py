"""Hybrid attention (softmax inside a window of W keys, the Taylor weight beyond it, one normalizer) over a
sequence sharded across processes.

Rank r needs, besides its own keys: the ``W - 1`` keys and values just before its shard (the halo: the only
foreign keys its queries weigh with ``exp``; non-causal also the ``W - 1`` just after it) and the Taylor state of
every other foreign key (all beyond every query's window). One all-gather carries each rank's state and its
first / last ``W - 1`` keys, values and padding flags (the halo pieces), so shards shorter than the window work
too: the halo is assembled from as many ranks as it spans. With ``P_r`` the sum of the states of the ranks read
(earlier ones when causal, all others otherwise) and ``H_r`` the halo::

    T_r = P_r - state(H_r)                      the foreign keys beyond the window
    extended keys  = [H_left, own keys, H_right] and, for own query i,
    window part    = sum over extended keys j with i - W < j <= i  (|i - j| < W non-causal) of exp(s_ij) v_j
    far part       = phi(q_i)^T T_r + the extended keys at distance >= W (Taylor weights)
    out_i          = (window num + e^-m far num) / (window den + e^-m far den),  m = max(window max logit, 0)

The far part runs through :func:`linattn_cuda.taylor_attention` (fused kernels, ``T_r`` as initial state, a sink key
that returns the normalizer: an extra key of zeros, weight exactly 1, whose value is a one-hot extra column); the
window part is blocked like the single-process blocked hybrid, with the halo in place of the zero block before
the first one. Everything is differentiable; the backward of the exchange all-gathers the gradients of the
states and halos (state-sized plus halo-sized per rank) and sends each halo gradient back to the rank whose keys
it came from. When the fused hybrid kernel takes an initial state and leading halo keys, the local computation
below becomes one call of it.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F

from ..api import taylor_attention
from ..ops.taylor.naive import zero_padded_keys
from ..ops.taylor.state import TaylorState, accumulate_dtype
from .collectives import Piece, ShardExchange, end_rows, exchange
from .layout import exchange_call
from .taylor import _call_fields, _check_local, _needs_grad, collective_device

__all__ = ["hybrid_attention_cp"]


def _check_window(window) -> int:
    try:
        value = operator.index(window)
    except TypeError:
        value = None
    if isinstance(window, bool) or value is None or value < 1:
        raise ValueError(f"window must be a positive integer (the number of keys with exact softmax weights), "
                         f"got {window!r}")
    return value


def _check_far_weight(far_weight, heads: int, device):
    if far_weight is None:
        return None
    if not isinstance(far_weight, torch.Tensor) or tuple(far_weight.shape) != (heads,):
        raise ValueError(f"far_weight must be a tensor of shape [H] = [{heads}] (positive per-head weights), "
                         f"got {getattr(far_weight, 'shape', type(far_weight).__name__)}")
    if far_weight.device != device:
        raise ValueError(f"far_weight must be on the device of q ({device}), got {far_weight.device}")
    return far_weight


def _state(k, v, mask, scale, gqa_heads: int, backend: str) -> TaylorState:
    """The Taylor state of keys ``k`` (a call without queries), differentiable."""
    q0 = k.new_zeros(k.shape[0], gqa_heads, 0, k.shape[-1])
    return taylor_attention(q0, k, v, scale=scale, key_padding_mask=mask, enable_gqa=gqa_heads != k.shape[1],
                            return_state=True, backend=backend)[1]


def _far_part(q, k_ext, v_ext, mask_ext, left: int, window: int, scale: float, initial_state, backend: str):
    """Taylor numerator ``[B, H, L, Dv]`` and normalizer ``[B, H, L]`` of own queries ``q`` (extended position
    ``left + a``) over the extended keys at extended position ``<= left + a - window``, plus ``initial_state``.

    One causal fused call: a sink key (zeros, weight 1, value the one-hot column Dv) first, then
    ``d = min(window - left, L)`` padded dummy keys, then the first ``L - d`` extended keys, so that query a sees
    exactly the extended keys up to ``left + a - window``; its output ``[N, 1] / (Z + 1)`` gives N and Z."""
    b, h, length, d_qk = q.shape
    hk, dv = k_ext.shape[1], v_ext.shape[-1]
    dummies = min(window - left, length)
    keep = length - dummies
    qs = torch.cat([q.new_zeros(b, h, 1, d_qk), q], dim=2)
    ks = torch.cat([k_ext.new_zeros(b, hk, 1 + dummies, d_qk), k_ext[:, :, :keep]], dim=2)
    sink_value = F.pad(v_ext.new_ones(b, hk, 1, 1), (dv, 0))
    vs = torch.cat([sink_value, v_ext.new_zeros(b, hk, dummies, dv + 1), F.pad(v_ext[:, :, :keep], (0, 1))], dim=2)
    valid = torch.zeros(b, 1 + dummies, dtype=torch.bool, device=q.device)
    valid[:, 0] = True
    valid = torch.cat([valid, torch.ones(b, keep, dtype=torch.bool, device=q.device) if mask_ext is None
                       else ~mask_ext[:, :keep]], dim=1)
    init = None
    if initial_state is not None:
        init = TaylorState(F.pad(initial_state.kv, (0, 1)), initial_state.k_sum)
    o = taylor_attention(qs, ks, vs, causal=True, scale=scale, key_padding_mask=~valid, enable_gqa=hk != h,
                         initial_state=init, backend=backend)[:, :, 1:]
    inv = o[..., dv]  # 1 / (Z + 1), in (0, 1]
    return o[..., :dv] / inv.unsqueeze(-1), 1.0 / inv - 1.0


def _window_part(q, k_ext, v_ext, valid_ext, left: int, right: int, window: int, causal: bool, scale: float):
    """Blocked window logits of own queries: ``s [B, H, n, W, K]`` (n = ceil(L / W) blocks of W queries, K = 2W
    keys causal, 3W non-causal; -inf outside each query's window) and the key blocks' values ``[B, Hkv, n, K, Dv]``.

    The extended keys are laid out as W slots before the shard (the halo at their end), the shard padded to nW,
    and (non-causal) W slots after it (the right halo at their start): query block b then reads slots
    ``[bW, bW + K)``, the band being ``0 <= W + r - c < W`` (causal) or ``|W + r - c| < W``."""
    b, h, length, _ = q.shape
    hk = k_ext.shape[1]
    n = max(1, -(-length // window))  # one (all-padding) block for an empty shard keeps it in the graph
    after = window + (n * window - length) if not causal else n * window - length
    key_len = 2 * window if causal else 3 * window

    def slots(x, pad_value=0.0):  # [..., left + L + right, d] -> [..., W + nW (+ W), d] along dim -2
        return F.pad(x, (0, 0, window - left, after - right), value=pad_value)

    kp, vp = slots(k_ext), slots(v_ext)
    vk = F.pad(valid_ext.to(torch.uint8), (window - left, after - right)).bool()  # [B, slots]
    kb = kp.unfold(2, key_len, window).transpose(-1, -2)  # [B, Hkv, n, K, D] (a view)
    vb = vp.unfold(2, key_len, window).transpose(-1, -2)
    valid_b = vk.unfold(1, key_len, window)  # [B, n, K]
    qb = F.pad(q, (0, 0, 0, n * window - length)).view(b, hk, h // hk, n, window, q.shape[-1])
    s = torch.matmul(qb, kb.unsqueeze(2).transpose(-1, -2)).view(b, h, n, window, key_len) * scale
    r = torch.arange(window, device=q.device)[:, None]
    c = torch.arange(key_len, device=q.device)[None, :]
    diff = window + r - c  # query position minus key position
    band = (diff >= 0) & (diff < window) if causal else diff.abs() < window
    inside = band & valid_b[:, None, :, None, :]  # [B, 1, n, W, K]
    return s.masked_fill(~inside, float("-inf")), vb


def hybrid_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    group=None,
    causal: bool = True,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    far_weight: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Hybrid attention over a sequence sharded contiguously across the ranks of ``group`` (None: the default
    process group); a collective call, every rank makes it with its shard.

    Rank r passes ``q [B, H, L_r, D]``, ``k [B, Hkv, L_r, D]``, ``v [B, Hkv, L_r, Dv]`` and ``key_padding_mask
    [B, L_r]`` (rank order = sequence order; any lengths, shorter than the window or empty included) and gets its
    shard of ``linattn_cuda.hybrid_attention(q_all, k_all, v_all, window=window, causal=causal, ...)`` on the whole
    sequence (``far_weight [H]``: per-head factors of the Taylor weights, differentiable). Differentiable; the
    backward is collective too.

    Communication per call and rank: one all-gather of its Taylor state (``B * Hkv * M * (Dv + 1)`` numbers) plus
    its last ``W - 1`` keys, values (in the input dtype) and padding flags (and its first ``W - 1`` when
    non-causal), forward; the same sizes of gradients backward; whatever the shard length. Computed in float32
    (float64 for float64 inputs), returned in q's dtype; ``backend`` is the Taylor part's
    (:func:`linattn_cuda.taylor_attention`).
    """
    p, error = _check_local(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                            enable_gqa=enable_gqa)
    if error is None:
        try:
            if q.shape[2] != k.shape[2]:
                raise ValueError(f"hybrid attention is self-attention: each rank's q and k shards need one length, "
                                 f"got {q.shape[2]} and {k.shape[2]}")
            window = _check_window(window)
            far_weight = _check_far_weight(far_weight, q.shape[1], q.device)
        except ValueError as exc:
            p, error = None, exc
    needs_grad = _needs_grad(q, k, v, far_weight)
    fields = _call_fields(p, op=2, causal=causal, needs_grad=needs_grad, window=window if error is None else 0,
                          extra=[("far_weight presence", int(far_weight is not None) if error is None else 0)])
    layout = exchange_call("hybrid_attention_cp", group, collective_device(group, q, k, v), fields,
                           length=k.shape[2] if error is None else 0, error=error)

    out_dtype, acc = q.dtype, accumulate_dtype(q.dtype)
    mask, scale = key_padding_mask, p.scale
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    k, v = zero_padded_keys(k, v, mask)
    b, h, length, _ = q.shape
    # a window longer than the whole sequence is the whole sequence: nothing beyond it, no halo larger than it
    window = min(window, max(layout.total, 1))
    halo = window - 1
    own = _state(k, v, mask, scale, h, backend)

    # one exchange: the states, and the rows at the shard's ends that neighbours need for their halo
    valid = torch.ones(b, length, dtype=torch.bool, device=q.device) if mask is None else ~mask
    ends = min(length, halo)
    sides = [("left", False)] + ([] if causal else [("right", True)])
    pieces, tensors = [Piece("sum"), Piece("sum")], [own.kv, own.k_sum]
    for side, first in sides:
        pieces += [Piece(side), Piece(side), Piece(side, row_dim=-1)]
        tensors += [end_rows(k.to(out_dtype), ends, first, halo, 2), end_rows(v.to(out_dtype), ends, first, halo, 2),
                    end_rows(valid, ends, first, halo, 1)]  # keys and values travel in the input dtype
    got = exchange(ShardExchange(layout, group, pieces, causal=causal, halo_rows=halo), *tensors)

    left = min(halo, layout.start)
    right = 0 if causal else min(halo, layout.total - layout.end)
    got = [t.to(acc) if t.is_floating_point() and t.dtype != acc and i > 1 else t for i, t in enumerate(got)]
    k_l, v_l, valid_l = got[2][:, :, halo - left:], got[3][:, :, halo - left:], got[4][:, halo - left:]
    k_parts, v_parts, valid_parts = [k_l, k], [v_l, v], [valid_l, valid]
    beyond = TaylorState(got[0], got[1])  # every foreign key ...
    halo_state = _state(k_l, v_l, ~valid_l, scale, h, backend)  # ... minus those in the halo(s)
    beyond = TaylorState(beyond.kv - halo_state.kv, beyond.k_sum - halo_state.k_sum)
    if not causal:
        k_r, v_r, valid_r = got[5][:, :, :right], got[6][:, :, :right], got[7][:, :right]
        halo_state = _state(k_r, v_r, ~valid_r, scale, h, backend)
        beyond = TaylorState(beyond.kv - halo_state.kv, beyond.k_sum - halo_state.k_sum)
        k_parts, v_parts, valid_parts = k_parts + [k_r], v_parts + [v_r], valid_parts + [valid_r]
    k_ext, v_ext, valid_ext = torch.cat(k_parts, 2), torch.cat(v_parts, 2), torch.cat(valid_parts, 1)

    # the far part: Taylor weights of the foreign keys beyond the window and of the extended keys at distance >= W
    num_f, den_f = _far_part(q, k_ext[:, :, : left + length], v_ext[:, :, : left + length],
                             ~valid_ext[:, : left + length], left, window, scale, beyond, backend)
    if not causal:
        flip = lambda t, dim=2: t.flip(dim)  # noqa: E731
        tail = slice(left, None)
        num_r, den_r = _far_part(flip(q), flip(k_ext[:, :, tail]), flip(v_ext[:, :, tail]),
                                 flip(~valid_ext[:, tail], 1), right, window, scale, None, backend)
        num_f, den_f = num_f + flip(num_r), den_f + flip(den_r)
    if far_weight is not None:
        fw = far_weight.to(acc).view(1, -1, 1)
        num_f, den_f = num_f * fw.unsqueeze(-1), den_f * fw

    # the window part, stabilized by m (the window's max logit; at least 0 where a Taylor key exists)
    s, vb = _window_part(q, k_ext, v_ext, valid_ext, left, right, window, causal, scale)
    n = s.shape[2]
    m = s.detach().amax(-1).reshape(b, h, n * window)[:, :, :length]  # -inf where the window is empty
    m = torch.where(den_f > 0, m.clamp_min(0.0), torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    pw = torch.exp(s - F.pad(m, (0, n * window - length)).view(b, h, n, window, 1))
    hk = k.shape[1]
    num_w = torch.matmul(pw.view(b, hk, h // hk, n, window, -1), vb.unsqueeze(2)).reshape(b, h, n * window, -1)
    den_w = pw.sum(-1).reshape(b, h, n * window)
    far_scale = torch.exp(-m.clamp_min(0.0))
    num = num_w[:, :, :length] + far_scale.unsqueeze(-1) * num_f
    den = den_w[:, :, :length] + far_scale * den_f
    ok = den > 0
    return (num / torch.where(ok, den, torch.ones_like(den)).unsqueeze(-1)).to(out_dtype)
