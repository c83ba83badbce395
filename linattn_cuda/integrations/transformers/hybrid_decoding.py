"""Fixed-size decoding of hybrid attention: prefill a prompt into a cache, then one token at a time.

Hybrid attention (:func:`linattn_cuda.hybrid_attention`, causal) gives query ``i`` the weight ``exp(s_ij)`` for the
``window`` most recent keys ``i - W < j <= i`` and the Taylor weight ``1 + s_ij + s_ij^2 / 2`` for every key before
them, in one normalizer. A decoder therefore needs, per layer and key/value head, only

* the last ``W - 1`` keys and values (with their padding flags): a ring buffer, ``O(W * (D + Dv))``;
* the Taylor state ``(kv, k_sum)`` of the keys that have left the window: ``O(M * Dv)``, M = 1 + D + D(D+1)/2.

Each new token costs ``O(W * D + M * Dv)`` per head whatever the number of tokens before it.

:func:`hybrid_prefill` and :func:`hybrid_step` are composed from the package's public functions (the Taylor part
through the fused :func:`linattn_cuda.taylor_attention_prefill` and :func:`linattn_cuda.taylor_attention_step`); they
are the seam where fused ``hybrid_attention_prefill`` / ``hybrid_attention_step`` kernels can replace them.

How the Taylor part gets its numerator and normalizer from kernels that return *normalized* outputs: the state
always holds a *sink*, a key of zeros (weight ``1 + 0 + 0 = 1`` for every query) whose value is a one-hot extra
column, so a read of the state returns ``[N / (Z + 1), 1 / (Z + 1)]``, hence the Taylor numerator ``N`` and
normalizer ``Z`` of the real keys (as :mod:`linattn_cuda.hybrid` does with a sink key). A step folds the key
leaving the window into the state and reads it in one fused call, then takes that key's own weight
``1 + s + s^2/2`` back out of N and Z. Window and Taylor parts meet in one normalizer stabilized by
``m = max(max window logit, 0)`` wherever a Taylor key exists.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import TaylorState, empty_state, taylor_attention_prefill, taylor_attention_step

__all__ = ["HybridState", "empty_hybrid_state", "hybrid_prefill", "hybrid_step"]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (keys with exact softmax weights), got {window!r}")
    return window


class HybridState:
    """Decoding cache of one causal hybrid-attention layer; its tensors never grow.

    taylor:  :class:`linattn_cuda.TaylorState` of the keys that have left the window plus the sink (``kv
             [B, Hkv, M, Dv + 1]``: the last column is the sink's value; ``k_sum [B, Hkv, M]``: its feature 0 counts
             the keys + 1), float32 (float64 for float64 inputs).
    keys:    ``[B, Hkv, W - 1, D]`` ring buffer of the last ``W - 1`` keys (the inputs' dtype);
    values:  ``[B, Hkv, W - 1, Dv]`` their values;
    valid:   ``[B, W - 1]`` bool, False for an empty slot or a padded key;
    start:   the slot of the oldest key (the next to leave the window);
    window, scale: the hybrid's window and logit scale (fixed for the life of the cache).
    """

    __slots__ = ("taylor", "keys", "values", "valid", "start", "window", "scale")

    def __init__(self, taylor: TaylorState, keys, values, valid, start: int, window: int, scale: float):
        self.taylor, self.keys, self.values, self.valid = taylor, keys, values, valid
        self.start, self.window, self.scale = start, window, scale

    def tensors(self) -> list[torch.Tensor]:
        return [*self.taylor, self.keys, self.values, self.valid]

    def map_batch(self, fn) -> "HybridState":
        """The state with ``fn`` applied to the batch dimension of every tensor (beam reordering, selection)."""
        return HybridState(TaylorState(*(fn(t) for t in self.taylor)), fn(self.keys), fn(self.values),
                           fn(self.valid), self.start, self.window, self.scale)

    def chronological(self):
        """Ring contents oldest first: ``(keys, values, valid)``."""
        if self.start == 0:
            return self.keys, self.values, self.valid
        return (torch.roll(self.keys, -self.start, 2), torch.roll(self.values, -self.start, 2),
                torch.roll(self.valid, -self.start, 1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def empty_hybrid_state(batch: int, kv_heads: int, head_dim: int, value_dim: int, *, window: int, scale: float,
                       dtype=torch.float32, device=None) -> HybridState:
    """The cache of an empty prefix: no keys in the window, a zero Taylor state."""
    _check_window(window)
    acc = _accumulate_dtype(dtype)
    ring = window - 1
    sink = empty_state(batch, kv_heads, head_dim, value_dim + 1, dtype=acc, device=device)
    sink.kv[..., 0, value_dim] = 1.0  # phi(0) = [1, 0, ...] times the value [0, ..., 0, 1]
    sink.k_sum[..., 0] = 1.0
    return HybridState(
        sink,
        torch.zeros(batch, kv_heads, ring, head_dim, dtype=dtype, device=device),
        torch.zeros(batch, kv_heads, ring, value_dim, dtype=dtype, device=device),
        torch.zeros(batch, ring, dtype=torch.bool, device=device),
        0, window, float(scale),
    )


def _combine(s, values, valid, num_far, den_far, out_dtype):
    """One normalizer for the window logits ``s [..., Q, K]`` (their values ``[..., K, Dv]`` and flags ``valid``
    broadcastable) and the Taylor numerator ``num_far [..., Q, Dv]`` and normalizer ``den_far [..., Q]``."""
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1)  # -inf where no window key is valid
    has_far = den_far > 0
    m = torch.where(has_far, m.clamp_min(0.0), torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = torch.exp(s - m.unsqueeze(-1))  # 0 on invalid keys
    far = torch.where(has_far, torch.exp(-m), torch.zeros_like(m))  # <= 1 where it matters
    num = torch.matmul(p, values) + far.unsqueeze(-1) * num_far
    den = p.sum(-1) + far * den_far
    ok = den > 0
    out = num / torch.where(ok, den, torch.ones_like(den)).unsqueeze(-1)  # num = 0 where den = 0
    return out.to(out_dtype)


def hybrid_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[HybridState] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, HybridState]:
    """Causal hybrid attention of a chunk of new tokens after ``state`` (None: an empty prefix).

    ``q [B, H, L, D]``, ``k [B, Hkv, L, D]``, ``v [B, Hkv, L, Dv]`` (Hkv = H unless ``enable_gqa``),
    ``key_padding_mask [B, L]`` bool (True = padding: excluded from the window and from the state).
    Returns ``(out [B, H, L, Dv], new_state)``: ``out`` equals the last L rows of
    :func:`linattn_cuda.hybrid_attention` over the whole sequence (prefix + chunk); ``state`` is not modified.
    Cost O(L * (W * D + M * Dv)) per head, memory O(L * W) for the window logits.
    """
    window = _check_window(window)
    b, h, length, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    if k.shape[:3] != (b, hk, length) or v.shape[:3] != (b, hk, length) or k.shape[-1] != d:
        raise ValueError(f"q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if h % hk or (hk != h and not enable_gqa):
        raise ValueError(f"k and v have {hk} heads for {h} query heads: pass enable_gqa=True (H % Hkv == 0)")
    if key_padding_mask is not None and key_padding_mask.shape != (b, length):
        raise ValueError(f"key_padding_mask must be [B, L] = [{b}, {length}], got {tuple(key_padding_mask.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    if state is None:
        state = empty_hybrid_state(b, hk, d, dv, window=window, scale=scale, dtype=k.dtype, device=k.device)
    elif state.window != window or state.scale != scale:
        raise ValueError(f"state was built with window={state.window}, scale={state.scale}; got window={window}, "
                         f"scale={scale}")
    if length == 0:
        return q.new_zeros(b, h, 0, dv), state
    acc = state.taylor.kv.dtype
    g, ring = h // hk, window - 1
    new_valid = torch.ones(b, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        new_valid = ~key_padding_mask
    ring_k, ring_v, ring_valid = state.chronological()
    keys = torch.cat([ring_k, k.to(ring_k.dtype)], dim=2).to(acc)  # [B, Hkv, W-1+L, D]: query i's own key at i+W-1
    values = torch.cat([ring_v, v.to(ring_v.dtype)], dim=2).to(acc)
    valid = torch.cat([ring_valid, new_valid], dim=1)  # [B, W-1+L]
    qa = q.to(acc)

    # Taylor part: query i sees the state plus keys[0 .. i-1] (those at distance >= W): one masked dummy key in
    # front shifts the causal mask by one; one extra query at the end makes the new state take keys[L-1] too
    qs = torch.cat([qa, qa.new_zeros(b, h, 1, d)], dim=2)
    ks = torch.cat([keys.new_zeros(b, hk, 1, d), keys[:, :, :length]], dim=2)
    vs = F.pad(values[:, :, :length], (0, 1, 1, 0))  # [0-row, then the values with a 0 in the sink column]
    mask_s = torch.cat([valid.new_ones(b, 1), ~valid[:, :length]], dim=1)
    o, new_taylor = taylor_attention_prefill(qs, ks, vs, scale=scale, key_padding_mask=mask_s,
                                             initial_state=state.taylor, enable_gqa=hk != h, backend=backend)
    o = o[:, :, :length].to(acc)
    inv = o[..., dv]  # 1 / (Z + 1), in (0, 1]; exactly 1 where no real key is in the state
    num_far = o[..., :dv] / inv.unsqueeze(-1)
    den_far = 1.0 / inv - 1.0

    # window part, in blocks of W queries against the 2W keys of their own and the next key block
    n = -(-length // window)
    qb = F.pad(qa, (0, 0, 0, n * window - length)).view(b, hk, g, n, window, d)
    total = (n + 1) * window
    kb = F.pad(keys, (0, 0, 0, total - keys.shape[2])).view(b, hk, n + 1, window, d)
    vb = F.pad(values, (0, 0, 0, total - values.shape[2])).view(b, hk, n + 1, window, dv)
    validb = F.pad(valid, (0, total - valid.shape[1])).view(b, n + 1, window)
    kb = torch.cat([kb[:, :, :n], kb[:, :, 1:]], dim=3)  # [B, Hkv, n, 2W, D]
    vb = torch.cat([vb[:, :, :n], vb[:, :, 1:]], dim=3)
    validb = torch.cat([validb[:, :n], validb[:, 1:]], dim=2)  # [B, n, 2W]
    r = torch.arange(window, device=q.device)[:, None]
    c = torch.arange(2 * window, device=q.device)[None, :]
    band = (c >= r) & (c < r + window)  # key block column c is keys[bW + c]; query r of block b is at bW + r + W - 1
    inside = band & validb[:, :, None, :]  # [B, n, W, 2W]
    s = torch.matmul(qb, kb.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, n, W, 2W]
    num_far = num_far.reshape(b, hk, g, length, dv)
    den_far = den_far.reshape(b, hk, g, length)
    pad_q = n * window - length
    num_far = F.pad(num_far, (0, 0, 0, pad_q)).view(b, hk, g, n, window, dv)
    den_far = F.pad(den_far, (0, pad_q)).view(b, hk, g, n, window)
    out = _combine(s, vb.unsqueeze(2), inside[:, None, None], num_far, den_far, q.dtype)  # [B, Hkv, G, n, W, Dv]
    out = out.reshape(b, h, n * window, dv)[:, :, :length]

    new_state = HybridState(new_taylor, keys[:, :, length:].to(state.keys.dtype).contiguous(),
                            values[:, :, length:].to(state.values.dtype).contiguous(), valid[:, length:].contiguous(),
                            0, window, scale)
    return out, new_state


def hybrid_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: HybridState,
    *,
    valid: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding step of causal hybrid attention, updating ``state`` in place: O(W * D + M * Dv) per head.

    ``q [B, H, 1, D]`` (or ``[B, H, D]``), ``k [B, Hkv, 1, D]``, ``v [B, Hkv, 1, Dv]`` (or without the length dim);
    ``valid [B]`` bool (False: the new token is padding, its key is not kept). Returns the output in ``q``'s shape
    convention. The window and the scale are the state's.
    """
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[2] != 1 or k.shape[2] != 1 or v.shape[2] != 1:
            raise ValueError(f"hybrid_step takes one token: q, k, v of length 1, got {q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    b, h, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    if state.keys.shape[:2] != (b, hk) or state.keys.shape[-1] != d:
        raise ValueError(f"state holds batch {state.keys.shape[0]}, {state.keys.shape[1]} key/value heads of dim "
                         f"{state.keys.shape[-1]}; got k {tuple(k.shape)}")
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=q.device)
    old = state.taylor
    acc = old.kv.dtype
    g, ring, scale = h // hk, state.window - 1, state.scale
    qa = q.to(acc)
    if ring:  # the oldest key leaves the window for the state; the new one takes its slot
        slot = state.start
        k_fold, v_fold, fold_valid = state.keys[:, :, slot].to(acc), state.values[:, :, slot].to(acc), state.valid[:, slot]
    else:  # a window of one: the new key goes straight to the state
        k_fold, v_fold, fold_valid = k.to(acc), v.to(acc), valid

    # Taylor part: fold k_fold and read the state in one fused step, then take k_fold's own weight back out
    o, new = taylor_attention_step(qa, k_fold, F.pad(v_fold, (0, 1)), old, scale=scale, enable_gqa=hk != h,
                                   backend=backend)
    o = o.to(acc).view(b, hk, g, dv + 1)
    inv = o[..., dv]  # 1 / (Z' + 1), Z' including k_fold
    s_fold = torch.matmul(qa.view(b, hk, g, d), k_fold.unsqueeze(-1)).squeeze(-1) * scale  # [B, Hkv, G]
    w_fold = 1 + s_fold + s_fold * s_fold / 2
    has_far = (old.k_sum[..., 0] > 1.5)[:, :, None]  # keys before the window (feature 0 counts them, + the sink)
    num_far = torch.where(has_far.unsqueeze(-1), o[..., :dv] / inv.unsqueeze(-1) - w_fold.unsqueeze(-1) * v_fold[:, :, None],
                          torch.zeros((), dtype=acc))
    den_far = torch.where(has_far, 1.0 / inv - 1.0 - w_fold, torch.zeros((), dtype=acc))
    if bool(fold_valid.all()):
        state.taylor = new
    else:  # a padded (or empty) slot leaves the window: the state stays as it was for that row
        keep = fold_valid.view(b, 1, 1)
        state.taylor = TaylorState(torch.where(keep.unsqueeze(-1), new.kv, old.kv), torch.where(keep, new.k_sum, old.k_sum))

    # window part: the ring (any order: a sum) and the new key
    keys = torch.cat([state.keys.to(acc), k.to(acc).unsqueeze(2)], dim=2)  # [B, Hkv, W, D]
    values = torch.cat([state.values.to(acc), v.to(acc).unsqueeze(2)], dim=2)
    key_valid = torch.cat([state.valid, valid[:, None]], dim=1)  # [B, W]
    s = torch.matmul(qa.view(b, hk, g, d), keys.transpose(-1, -2)) * scale  # [B, Hkv, G, W]
    out = _combine(s.unsqueeze(-2), values.unsqueeze(2), key_valid[:, None, None, None, :], num_far.unsqueeze(-2),
                   den_far.unsqueeze(-1), q.dtype).reshape(b, h, dv)
    if ring:
        state.keys[:, :, slot] = k.to(state.keys.dtype)
        state.values[:, :, slot] = v.to(state.values.dtype)
        state.valid[:, slot] = valid
        state.start = (slot + 1) % ring
    return out.unsqueeze(2) if squeeze else out


def _state_from_prefix(k, v, key_padding_mask, *, window, scale, num_heads, backend) -> HybridState:
    """The cache after the keys ``k``/``v [B, Hkv, P, *]`` (no outputs needed): for attention with Lq < Lk."""
    b, hk, p, d = k.shape
    q = k.new_zeros(b, num_heads, p, d)
    return hybrid_prefill(q, k, v, window=window, scale=scale, key_padding_mask=key_padding_mask,
                          enable_gqa=num_heads != hk, backend=backend)[1]


def hybrid_attention_with_prefix(q, k, v, *, window, scale=None, key_padding_mask=None, backend="auto"):
    """Causal hybrid attention of ``Lq`` new queries against ``Lk >= Lq`` keys, end-aligned (the new tokens are the
    last ``Lq`` keys): the prefix goes through the cache, O(Lk) per query block. ``key_padding_mask [B, Lk]``."""
    lq, lk = q.shape[2], k.shape[2]
    if lq > lk:
        raise ValueError(f"causal hybrid attention needs Lq <= Lk (new tokens at the end), got Lq={lq}, Lk={lk}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    p = lk - lq
    pre_mask = None if key_padding_mask is None else key_padding_mask[:, :p]
    new_mask = None if key_padding_mask is None else key_padding_mask[:, p:]
    state = _state_from_prefix(k[:, :, :p], v[:, :, :p], pre_mask, window=window, scale=scale,
                               num_heads=q.shape[1], backend=backend)
    return hybrid_prefill(q, k[:, :, p:], v[:, :, p:], window=window, scale=scale, key_padding_mask=new_mask,
                          state=state, enable_gqa=k.shape[1] != q.shape[1], backend=backend)[0]

