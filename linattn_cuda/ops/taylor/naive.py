"""Pure-PyTorch Taylor attention: the ground truth every fast backend is tested against.

``taylor_attention_naive`` is the definition with every feature (grouped-query heads, end-aligned causal, key
padding, an initial state seen by every query, the final state): the quadratic form plus the state terms, dense.
The other forms compute the same function (SPEC section 1) and are differentiable with plain autograd:

* ``quadratic``  -- w = 1 + s + s^2/2 materialized as an Lq x Lk matrix (O(L^2) memory).
* ``linear``     -- phi(q)^T (sum phi(k) v^T) / phi(q)^T (sum phi(k)), causal via prefix sums (O(L M Dv) memory).
* ``chunked``    -- causal: quadratic inside chunks of C tokens, the (kv, k_sum) state carried across chunks.
* ``recurrent``  -- causal: one token at a time, the decoding recurrence.

Inputs of half precision are computed in float32, float64 stays float64; outputs take the input dtype.
A query with no visible unmasked key returns 0.

Grouped-query attention: k and v may have Hkv heads with H % Hkv == 0 (query head h reads key/value head
h // (H // Hkv)); the reference repeats them (the fused kernels do not). Causal attention with Lq < Lk is
end-aligned: query i sees the keys j <= i + Lk - Lq. States always have the key/value heads.
The ``*_varlen`` functions take packed sequences ([T, H, D] with int32 cu_seqlens) and loop over them.
This module imports nothing of the package but the feature map: the dispatch layer builds on it, not the reverse.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...feature_map import taylor_feature_map
from .state import TaylorState, accumulate_dtype, empty_state

__all__ = [
    "TaylorState",
    "taylor_attention_naive",
    "state_of_keys",
    "read_state",
    "accumulate_dtype",
    "taylor_attention_quadratic",
    "taylor_attention_linear",
    "taylor_attention_chunked",
    "taylor_attention_recurrent",
    "taylor_attention_step_reference",
    "empty_state",
    "zero_padded_keys",
    "repeat_kv",
    "taylor_attention_varlen_reference",
    "taylor_attention_prefill_varlen_reference",
]


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den[..., None], with 0 where den == 0 (a query that sees no key); gradient-safe."""
    ok = den != 0
    den_safe = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok.unsqueeze(-1), num / den_safe.unsqueeze(-1), torch.zeros_like(num))


def _key_keep(key_padding_mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """[B, Lk] float multiplier: 1 for real keys, 0 for padding (mask True = padding)."""
    if key_padding_mask is None:
        return None
    return (~key_padding_mask).to(dtype)


def zero_padded_keys(k, v, key_padding_mask):
    """k and v with the padded keys' rows set to 0 (selected, not multiplied: a padded key may hold NaN or inf,
    and still adds nothing). Their gradients are 0 there, as for any key that does not take part."""
    if key_padding_mask is None:
        return k, v
    pad = key_padding_mask[:, None, :, None]
    return torch.where(pad, 0.0, k), torch.where(pad, 0.0, v)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, heads, ...], key/value head j serving query heads j*G .. j*G + G - 1 (G = heads / Hkv)."""
    hk = x.shape[1]
    return x if hk == heads else x.repeat_interleave(heads // hk, dim=1)


def read_state(q, state: "TaylorState", scale=None):
    """The numerator ``phi(q)^T kv`` and normalizer ``phi(q)^T k_sum`` every query gets from a state (GQA: the state
    has the key/value heads), in the state's dtype: ``([B, H, Lq, Dv], [B, H, Lq])``."""
    acc = state.kv.dtype
    fq = taylor_feature_map(q.to(acc), scale)
    kv, ksum = repeat_kv(state.kv, q.shape[1]), repeat_kv(state.k_sum, q.shape[1])
    return torch.matmul(fq, kv), torch.einsum("bhlm,bhm->bhl", fq, ksum)


