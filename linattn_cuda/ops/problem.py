"""Argument checks shared by every public entry point: each error names the argument and what was expected."""
from __future__ import annotations

from typing import Optional

import torch

from ..feature_map import feature_dim

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


def check_kv_heads(q, k, v, *, enable_gqa: bool, packed: bool = False) -> int:
    """The key/value heads Hkv (dim 1): H without ``enable_gqa``, else a divisor of H (query head h reads
    key/value head h // (H // Hkv), as in SDPA). Dense [B, H, ...]: the batch sizes must agree too; packed
    [T, H, ...]: dim 0 is a token count (checked by the caller)."""
    head = 1
    h, hk = q.shape[head], k.shape[head]
    lead_q, lead_k, lead_v = ((), (), ()) if packed else (tuple(q.shape[:1]), tuple(k.shape[:1]), tuple(v.shape[:1]))
    sizes = "head count" if packed else "batch and head sizes"

    def fmt(*sizes_):
        return ", ".join(map(str, sizes_))

    if not enable_gqa:
        if lead_k != lead_q or hk != h:
            raise ValueError(
                f"k must have the {sizes} of q ({fmt(*lead_q, h)}), got shape {tuple(k.shape)} "
                "(for fewer key/value heads than query heads pass enable_gqa=True)"
            )
        if lead_v != lead_q or v.shape[head] != h:
            raise ValueError(f"v must have the {sizes} of q ({fmt(*lead_q, h)}), got shape {tuple(v.shape)}")
        return h
    if lead_k != lead_q:
        raise ValueError(f"k must have the batch size of q ({fmt(*lead_q)}), got shape {tuple(k.shape)}")
    if not (hk == h or (hk > 0 and h % hk == 0)):
        raise ValueError(
            f"enable_gqa=True needs the query heads of q ({h}) to be a multiple of the key/value heads of k ({hk}), "
            f"got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if lead_v != lead_k or v.shape[head] != hk:
        raise ValueError(f"v must have the {sizes} of k ({fmt(*lead_k, hk)}), got shape {tuple(v.shape)}")
    return hk


def check_attention_inputs(q, k, v, *, causal: bool, key_padding_mask=None, enable_gqa: bool = False) -> None:
    _check_tensor("q", q, 4, "[B, H, Lq, D]")
    _check_tensor("k", k, 4, "[B, Hkv, Lk, D]" if enable_gqa else "[B, H, Lk, D]")
    _check_tensor("v", v, 4, "[B, Hkv, Lk, Dv]" if enable_gqa else "[B, H, Lk, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    b, h, lq, d = q.shape
    check_kv_heads(q, k, v, enable_gqa=enable_gqa)
    if k.shape[3] != d:
        raise ValueError(f"k must have the feature dim D of q ({d}), got shape {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the length Lk of k ({k.shape[2]}), got shape {tuple(v.shape)}")
    if d < 1:
        raise ValueError("q and k must have a feature dim D >= 1")
    check_causal_lengths(causal, lq, k.shape[2])
    check_key_padding_mask(key_padding_mask, b, k.shape[2], q.device)


def check_causal_lengths(causal: bool, lq: int, lk: int, where: str = "") -> None:
    if causal and lq > lk:
        raise ValueError(
            f"causal attention needs Lq <= Lk (end-aligned: query i sees keys j <= i + Lk - Lq), "
            f"got q length {lq} and k length {lk}{where}"
        )


MAX_TOKENS = 2**31 - 1  # cu_seqlens are int32


def check_cu_seqlens(name: str, cu, total: int, device, *, check_values: bool = True):
    """cu_seqlens: int32 [N + 1] on q's device, 0 = cu[0] <= cu[1] <= ... <= cu[N] = total. Returns the
    per-sequence lengths as a list when ``check_values`` (reads the values: one host sync on a GPU), else None."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape [N + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N + 1] (N sequences), got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {cu.device}")
    if total > MAX_TOKENS:
        raise ValueError(f"{name}: at most 2^31 - 1 tokens are supported (int32 offsets), got {total}")
    if not check_values:
        return None
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, got {values[i - 1]} then {values[i]} at index {i}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of tokens ({total}), got {values[-1]}")
    return [values[i + 1] - values[i] for i in range(len(values) - 1)]


def check_varlen_inputs(q, k, v, cu_q, cu_k, *, causal: bool, enable_gqa: bool = False) -> int:
    """Packed varlen inputs q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] and their cu_seqlens; returns N.
    The values of cu_seqlens are checked except while torch.compile traces (the C++ kernels check them too)."""
    _check_tensor("q", q, 3, "[Tq, H, D]")
    _check_tensor("k", k, 3, "[Tk, Hkv, D]" if enable_gqa else "[Tk, H, D]")
    _check_tensor("v", v, 3, "[Tk, Hkv, Dv]" if enable_gqa else "[Tk, H, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    check_kv_heads(q, k, v, enable_gqa=enable_gqa, packed=True)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k must have the feature dim D of q ({q.shape[2]}), got shape {tuple(k.shape)}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have the token count Tk of k ({k.shape[0]}), got shape {tuple(v.shape)}")
    if q.shape[2] < 1:
        raise ValueError("q and k must have a feature dim D >= 1")
    values = not torch.compiler.is_compiling()
    check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0], q.device, check_values=False)
    check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0], q.device, check_values=False)
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k must have the length of cu_seqlens_q ({cu_q.shape[0]}: N + 1), got {cu_k.shape[0]}"
        )
    lq = check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0], q.device, check_values=values)
    lk = check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0], q.device, check_values=values)
    if values and causal:
        for n, (a, b) in enumerate(zip(lq, lk)):
            check_causal_lengths(True, a, b, f" in sequence {n}")
    return cu_q.shape[0] - 1


def check_step_inputs(q, k, v, state, *, enable_gqa: bool = False) -> None:
    _check_tensor("q", q, 3, "[B, H, D]")
    _check_tensor("k", k, 3, "[B, Hkv, D]" if enable_gqa else "[B, H, D]")
    _check_tensor("v", v, 3, "[B, Hkv, Dv]" if enable_gqa else "[B, H, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    b, h, d = q.shape
    if not enable_gqa and tuple(k.shape) != (b, h, d):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    hk = check_kv_heads(q, k, v, enable_gqa=enable_gqa)
    if k.shape[2] != d:
        raise ValueError(f"k must have the feature dim D of q ({d}), got shape {tuple(k.shape)}")
    check_state(state, b, hk, d, v.shape[-1], q.device)


def check_state(state, batch: int, heads: int, head_dim: int, value_dim: int, device) -> None:
    """A TaylorState of ``batch`` sequences and ``heads`` key/value heads."""
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
