"""The one place where the inputs of a Taylor attention call are checked and described.

Every public function builds a :class:`TaylorProblem` (each error names the argument and what was expected), and
every backend reads it: dense ``[B, H, L, *]`` or packed ``[T, H, *]`` rows with ``cu_seqlens``, the head group
``G = H / Hkv`` (grouped-query attention: query head h reads key/value head h // G), the end-aligned causal offset
``Lk - Lq``, the key padding mask, an initial state seen by every query and whether the final state is wanted.
A feature is a property of the problem, not a backend flag; a backend says what it cannot serve
(``cannot_serve(problem)``) and the dispatch never falls back silently. :data:`LIMITS` is the one table of the
kernels' limits on this side (csrc/include/problem.h holds the same numbers for the C++ checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ..feature_map import feature_dim, resolve_scale
from .taylor.state import TaylorState

__all__ = [
    "Limits",
    "LIMITS",
    "SUPPORTED_DTYPES",
    "TaylorProblem",
    "attention_problem",
    "varlen_problem",
    "step_problem",
    "check_key_padding_mask",
    "check_state",
    "check_kv_heads",
    "limit_violation",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


class Limits(NamedTuple):
    max_head_dim: Optional[int]  # q/k feature dim D (None: any)
    max_value_dim: Optional[int]  # value dim Dv
    dtypes: tuple


# The fused kernels' limits (csrc/include/problem.h: kCpuLimits, kCudaLimits).
LIMITS = {
    "cpu": Limits(256, 256, SUPPORTED_DTYPES),
    "cuda": Limits(128, 256, SUPPORTED_DTYPES),
    "triton": Limits(128, 256, _LOW_AND_SINGLE),
    "reference": Limits(None, None, SUPPORTED_DTYPES),
}

MAX_TOKENS = 2**31 - 1  # cu_seqlens are int32


@dataclass(frozen=True)
class TaylorProblem:
    """One checked call. ``batch`` is B (dense) or the number of sequences N (packed); ``len_q`` / ``len_k`` are the
    lengths (dense) or the token counts Tq / Tk (packed). ``causal`` is end-aligned; a call with one query is made
    non-causal (its query sees every key either way). ``needs_grad``: some input requires a gradient."""

    packed: bool
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    len_q: int
    len_k: int
    causal: bool
    scale: float
    dtype: torch.dtype
    device: torch.device
    key_padding_mask: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    initial_state: Optional[TaylorState] = None
    return_state: bool = False
    needs_grad: bool = False
    kind: str = "attention"  # or "step"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 1

    @property
    def features(self) -> int:
        return feature_dim(self.head_dim)

    @property
    def end_aligned(self) -> bool:
        """Causal with fewer queries than keys (dense; packed calls may have it per sequence)."""
        return self.causal and (self.packed or self.len_q != self.len_k)

    @property
    def is_empty(self) -> bool:
        return self.len_q == 0 or self.batch * self.heads == 0

    def describe(self) -> str:
        """The call in words, for errors: '[B=2, H=8, Hkv=2, Lq=5, Lk=9, D=16, Dv=64] float32 causal ...'."""
        dims = (f"N={self.batch} sequences, Tq={self.len_q}, Tk={self.len_k}" if self.packed
                else f"B={self.batch}, Lq={self.len_q}, Lk={self.len_k}")
        parts = [f"[{dims}, H={self.heads}, Hkv={self.kv_heads}, D={self.head_dim}, Dv={self.value_dim}]",
                 str(self.dtype).replace("torch.", ""), "causal" if self.causal else "non-causal"]
        if self.key_padding_mask is not None:
            parts.append("key padding")
        if self.initial_state is not None:
            parts.append("initial state")
        if self.return_state:
            parts.append("final state")
        if self.needs_grad:
            parts.append("with gradients")
        return " ".join(parts)


def limit_violation(backend: str, problem: TaylorProblem) -> Optional[str]:
    """Why ``backend``'s kernels cannot take this problem's dtype and dims (None if they can)."""
    lim = LIMITS[backend]
    if problem.dtype not in lim.dtypes:
        names = ", ".join(str(t).replace("torch.", "") for t in lim.dtypes)
        return f"the {backend} kernels take {names} inputs, got {str(problem.dtype).replace('torch.', '')}"
    if lim.max_head_dim is not None and problem.head_dim > lim.max_head_dim:
        return f"the {backend} kernels take a q/k feature dim D <= {lim.max_head_dim}, got D = {problem.head_dim}"
    if lim.max_value_dim is not None and problem.value_dim > lim.max_value_dim:
        return f"the {backend} kernels take a value dim Dv <= {lim.max_value_dim}, got Dv = {problem.value_dim}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# element checks


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
    h, hk = q.shape[1], k.shape[1]
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
        if lead_v != lead_q or v.shape[1] != h:
            raise ValueError(f"v must have the {sizes} of q ({fmt(*lead_q, h)}), got shape {tuple(v.shape)}")
        return h
    if lead_k != lead_q:
        raise ValueError(f"k must have the batch size of q ({fmt(*lead_q)}), got shape {tuple(k.shape)}")
    if not (hk == h or (hk > 0 and h % hk == 0)):
        raise ValueError(
            f"enable_gqa=True needs the query heads of q ({h}) to be a multiple of the key/value heads of k ({hk}), "
            f"got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if lead_v != lead_k or v.shape[1] != hk:
        raise ValueError(f"v must have the {sizes} of k ({fmt(*lead_k, hk)}), got shape {tuple(v.shape)}")
    return hk


def _check_causal_lengths(causal: bool, lq: int, lk: int, where: str = "") -> None:
    if causal and lq > lk:
        raise ValueError(
            f"causal attention needs Lq <= Lk (end-aligned: query i sees keys j <= i + Lk - Lq), "
            f"got q length {lq} and k length {lk}{where}"
        )


def _check_cu_seqlens(name: str, cu, total: int, device, *, check_values: bool = True):
    """cu_seqlens: int32 [N + 1] on q's device, 0 = cu[0] <= cu[1] <= ... <= cu[N] = total. Returns the
    per-sequence lengths when ``check_values`` (reads the values: one host sync on a GPU), else None."""
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


def check_state(state, batch: int, heads: int, head_dim: int, value_dim: int, device, name: str = "state") -> TaylorState:
    """A TaylorState of ``batch`` sequences and ``heads`` key/value heads; returns it as a TaylorState."""
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name} must be a TaylorState(kv, k_sum), as returned by taylor_attention_prefill")
    kv, k_sum = state
    m = feature_dim(head_dim)
    for part, x, shape in (
        ("kv", kv, (batch, heads, m, value_dim)),
        ("k_sum", k_sum, (batch, heads, m)),
    ):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}.{part} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}.{part} must have shape {list(shape)} (M = {m} features for D = {head_dim}), "
                             f"got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}.{part} must be float32 or float64, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name}.{part} must be on the same device as q ({device}), got {x.device}")
    if kv.dtype != k_sum.dtype:
        raise TypeError(f"{name}.kv and {name}.k_sum must share a dtype, got {kv.dtype} and {k_sum.dtype}")
    return TaylorState(kv, k_sum)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# problems


def attention_problem(q, k, v, *, causal: bool, scale=None, key_padding_mask=None, enable_gqa: bool = False,
                      initial_state=None, return_state: bool = False) -> TaylorProblem:
    """Dense ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``."""
    _check_tensor("q", q, 4, "[B, H, Lq, D]")
    _check_tensor("k", k, 4, "[B, Hkv, Lk, D]" if enable_gqa else "[B, H, Lk, D]")
    _check_tensor("v", v, 4, "[B, Hkv, Lk, Dv]" if enable_gqa else "[B, H, Lk, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    b, h, lq, d = q.shape
    hk = check_kv_heads(q, k, v, enable_gqa=enable_gqa)
    if k.shape[3] != d:
        raise ValueError(f"k must have the feature dim D of q ({d}), got shape {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the length Lk of k ({k.shape[2]}), got shape {tuple(v.shape)}")
    if d < 1:
        raise ValueError("q and k must have a feature dim D >= 1")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_causal_lengths(causal, lq, k.shape[2])
    check_key_padding_mask(key_padding_mask, b, k.shape[2], q.device)
    if initial_state is not None:
        initial_state = check_state(initial_state, b, hk, d, v.shape[-1], q.device, "initial_state")
    return TaylorProblem(
        packed=False, batch=b, heads=h, kv_heads=hk, head_dim=d, value_dim=v.shape[-1], len_q=lq, len_k=k.shape[2],
        causal=causal and lq > 1, scale=resolve_scale(scale, d), dtype=q.dtype, device=q.device,
        key_padding_mask=key_padding_mask, initial_state=initial_state, return_state=bool(return_state),
        needs_grad=_needs_grad(q, k, v, *(initial_state or ())),
    )


def varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool, scale=None, enable_gqa: bool = False,
                   initial_state=None, return_state: bool = False) -> TaylorProblem:
    """Packed ``q [Tq, H, D]``, ``k [Tk, Hkv, D]``, ``v [Tk, Hkv, Dv]`` and int32 ``cu_seqlens`` ``[N + 1]``. The values
    of cu_seqlens are checked except while torch.compile traces (the C++ kernels check them too)."""
    _check_tensor("q", q, 3, "[Tq, H, D]")
    _check_tensor("k", k, 3, "[Tk, Hkv, D]" if enable_gqa else "[Tk, H, D]")
    _check_tensor("v", v, 3, "[Tk, Hkv, Dv]" if enable_gqa else "[Tk, H, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    hk = check_kv_heads(q, k, v, enable_gqa=enable_gqa, packed=True)
    d = q.shape[2]
    if k.shape[2] != d:
        raise ValueError(f"k must have the feature dim D of q ({d}), got shape {tuple(k.shape)}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have the token count Tk of k ({k.shape[0]}), got shape {tuple(v.shape)}")
    if d < 1:
        raise ValueError("q and k must have a feature dim D >= 1")
    values = not torch.compiler.is_compiling()
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, check_values=False)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, check_values=False)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_k must have the length of cu_seqlens_q ({cu_seqlens_q.shape[0]}: N + 1), "
                         f"got {cu_seqlens_k.shape[0]}")
    lq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, check_values=values)
    lk = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, check_values=values)
    if values and causal:
        for n, (a, b) in enumerate(zip(lq, lk)):
            _check_causal_lengths(True, a, b, f" in sequence {n}")
    n = cu_seqlens_q.shape[0] - 1
    if initial_state is not None:
        initial_state = check_state(initial_state, n, hk, d, v.shape[-1], q.device, "initial_state")
    return TaylorProblem(
        packed=True, batch=n, heads=q.shape[1], kv_heads=hk, head_dim=d, value_dim=v.shape[-1], len_q=q.shape[0],
        len_k=k.shape[0], causal=bool(causal), scale=resolve_scale(scale, d), dtype=q.dtype, device=q.device,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, initial_state=initial_state,
        return_state=bool(return_state), needs_grad=_needs_grad(q, k, v, *(initial_state or ())),
    )


def step_problem(q, k, v, state, *, scale=None, enable_gqa: bool = False) -> TaylorProblem:
    """One decoding step: ``q [B, H, D]``, ``k [B, Hkv, D]``, ``v [B, Hkv, Dv]`` and the state ``[B, Hkv, ...]``."""
    _check_tensor("q", q, 3, "[B, H, D]")
    _check_tensor("k", k, 3, "[B, Hkv, D]" if enable_gqa else "[B, H, D]")
    _check_tensor("v", v, 3, "[B, Hkv, Dv]" if enable_gqa else "[B, H, Dv]")
    _check_same("k", k, q, "q")
    _check_same("v", v, q, "q")
    b, h, d = q.shape
    hk = check_kv_heads(q, k, v, enable_gqa=enable_gqa)
    if k.shape[2] != d:
        raise ValueError(f"k must have the feature dim D of q ({d}), got shape {tuple(k.shape)}")
    state = check_state(state, b, hk, d, v.shape[-1], q.device)
    return TaylorProblem(
        packed=False, batch=b, heads=h, kv_heads=hk, head_dim=d, value_dim=v.shape[-1], len_q=1, len_k=1,
        causal=False, scale=resolve_scale(scale, d), dtype=q.dtype, device=q.device, initial_state=state,
        return_state=True, needs_grad=_needs_grad(q, k, v, *state), kind="step",
    )