def state_of_keys(k, v, *, scale=None, key_padding_mask=None, initial_state=None, dtype=None) -> "TaylorState":
    """The state after every (unpadded) key: ``initial_state`` (or zeros) plus ``sum_j phi(k_j) [v_j^T, 1]``."""
    acc = dtype or (initial_state.kv.dtype if initial_state is not None else accumulate_dtype(k.dtype))
    k, v = zero_padded_keys(k.to(acc), v.to(acc), key_padding_mask)
    fk = taylor_feature_map(k, scale)
    keep = _key_keep(key_padding_mask, acc)
    if keep is not None:
        fk = fk * keep[:, None, :, None]
    kv, ksum = torch.matmul(fk.transpose(-1, -2), v), fk.sum(-2)
    if initial_state is not None:
        kv, ksum = kv + initial_state.kv.to(acc), ksum + initial_state.k_sum.to(acc)
    return TaylorState(kv, ksum)


def taylor_attention_naive(q, k, v, *, causal=False, scale=None, key_padding_mask=None, initial_state=None,
                           return_state=False):
    """The definition (dense ``[B, H, L, *]``, quadratic form): ``(out, state)``, ``state`` None unless
    ``return_state``. Every query sees ``initial_state`` (the state of keys before the first one) plus its visible
    unpadded keys; the returned state is the initial one plus every unpadded key. Computed in float32 (float64 for
    float64 inputs or states); ``out`` in q's dtype, the state in the initial state's dtype (else the accumulation
    dtype)."""
    out_dtype = q.dtype
    acc = accumulate_dtype(q.dtype)
    if initial_state is not None and initial_state.kv.dtype == torch.float64:
        acc = torch.float64
    d = q.shape[-1]
    scale = (1.0 / d**0.5) if scale is None else scale
    num, den = _quadratic_parts(q.to(acc), k.to(acc), v.to(acc), causal=causal, scale=scale,
                                key_padding_mask=key_padding_mask)
    if initial_state is not None:
        init = TaylorState(initial_state.kv.to(acc), initial_state.k_sum.to(acc))
        num0, den0 = read_state(q, init, scale)
        num, den = num + num0, den + den0
    out = _safe_divide(num, den).to(out_dtype)
    if not return_state:
        return out, None
    state = state_of_keys(k, v, scale=scale, key_padding_mask=key_padding_mask, initial_state=initial_state, dtype=acc)
    if initial_state is not None:
        state = TaylorState(state.kv.to(initial_state.kv.dtype), state.k_sum.to(initial_state.kv.dtype))
    return out, state


def _quadratic_parts(q, k, v, *, causal, scale, key_padding_mask):
    """Numerator [B, H, Lq, Dv] and normalizer [B, H, Lq] of the quadratic form (inputs in the accumulation dtype)."""
    k, v = zero_padded_keys(k, v, key_padding_mask)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    w = 1.0 + s + 0.5 * s * s
    if causal:  # end-aligned: query i sees the keys j <= i + Lk - Lq
        lq, lk = q.shape[-2], k.shape[-2]
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        w = w * visible.to(q.dtype)
    keep = _key_keep(key_padding_mask, q.dtype)
    if keep is not None:
        w = w * keep[:, None, None, :]
    return torch.matmul(w, v), w.sum(-1)


def taylor_attention_quadratic(q, k, v, *, causal=False, scale=None, key_padding_mask=None):
    """Taylor attention in the quadratic form: out_i = sum_j w_ij v_j / sum_j w_ij."""
    out_dtype = q.dtype
    acc = accumulate_dtype(q.dtype)
    d = q.shape[-1]
    scale = (1.0 / d**0.5) if scale is None else scale
    num, den = _quadratic_parts(q.to(acc), k.to(acc), v.to(acc), causal=causal, scale=scale,
                                key_padding_mask=key_padding_mask)
    return _safe_divide(num, den).to(out_dtype)


