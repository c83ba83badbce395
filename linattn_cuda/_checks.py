"""Argument checks shared by every public entry point: each error names the argument and what was expected."""
from __future__ import annotations

from typing import Optional

import torch

from .feature_map import feature_dim

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}"
        )


def _check_same(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}")


def check_key_padding_mask(mask: Optional[torch.Tensor], batch: int, key_len: int, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape [B, Lk], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != (batch, key_len):
        raise ValueError(f"key_padding_mask must have shape [B, Lk] = [{batch}, {key_len}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on the same device as q ({device}), got {mask.device}")


def check_attention_inputs(q, k, v, *, causal: bool, key_padding_mask=None) -> None:
    _check_tensor("q", q, 4, "[B, H, Lq, D]")
    _check_tensor("k", k, 4, "[B, H, Lk, D]")
    _check_tensor("v", v, 4, "[B, H, Lk, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[1] != h:
        raise ValueError(f"k must have the batch and head sizes of q ({b}, {h}), got shape {tuple(k.shape)}")
    if v.shape[0] != b or v.shape[1] != h:
        raise ValueError(f"v must have the batch and head sizes of q ({b}, {h}), got shape {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k must have the feature dim D of q ({d}), got shape {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the length Lk of k ({k.shape[2]}), got shape {tuple(v.shape)}")
    if d < 1:
        raise ValueError("q and k must have a feature dim D >= 1")
    if causal and lq != k.shape[2]:
        raise ValueError(f"causal attention needs Lq == Lk, got q length {lq} and k length {k.shape[2]}")
    check_key_padding_mask(key_padding_mask, b, k.shape[2], q.device)


def check_step_inputs(q, k, v, state) -> None:
    _check_tensor("q", q, 3, "[B, H, D]")
    _check_tensor("k", k, 3, "[B, H, D]")
    _check_tensor("v", v, 3, "[B, H, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    b, h, d = q.shape
    if tuple(k.shape) != (b, h, d):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have the batch and head sizes of q ({b}, {h}), got shape {tuple(v.shape)}")
    check_state(state, b, h, d, v.shape[-1], q.device)


def check_state(state, batch: int, heads: int, head_dim: int, value_dim: int, device) -> None:
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError("state must be a TaylorState(kv, k_sum), as returned by taylor_attention_prefill")
    kv, k_sum = state
    m = feature_dim(head_dim)
    for name, x, shape in (
        ("state.kv", kv, (batch, heads, m, value_dim)),
        ("state.k_sum", k_sum, (batch, heads, m)),
    ):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (M = {m} features for D = {head_dim}), got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name} must be on the same device as q ({device}), got {x.device}")
    if kv.dtype != k_sum.dtype:
        raise TypeError(f"state.kv and state.k_sum must share a dtype, got {kv.dtype} and {k_sum.dtype}")


def check_fused_limits(backend: str, q: torch.Tensor, v: torch.Tensor, max_head_dim: int, max_value_dim: int) -> None:
    d, dv = q.shape[-1], v.shape[-1]
    if d > max_head_dim:
        raise ValueError(f"backend {backend!r} supports q/k feature dim D <= {max_head_dim}, got D = {d}")
    if dv > max_value_dim:
        raise ValueError(f"backend {backend!r} supports value dim Dv <= {max_value_dim}, got Dv = {dv}")
