"""Context parallelism on torch.distributed: one long sequence sharded across processes, which exchange Taylor
states (and a window's halo), never the sequence.

    from linattn_cuda.distributed import taylor_attention_cp, hybrid_attention_cp
    out_r = taylor_attention_cp(q_r, k_r, v_r, causal=True)          # every rank: its shard [B, H, L_r, D]
    out_r = hybrid_attention_cp(q_r, k_r, v_r, window=64)
    enable_context_parallel(model)   # every TaylorAttention / HybridAttention in model: sharded self-attention

Modules: ``layout`` (shard lengths and the call check every rank agrees on), ``collectives`` (the one all-gather
and its adjoint), ``taylor`` and ``hybrid`` (the attention functions), ``modules`` (the nn entry point).
"""
from .collectives import ShardExchange, all_gather
from .hybrid import hybrid_attention_cp
from .layout import ShardLayout
from .modules import enable_context_parallel, shard_layout, shard_bounds
from .taylor import taylor_attention_cp

__all__ = [
    "taylor_attention_cp",
    "hybrid_attention_cp",
    "enable_context_parallel",
    "shard_layout",
    "shard_bounds",
    "ShardLayout",
    "ShardExchange",
    "all_gather",
]
