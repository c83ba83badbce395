"""The recurrent state of Taylor attention (decoding, chunked prefill, context parallelism)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...feature_map import feature_dim

__all__ = ["TaylorState", "accumulate_dtype", "empty_state"]


class TaylorState(NamedTuple):
    """Recurrent decoding state of one causal Taylor attention layer (symmetric feature map).

    kv:    [B, H, M, Dv]  sum_j phi(k_j) v_j^T
    k_sum: [B, H, M]      sum_j phi(k_j)
    Both float32 (float64 when the inputs are float64).
    """

    kv: torch.Tensor
    k_sum: torch.Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_state(batch: int, heads: int, head_dim: int, value_dim: int, *, dtype=torch.float32, device=None) -> TaylorState:
    """The state of an empty prefix (all zeros)."""
    m = feature_dim(head_dim)
    return TaylorState(
        torch.zeros(batch, heads, m, value_dim, dtype=dtype, device=device),
        torch.zeros(batch, heads, m, dtype=dtype, device=device),
    )


