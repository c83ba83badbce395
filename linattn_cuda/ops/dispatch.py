"""Backend registry and the ``auto`` rule: which implementation computes a :class:`~.problem.TaylorProblem`.

A backend implements
    unavailable_reason(device) -> str | None          (None when usable for tensors on that device)
    cannot_serve(problem) -> str | None               (None when its kernels compute this problem)
    forward(problem, q, k, v) -> (out, state | None)  (differentiable in q, k, v and the initial state)
    step(problem, q, k, v, state) -> (out, state)
Backends register a factory so that heavy imports (Triton) happen on first use only.

``auto``: the fastest backend that serves the problem. On a GPU it never falls back to the pure-PyTorch reference:
a call no fused kernel serves raises an error naming what is missing. On a CPU the reference serves what the C++
kernels cannot (no extension built, D > 256), with a warning the first time.

The order on CUDA tensors, from the H200 measurements in bench/results/gpu/triton_gpu_bench.md (bf16, B=16, H=16,
D=16, Dv=64): forward only (inference, prefill): the CUDA kernels (causal L=8192: 2.40 ms vs Triton 6.2 ms);
forward + backward: Triton (causal L=8192: 17.8 ms vs CUDA 20.8 ms; non-causal 12.3 vs 18.4); decode step: Triton
(B*H=4096: 0.095 ms vs CUDA 0.160 ms); float64: the CUDA kernels (Triton takes fp16/bf16/fp32 only).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict

import torch

__all__ = [
    "register_backend",
    "backend_names",
    "get_backend",
    "unavailable_reason",
    "available_backends",
    "choose_backend",
    "resolve_backend",
]

_FACTORIES: Dict[str, Callable[[], object]] = {}
_INSTANCES: Dict[str, object] = {}
_WARNED: set = set()


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


def unavailable_reason(name: str, device) -> str | None:
    try:
        backend = get_backend(name)
    except ImportError as exc:  # e.g. Triton not installed
        return f"import failed: {exc}"
    return backend.unavailable_reason(torch.device(device))


def available_backends(device="cpu") -> list[str]:
    """The backends usable for tensors on ``device``."""
    device = torch.device(device)
    return [name for name in backend_names() if unavailable_reason(name, device) is None]


def _fused_order(p) -> tuple:
    if p.device.type == "cuda":
        if p.dtype == torch.float64:
            return ("cuda",)
        if p.kind == "step" or p.needs_grad:
            return ("triton", "cuda")
        return ("cuda", "triton")
    return ("cpu",) if p.device.type == "cpu" else ()


def _reasons(names, p) -> dict:
    out = {}
    for name in names:
        reason = unavailable_reason(name, p.device)
        out[name] = reason if reason is not None else get_backend(name).cannot_serve(p)
    return out


def choose_backend(p) -> str:
    """The name of the backend ``auto`` picks for the problem ``p`` (see the module docstring)."""
    order = _fused_order(p)
    reasons = _reasons(order, p)
    for name in order:
        if reasons[name] is None:
            return name
    why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items()) or f"no fused kernels for {p.device.type}"
    if p.device.type == "cpu":
        key = ("cpu-reference", why)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"linattn_cuda: the C++ CPU kernels cannot take this call ({why}); running the pure-PyTorch "
                          "reference instead (slower, more memory)", RuntimeWarning, stacklevel=4)
        return "reference"
    raise NotImplementedError(
        f"no fused kernel computes this call on {p.device.type} ({p.describe()}): {why}. "
        "Pass backend='reference' to run the pure-PyTorch reference (quadratic memory for short sequences)."
    )


def resolve_backend(name: str, p):
    """The backend object for ``name`` ("auto": :func:`choose_backend`); an explicit backend that is unavailable or
    cannot serve the problem raises an error that says why and which backends can."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        return get_backend(choose_backend(p))
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {backend_names()}, "
            f"available for {p.device.type} tensors: {available_backends(p.device)} (or 'auto')"
        )
    reason = unavailable_reason(name, p.device)
    if reason is not None:
        raise ValueError(
            f"backend {name!r} is not available for {p.device.type} tensors ({reason}); "
            f"available: {available_backends(p.device)} (or 'auto')"
        )
    reason = get_backend(name).cannot_serve(p)
    if reason is not None:
        able = [n for n in available_backends(p.device) if get_backend(n).cannot_serve(p) is None]
        raise NotImplementedError(
            f"backend {name!r} cannot compute this call ({p.describe()}): {reason}; "
            f"backends that can for {p.device.type} tensors: {able} (or backend='auto')"
        )
    return get_backend(name)


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
