"""The compiled backends ``cpu`` (csrc/cpu) and ``cuda`` (csrc/cuda): the op family ``torch.ops.linattn_cuda.taylor_*``
(schemas in csrc/ops.cpp, autograd and fake kernels in ``registration``)."""
from __future__ import annotations

import torch

from . import registration  # noqa: F401  (registers fake kernels and autograd)
from ..._extension import EXTENSION_ERROR, REBUILD_HINT, extension_loaded, has_kernel
from ..problem import limit_violation
from .state import TaylorState


def _state_args(state):
    return (None, None) if state is None else (state.kv, state.k_sum)


class ExtensionBackend:
    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type
        self.dispatch_key = device_type.upper()

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

    def cannot_serve(self, p):
        """Why this backend's kernels cannot compute the problem ``p`` (None when they can)."""
        reason = limit_violation(self.name, p)
        if reason is not None or self.name == "cpu":
            return reason
        # csrc/cuda: dense multi-head problems (Lq == Lk when causal); the rest is being ported (issue 18).
        if p.packed:
            return "the cuda kernels do not take packed variable-length sequences yet"
        if p.kv_heads != p.heads:
            return "the cuda kernels do not take grouped-query attention (Hkv < H) yet"
        if p.causal and p.len_q != p.len_k:
            return "the cuda kernels do not take causal attention with Lq < Lk (end-aligned) yet"
        if p.initial_state is not None and not p.causal:
            return "the cuda kernels take an initial state in causal calls only"
        if p.return_state and not p.causal:
            return "the cuda kernels return the final state of causal calls only"
        if p.needs_grad and (p.initial_state is not None or p.return_state):
            return "the cuda kernels have no backward through a decoding state yet"
        return None

    def forward(self, p, q, k, v):
        kv0, ks0 = _state_args(p.initial_state)
        out, _, kv, k_sum = torch.ops.linattn_cuda.taylor_fwd(
            q, k, v, p.key_padding_mask, p.cu_seqlens_q, p.cu_seqlens_k, kv0, ks0, p.causal, p.scale, p.return_state
        )
        return out, (TaylorState(kv, k_sum) if p.return_state else None)

    def step(self, p, q, k, v, state):
        out, kv, k_sum = torch.ops.linattn_cuda.taylor_step(q, k, v, state.kv, state.k_sum, p.scale)
        return out, TaylorState(kv, k_sum)
