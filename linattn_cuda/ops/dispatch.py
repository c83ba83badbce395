"""Backend registry: every way of computing Taylor attention behind one small interface.

A backend implements
    unavailable_reason(device) -> str | None   (None when usable on that device)
    attention(q, k, v, causal, scale, key_padding_mask) -> out          (differentiable)
    prefill(q, k, v, scale, key_padding_mask, initial_state) -> (out, TaylorState)   (causal)
    step(q, k, v, state, scale) -> (out, TaylorState)                   (q, k [B,H,D], v [B,H,Dv])
and, when its ``features`` include "varlen",
    varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale) -> out  (packed [T, H, *]; differentiable)
    prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, initial_state) -> (out, TaylorState [N, ...])
``features`` (a frozenset, empty when absent) names what a backend takes beyond the basic [B, H, L, *] problem:
    "gqa"         k and v with fewer heads than q (grouped-query attention),
    "causal_lq_lt_lk"  causal attention with fewer queries than keys (end-aligned),
    "varlen"      packed variable-length sequences.
"auto" picks only backends that have every feature a call needs; an explicit backend without one raises an
error naming the feature. Inputs reaching a backend are already checked (linattn_cuda._checks) and non-empty.
Backends register a factory so that heavy imports (Triton) happen on first use only.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

_FACTORIES: Dict[str, Callable[[], object]] = {}
_INSTANCES: Dict[str, object] = {}


def register_backend(name: str, factory: Callable[[], object]) -> None:
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def backend_names() -> list[str]:
    return list(_FACTORIES)


def get_backend(name: str):
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known backends: {backend_names()} (or 'auto')")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    try:
        backend = get_backend(name)
    except ImportError as exc:  # e.g. Triton not installed
        return f"import failed: {exc}"
    return backend.unavailable_reason(device)


def available_backends(device="cpu") -> list[str]:
    """The backends usable for tensors on ``device``."""
    device = torch.device(device)
    return [name for name in backend_names() if unavailable_reason(name, device) is None]


FEATURE_NAMES = {
    "gqa": "grouped-query attention (k and v with fewer heads than q)",
    "causal_lq_lt_lk": "causal attention with fewer queries than keys (Lq < Lk, end-aligned)",
    "varlen": "packed variable-length sequences (varlen)",
}


def backend_features(name: str) -> frozenset:
    """What backend ``name`` takes beyond the basic problem (see the module docstring)."""
    try:
        return frozenset(getattr(get_backend(name), "features", ()))
    except ImportError:
        return frozenset()


def call_features(q, k, *, causal: bool, varlen: bool = False) -> frozenset:
    """The features a call with these q and k needs (dense [B, H, L, D] or, ``varlen``, packed [T, H, D])."""
    needs = set()
    if k.shape[1] != q.shape[1]:  # heads: dim 1 of [B, H, L, D] and of [T, H, D]
        needs.add("gqa")
    if varlen:
        needs.add("varlen")
    elif causal and q.shape[2] != k.shape[2]:
        needs.add("causal_lq_lt_lk")
    return frozenset(needs)


def resolve_backend(name: str, q: torch.Tensor, *, causal: bool, kind: str = "attention", training: bool = False,
                    needs: frozenset = frozenset()):
    """The backend object for ``name`` ("auto" picks per device and shape among the backends that have the
    ``needs`` features); errors list what is available."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        name = choose_backend(q, causal=causal, kind=kind, training=training, needs=needs)
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {backend_names()}, "
            f"available for {q.device.type} tensors: {available_backends(q.device)} (or 'auto')"
        )
    reason = unavailable_reason(name, q.device)
    if reason is not None:
        raise ValueError(
            f"backend {name!r} is not available for {q.device.type} tensors ({reason}); "
            f"available: {available_backends(q.device)} (or 'auto')"
        )
    missing = sorted(set(needs) - backend_features(name))
    if missing:
        able = [n for n in available_backends(q.device) if set(needs) <= backend_features(n)]
        raise NotImplementedError(
            f"backend {name!r} does not support {' and '.join(FEATURE_NAMES[f] for f in missing)} yet; "
            f"backends that do for {q.device.type} tensors: {able} (or backend='auto')"
        )
    return get_backend(name)


# ----------------------------------------------------------------------------------------------------
# `backend="auto"`:``backend="auto"``: the fastest available backend for the tensors' device, dtype and use.
# 
# CPU: the C++ kernels when the extension is built, else the reference.
# CUDA, from the H200 measurements in bench/results/gpu/triton_gpu_bench.md (bf16, B=16, H=16, D=16, Dv=64):
#   * forward only (inference, prefill): the CUDA kernels (causal L=8192: 2.40 ms vs Triton 6.2 ms);
#   * forward + backward (inputs need grad): Triton (causal L=8192: 17.8 ms vs CUDA 20.8 ms; non-causal 12.3 vs 18.4);
#   * decode step: Triton (B*H=4096: 0.095 ms vs CUDA 0.160 ms);
#   * float64: the CUDA kernels (Triton takes fp16/bf16/fp32 only), else the reference.

def choose_backend(q: torch.Tensor, *, causal: bool, kind: str = "attention", training: bool = False,
                   needs: frozenset = frozenset()) -> str:
    """The first available backend of the rule below that has every feature in ``needs`` (grouped-query
    attention, end-aligned causal with Lq < Lk, varlen: today the cpu kernels and the reference)."""
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            order = ("cuda", "reference")
        elif kind == "step" or (kind == "attention" and training):
            order = ("triton", "cuda", "reference")
        else:
            order = ("cuda", "triton", "reference")
    else:
        order = ("cpu", "reference")
    for name in order:
        if unavailable_reason(name, q.device) is None and set(needs) <= backend_features(name):
            return name
    return "reference"


def _reference():
    from .taylor.reference import ReferenceBackend

    return ReferenceBackend()


def _cpu():
    from .taylor.cpp import ExtensionBackend

    return ExtensionBackend("cpu")


def _cuda():
    from .taylor.cpp import ExtensionBackend

    return ExtensionBackend("cuda")


def _triton():
    from .taylor.triton.backend import TritonBackend

    return TritonBackend()


register_backend("reference", _reference)
register_backend("cpu", _cpu)
register_backend("triton", _triton)
register_backend("cuda", _cuda)
