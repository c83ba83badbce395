"""The compiled backends: ``cpu`` (csrc/cpu) and ``cuda`` (csrc/cuda), both through torch.ops.linattn_cuda."""
from __future__ import annotations

import torch

from . import registration  # noqa: F401  (registers fake kernels and autograd)
from ..problem import check_fused_limits
from ..._extension import REBUILD_HINT, EXTENSION_ERROR, extension_loaded, has_kernel
from .naive import TaylorState

MAX_HEAD_DIM = 128
MAX_VALUE_DIM = 256


class ExtensionBackend:
    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type
        self.dispatch_key = device_type.upper()
        # csrc/cpu has grouped-query attention, end-aligned causal and varlen; csrc/cuda not yet (it checks).
        self.features = frozenset({"gqa", "causal_lq_lt_lk", "varlen"}) if device_type == "cpu" else frozenset()

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name!r} backend takes {self.device_type} tensors"
        if not extension_loaded():
            return f"linattn_cuda._C could not be imported ({EXTENSION_ERROR}); {REBUILD_HINT}"
        if not has_kernel(self.dispatch_key):
            return (
                "linattn_cuda was not compiled with CUDA support; rebuild with a CUDA toolkit and a CUDA build "
                "of torch: `pip install --no-build-isolation -e .`"
            )
        return None

    def attention(self, q, k, v, causal, scale, key_padding_mask):
        check_fused_limits(self.name, q, v, MAX_HEAD_DIM, MAX_VALUE_DIM)
        out, _ = torch.ops.linattn_cuda.taylor_fwd(q, k, v, key_padding_mask, causal, scale)
        return out

    def prefill(self, q, k, v, scale, key_padding_mask, initial_state):
        check_fused_limits(self.name, q, v, MAX_HEAD_DIM, MAX_VALUE_DIM)
        kv, k_sum = (None, None) if initial_state is None else initial_state
        out, kv, k_sum = torch.ops.linattn_cuda.taylor_prefill(q, k, v, key_padding_mask, kv, k_sum, scale)
        return out, TaylorState(kv, k_sum)

    def step(self, q, k, v, state, scale):
        check_fused_limits(self.name, q, v, MAX_HEAD_DIM, MAX_VALUE_DIM)
        out, kv, k_sum = torch.ops.linattn_cuda.taylor_step(q, k, v, state.kv, state.k_sum, scale)
        return out, TaylorState(kv, k_sum)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale):
        check_fused_limits(self.name, q, v, MAX_HEAD_DIM, MAX_VALUE_DIM)
        out, _ = torch.ops.linattn_cuda.taylor_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
        return out

    def prefill_varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, initial_state):
        check_fused_limits(self.name, q, v, MAX_HEAD_DIM, MAX_VALUE_DIM)
        kv, k_sum = (None, None) if initial_state is None else initial_state
        out, kv, k_sum = torch.ops.linattn_cuda.taylor_varlen_prefill(
            q, k, v, cu_seqlens_q, cu_seqlens_k, kv, k_sum, scale
        )
        return out, TaylorState(kv, k_sum)
