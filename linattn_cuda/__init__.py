"""linattn_cuda: exact second-order Taylor ("Based"-style) linear attention for PyTorch.

    out = taylor_attention(q, k, v, causal=True)          # [B,H,L,D], [B,H,L,D], [B,H,L,Dv]
    out, state = taylor_attention_prefill(q, k, v)        # causal, returns the decoding state
    out_t, state = taylor_attention_step(q_t, k_t, v_t, state)
    out = hybrid_attention(q, k, v, window=64)            # softmax in a window, Taylor beyond it
    out, cache = hybrid_attention_prefill(q, k, v, window=64)   # causal, returns the decoding cache
    out_t, cache = hybrid_attention_step(q_t, k_t, v_t, cache)  # updates the cache in place
"""
from . import nn
from .ops.taylor import registration as _registration  # noqa: F401  (fake and autograd kernels of torch.ops.linattn_cuda.*)
from ._extension import extension_loaded
from .api import (
    taylor_attention,
    taylor_attention_prefill,
    taylor_attention_prefill_varlen,
    taylor_attention_step,
    taylor_attention_varlen,
)
from .ops.dispatch import available_backends, backend_names
from .feature_map import feature_dim, taylor_feature_map
from .ops.hybrid.cache import HybridCache, empty_hybrid_cache
from .ops.hybrid.functions import (hybrid_attention, hybrid_attention_prefill, hybrid_attention_step,
                                   hybrid_attention_varlen, hybrid_backends)
from .ops.hybrid.naive import hybrid_attention_reference
from .ops.taylor.state import TaylorState, empty_state

__version__ = "0.1.0"

__all__ = [
    "taylor_attention",
    "taylor_attention_prefill",
    "taylor_attention_step",
    "taylor_attention_varlen",
    "taylor_attention_prefill_varlen",
    "hybrid_attention",
    "hybrid_attention_prefill",
    "hybrid_attention_varlen",
    "hybrid_attention_step",
    "hybrid_attention_reference",
    "hybrid_backends",
    "HybridCache",
    "empty_hybrid_cache",
    "taylor_feature_map",
    "feature_dim",
    "TaylorState",
    "empty_state",
    "available_backends",
    "backend_names",
    "extension_loaded",
    "nn",
]