def taylor_attention_linear(q, k, v, *, causal=False, scale=None, key_padding_mask=None, symmetric=True):
    """Taylor attention in the linear (feature-map) form. Causal uses prefix sums over L x M x Dv."""
    out_dtype = q.dtype
    acc = accumulate_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    k, v = zero_padded_keys(k, v, key_padding_mask)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    fq = taylor_feature_map(q, scale, symmetric)
    fk = taylor_feature_map(k, scale, symmetric)
    keep = _key_keep(key_padding_mask, acc)
    if keep is not None:
        fk = fk * keep[:, None, :, None]
    if causal:  # end-aligned: query i reads the prefix sums up to key i + Lk - Lq
        off = k.shape[-2] - q.shape[-2]
        kv = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)[:, :, off:]  # [B,H,Lq,M,Dv]
        ksum = torch.cumsum(fk, dim=-2)[:, :, off:]
        num = torch.einsum("bhlm,bhlmv->bhlv", fq, kv)
        den = (fq * ksum).sum(-1)
    else:
        kv = torch.einsum("bhlm,bhlv->bhmv", fk, v)
        ksum = fk.sum(-2)
        num = torch.einsum("bhlm,bhmv->bhlv", fq, kv)
        den = torch.einsum("bhlm,bhm->bhl", fq, ksum)
    return _safe_divide(num, den).to(out_dtype)


