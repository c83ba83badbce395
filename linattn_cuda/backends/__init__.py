"""Backend registry: every way of computing Taylor attention behind one small interface.

A backend implements
    unavailable_reason(device) -> str | None   (None when usable on that device)
    attention(q, k, v, causal, scale, key_padding_mask) -> out          (differentiable)
    prefill(q, k, v, scale, key_padding_mask, initial_state) -> (out, TaylorState)   (causal)
    step(q, k, v, state, scale) -> (out, TaylorState)                   (q, k [B,H,D], v [B,H,Dv])
Inputs reaching a backend are already checked (linattn_cuda._checks) and non-empty.
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


def resolve_backend(name: str, q: torch.Tensor, *, causal: bool, kind: str = "attention", training: bool = False):
    """The backend object for ``name`` ("auto" picks per device and shape); errors list what is available."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        from .auto import choose_backend

        name = choose_backend(q, causal=causal, kind=kind, training=training)
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
    return get_backend(name)


def _reference():
    from .reference import ReferenceBackend

    return ReferenceBackend()


def _cpu():
    from .extension import ExtensionBackend

    return ExtensionBackend("cpu")


def _cuda():
    from .extension import ExtensionBackend

    return ExtensionBackend("cuda")


def _triton():
    from ..triton.backend import TritonBackend

    return TritonBackend()


register_backend("reference", _reference)
register_backend("cpu", _cpu)
register_backend("triton", _triton)
register_backend("cuda", _cuda)
