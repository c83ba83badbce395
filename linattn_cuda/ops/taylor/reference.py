"""The pure-PyTorch backend: quadratic form for short keys, linear/chunked forms for long ones."""
from __future__ import annotations

from . import naive as ref

# Above this many query-key pairs the linear forms are used (bounded memory, O(L) time).
QUADRATIC_MAX_PAIRS = 1 << 22


class ReferenceBackend:
    name = "reference"
    features = frozenset({"gqa", "causal_lq_lt_lk", "varlen"})

    def unavailable_reason(self, device):
        return None

    def attention(self, q, k, v, causal, scale, key_padding_mask):
        lq, lk = q.shape[-2], k.shape[-2]
        if lq * lk <= QUADRATIC_MAX_PAIRS:
            return ref.taylor_attention_quadratic(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        if causal:
            out, _ = ref.taylor_attention_chunked(q, k, v, scale=scale, key_padding_mask=key_padding_mask)
            return out
        return ref.taylor_attention_linear(q, k, v, causal=False, scale=scale, key_padding_mask=key_padding_mask)

    def prefill(self, q, k, v, scale, key_padding_mask, initial_state):
        return ref.taylor_attention_chunked(
            q, k, v, scale=scale, key_padding_mask=key_padding_mask, initial_state=initial_state
        )

    def step(self, q, k, v, state, scale):
        return ref.taylor_attention_step_reference(q, k, v, state, scale=scale)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale):
        return ref.taylor_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale)

    def prefill_varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, initial_state):
        return ref.taylor_attention_prefill_varlen_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, initial_state=initial_state
        )