def taylor_attention_chunked(q, k, v, *, scale=None, key_padding_mask=None, chunk_size=64, initial_state=None):
    """Causal Taylor attention, chunked: returns ``(out, final_state)``.

    Inside a chunk the quadratic form with a causal mask; across chunks the (kv, k_sum) state.
    ``initial_state`` (a TaylorState with the key/value heads) is the state of a preceding prefix. With
    Lq < Lk (end-aligned) the first Lk - Lq keys, seen by every query, join the state before the first chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = q.dtype
    acc = accumulate_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    k, v = zero_padded_keys(k, v, key_padding_mask)
    b, h, length, d = q.shape
    hk, off = k.shape[1], k.shape[2] - length
    scale = (1.0 / d**0.5) if scale is None else scale
    keep = _key_keep(key_padding_mask, acc)
    if initial_state is None:
        state = empty_state(b, hk, d, v.shape[-1], dtype=acc, device=q.device)
    else:
        state = TaylorState(initial_state.kv.to(acc), initial_state.k_sum.to(acc))
    kv, ksum = state

    def add(kv, ksum, start, stop):  # the state after the keys start:stop
        fk = taylor_feature_map(k[:, :, start:stop], scale)
        if keep is not None:
            fk = fk * keep[:, start:stop][:, None, :, None]
        return kv + torch.matmul(fk.transpose(-1, -2), v[:, :, start:stop]), ksum + fk.sum(-2)

    if off > 0:
        kv, ksum = add(kv, ksum, 0, off)
    outs = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        qc = q[:, :, start:stop]
        kc, vc = repeat_kv(k[:, :, off + start : off + stop], h), repeat_kv(v[:, :, off + start : off + stop], h)
        fq = taylor_feature_map(qc, scale)
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        w = (1.0 + s + 0.5 * s * s) * torch.ones(stop - start, stop - start, device=q.device, dtype=acc).tril()
        if keep is not None:
            w = w * keep[:, off + start : off + stop][:, None, None, :]
        num = torch.matmul(fq, repeat_kv(kv, h)) + torch.matmul(w, vc)
        den = torch.einsum("bhlm,bhm->bhl", fq, repeat_kv(ksum, h)) + w.sum(-1)
        outs.append(_safe_divide(num, den))
        kv, ksum = add(kv, ksum, off + start, off + stop)
    out = torch.cat(outs, dim=-2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
    return out.to(out_dtype), TaylorState(kv, ksum)


def taylor_attention_step_reference(q, k, v, state: TaylorState, *, scale=None):
    """One decoding step. q: [B, H, D]; k: [B, Hkv, D]; v: [B, Hkv, Dv]; state with Hkv heads.
    Returns ``(out [B, H, Dv], new_state)``."""
    out_dtype = q.dtype
    acc = state.kv.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    fq = taylor_feature_map(q, scale)
    fk = taylor_feature_map(k, scale)
    kv = state.kv + fk.unsqueeze(-1) * v.unsqueeze(-2)
    ksum = state.k_sum + fk
    num = torch.einsum("bhm,bhmv->bhv", fq, repeat_kv(kv, q.shape[1]))
    den = (fq * repeat_kv(ksum, q.shape[1])).sum(-1)
    return _safe_divide(num, den).to(out_dtype), TaylorState(kv, ksum)


def taylor_attention_recurrent(q, k, v, *, scale=None, key_padding_mask=None, initial_state=None):
    """Causal Taylor attention one token at a time (the decoding recurrence): ``(out, final_state)``.

    A padded key (mask True) leaves the state unchanged; its query still reads the state.
    """
    out_dtype = q.dtype
    acc = accumulate_dtype(q.dtype)
    b, h, length, d = q.shape
    if initial_state is None:
        initial_state = empty_state(b, h, d, v.shape[-1], dtype=acc, device=q.device)
    kv, ksum = initial_state.kv.to(acc), initial_state.k_sum.to(acc)
    k, v = zero_padded_keys(k.to(acc), v.to(acc), key_padding_mask)
    fq_all = taylor_feature_map(q.to(acc), scale)
    fk_all = taylor_feature_map(k, scale)
    keep = _key_keep(key_padding_mask, acc)
    if keep is not None:
        fk_all = fk_all * keep[:, None, :, None]
    v = v.to(acc)
    outs = []
    for t in range(length):
        fq, fk = fq_all[:, :, t], fk_all[:, :, t]
        kv = kv + fk.unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        ksum = ksum + fk
        num = torch.einsum("bhm,bhmv->bhv", fq, kv)
        den = (fq * ksum).sum(-1)
        outs.append(_safe_divide(num, den))
    out = torch.stack(outs, dim=-2) if outs else q.new_zeros(b, h, 0, v.shape[-1], dtype=acc)
    return out.to(out_dtype), TaylorState(kv, ksum)


def _sequences(x: torch.Tensor, cu: torch.Tensor):
    """The [1, H, L, *] view of each packed sequence of x [T, H, *]."""
    bounds = cu.tolist()
    return [x[bounds[i] : bounds[i + 1]].transpose(0, 1).unsqueeze(0) for i in range(len(bounds) - 1)]


def taylor_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None):
    """Packed sequences (q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv]), the definition per sequence."""
    outs = []
    for qs, ks, vs in zip(_sequences(q, cu_seqlens_q), _sequences(k, cu_seqlens_k), _sequences(v, cu_seqlens_k)):
        out, _ = taylor_attention_naive(qs, ks, vs, causal=causal, scale=scale)
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    return torch.cat(outs, dim=0)


def taylor_attention_prefill_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, initial_state=None):
    """Causal prefill of packed sequences: ``(out [Tq, H, Dv], TaylorState(kv [N, Hkv, M, Dv], k_sum [N, Hkv, M]))``."""
    n = cu_seqlens_q.shape[0] - 1
    d, dv = q.shape[-1], v.shape[-1]
    acc = initial_state.kv.dtype if initial_state is not None else accumulate_dtype(q.dtype)
    outs, kvs, ksums = [], [], []
    parts = zip(_sequences(q, cu_seqlens_q), _sequences(k, cu_seqlens_k), _sequences(v, cu_seqlens_k))
    for i, (qs, ks, vs) in enumerate(parts):
        init = None if initial_state is None else TaylorState(initial_state.kv[i : i + 1], initial_state.k_sum[i : i + 1])
        out, st = taylor_attention_chunked(qs.to(acc), ks.to(acc), vs.to(acc), scale=scale, initial_state=init)
        outs.append(out[0].transpose(0, 1).to(q.dtype))
        kvs.append(st.kv)
        ksums.append(st.k_sum)
    if n == 0:
        return q.new_zeros(0, q.shape[1], dv), empty_state(0, k.shape[1], d, dv, dtype=acc, device=q.device)
    return torch.cat(outs, dim=0), TaylorState(torch.cat(kvs, 0), torch.cat(ksums, 0))
