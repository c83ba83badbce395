"""``backend="triton"``: the Triton kernels behind linattn_cuda's backend interface.

* ``attention``: the quadratic (``parallel.py``) or the chunked linear (``chunk.py``) form, chosen per
  shape by :func:`choose_form`; forward and backward through ``torch.ops.linattn_cuda.triton_fwd``.
* ``prefill``: the chunked kernel with state in/out (``triton_prefill``); ``step``: ``step.py``.

Usable on CUDA tensors when triton imports, and on CPU tensors when TRITON_INTERPRET=1 was set before
triton was first imported (Triton's interpreter: slow, for tests). Inputs float16, bfloat16 or float32
with D <= 128 and Dv <= 256; decoding states float32.
"""
from __future__ import annotations

import torch

from ...problem import limit_violation
from ..state import TaylorState

__all__ = ["TritonBackend", "choose_form"]

# Form rule (see choose_form). First guesses from FLOP counts, to be retuned from GPU measurements
# (bench/triton_gpu_bench.py prints both forms side by side).
CHUNK_MAX_HEAD_DIM = 16  # the state has 1 + D + D^2 raw features: beyond D = 16 the chunked form loses
# Crossovers measured on an H200 (bf16, B=16, H=16, D=16, Dv=64; bench/results/gpu/triton_gpu_bench.md):
# causal fwd 4K parallel 1.67 ms / chunk 3.11, 8K 6.49 / 6.22; fwd+bwd 4K 8.16 / 8.89, 8K 31.6 / 17.8.
# Non-causal fwd 2K 0.64 / 0.89, 4K 2.64 / 1.76; fwd+bwd 2K 3.46 / 3.11, 4K 13.4 / 6.19.
CHUNK_MIN_LEN_CAUSAL = 6144  # causal: chunked from this length on
CHUNK_MIN_LEN_NONCAUSAL = 3072  # non-causal: chunked from this "effective" length 2 Lq Lk / (Lq + Lk) on


def choose_form(lq: int, lk: int, d: int, dv: int, causal: bool) -> str:
    """``"chunk"`` (chunked linear form, O(L)) or ``"parallel"`` (quadratic form, O(L^2)) for a shape.

    The chunked form costs ~4 L (1 + D + D^2) Dv and runs sequentially over chunks; the quadratic form
    costs ~2 Lq Lk (D + Dv) (half of it causal) and is parallel over L. Rule: chunked only for
    D <= CHUNK_MAX_HEAD_DIM and long sequences (CHUNK_MIN_LEN_CAUSAL / CHUNK_MIN_LEN_NONCAUSAL).
    """
    del dv  # both costs are linear in Dv
    if d > CHUNK_MAX_HEAD_DIM:
        return "parallel"
    if causal:
        return "chunk" if lq >= CHUNK_MIN_LEN_CAUSAL else "parallel"
    effective = 2 * lq * lk / max(1, lq + lk)
    return "chunk" if effective >= CHUNK_MIN_LEN_NONCAUSAL else "parallel"


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, device):
        device = torch.device(device)
        try:
            from . import common
        except ImportError as exc:
            return f"triton could not be imported ({exc})"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if common.INTERPRET:
                return None
            return (
                "Triton kernels run on CUDA tensors; CPU tensors need Triton's interpreter "
                "(TRITON_INTERPRET=1 set before triton is imported)"
            )
        return f"the 'triton' backend takes cuda tensors (cpu under TRITON_INTERPRET=1), got {device.type}"

    def cannot_serve(self, p):
        """Why the Triton kernels cannot compute the problem ``p`` (None when they can)."""
        reason = limit_violation(self.name, p)
        if reason is not None:
            return reason
        if p.packed:
            return "the triton kernels do not take packed variable-length sequences yet"
        if p.kv_heads != p.heads:
            return "the triton kernels do not take grouped-query attention (Hkv < H) yet"
        if p.causal and p.len_q != p.len_k:
            return "the triton kernels do not take causal attention with Lq < Lk (end-aligned) yet"
        if p.initial_state is not None or p.return_state:
            if p.kind == "step":
                return None if p.initial_state.kv.dtype == torch.float32 else "the triton kernels keep states in float32"
            if not p.causal:
                return "the triton kernels take a decoding state in causal calls only"
            if p.needs_grad:
                return "the triton kernels have no backward through a decoding state yet"
            if p.initial_state is not None and p.initial_state.kv.dtype != torch.float32:
                return "the triton kernels keep states in float32"
        return None

    def forward(self, p, q, k, v):
        from . import ops  # noqa: F401  (registers torch.ops.linattn_cuda.triton_*)

        if p.return_state or p.initial_state is not None:
            kv0, ks0 = (None, None) if p.initial_state is None else p.initial_state
            out, kv, k_sum = torch.ops.linattn_cuda.triton_prefill(q, k, v, p.key_padding_mask, kv0, ks0,
                                                                    float(p.scale))
            return out, (TaylorState(kv, k_sum) if p.return_state else None)
        chunked = choose_form(p.len_q, p.len_k, p.head_dim, p.value_dim, p.causal) == "chunk"
        out, _ = torch.ops.linattn_cuda.triton_fwd(q, k, v, p.key_padding_mask, bool(p.causal), float(p.scale), chunked)
        return out, None

    def step(self, p, q, k, v, state):
        from . import ops  # noqa: F401

        out, kv, k_sum = torch.ops.linattn_cuda.triton_step(q, k, v, state.kv, state.k_sum, float(p.scale))
        return out, TaylorState(kv, k_sum)
