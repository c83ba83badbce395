"""``backend="reference"``: pure PyTorch, every feature, differentiable by autograd; the CPU fallback when the
extension is not built, never chosen silently on a GPU. Dense calls: the quadratic form (the definition) while
``Lq * Lk`` is small, else the chunked form (causal) or the linear form (non-causal), whose memory is linear in L.
Packed calls loop over the sequences."""
from __future__ import annotations

import torch

from . import naive
from .state import TaylorState, empty_state

# Above this many query-key pairs per (batch, head) the linear forms are used (bounded memory, O(L) time).
QUADRATIC_MAX_PAIRS = 1 << 22


def _dense(q, k, v, *, causal, scale, key_padding_mask, initial_state, return_state):
    lq, lk = q.shape[-2], k.shape[-2]
    if lq * lk <= QUADRATIC_MAX_PAIRS:
        return naive.taylor_attention_naive(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                            initial_state=initial_state, return_state=return_state)
    if causal:
        out, state = naive.taylor_attention_chunked(q, k, v, scale=scale, key_padding_mask=key_padding_mask,
                                                    initial_state=initial_state)
        if state is not None and initial_state is not None:
            state = TaylorState(state.kv.to(initial_state.kv.dtype), state.k_sum.to(initial_state.kv.dtype))
        return out, (state if return_state else None)
    # non-causal, linear form: every query reads the state of all keys
    state = naive.state_of_keys(k, v, scale=scale, key_padding_mask=key_padding_mask, initial_state=initial_state)
    num, den = naive.read_state(q, state, scale)
    out = torch.where(den.unsqueeze(-1) != 0, num / torch.where(den != 0, den, 1.0).unsqueeze(-1), 0.0).to(q.dtype)
    return out, (state if return_state else None)


def _sequences(x: torch.Tensor, bounds: list):
    """The [1, H, L, *] view of each packed sequence of x [T, H, *]."""
    return [x[bounds[i] : bounds[i + 1]].transpose(0, 1).unsqueeze(0) for i in range(len(bounds) - 1)]


class ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device):
        return None

    def cannot_serve(self, problem):
        return None

    def forward(self, p, q, k, v):
        """``(out, state)`` of the problem ``p`` (``state`` None unless ``p.return_state``)."""
        if not p.packed:
            return _dense(q, k, v, causal=p.causal, scale=p.scale, key_padding_mask=p.key_padding_mask,
                          initial_state=p.initial_state, return_state=p.return_state)
        bq, bk = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
        outs, kvs, sums = [], [], []
        init = p.initial_state
        for n, (qs, ks, vs) in enumerate(zip(_sequences(q, bq), _sequences(k, bk), _sequences(v, bk))):
            s0 = None if init is None else TaylorState(init.kv[n : n + 1], init.k_sum[n : n + 1])
            out, state = _dense(qs, ks, vs, causal=p.causal, scale=p.scale, key_padding_mask=None, initial_state=s0,
                                return_state=p.return_state)
            outs.append(out[0].transpose(0, 1))
            if p.return_state:
                kvs.append(state.kv)
                sums.append(state.k_sum)
        out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, p.heads, p.value_dim)
        if not p.return_state:
            return out, None
        if not kvs:
            dt = init.kv.dtype if init is not None else naive.accumulate_dtype(q.dtype)
            return out, empty_state(0, p.kv_heads, p.head_dim, p.value_dim, dtype=dt, device=q.device)
        return out, TaylorState(torch.cat(kvs, 0), torch.cat(sums, 0))

    def step(self, p, q, k, v, state):
        return naive.taylor_attention_step_reference(q, k, v, state, scale=p.scale)
