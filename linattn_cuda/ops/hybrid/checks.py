"""Argument checks of the hybrid attention's public functions: each error names the argument and what was expected."""
from __future__ import annotations

import operator

import torch

from ..problem import attention_problem

__all__ = ["check_window", "check_far_weight", "check_hybrid_inputs"]


def check_window(window) -> int:
    """``window`` as a Python int >= 1; numpy and torch integers (0-d integer tensors) are accepted."""
    if isinstance(window, (bool, float)) or (isinstance(window, torch.Tensor) and window.dtype == torch.bool):
        raise ValueError(f"window must be a positive integer (the number of keys with exact softmax weights), got {window!r}")
    try:
        value = operator.index(window)
    except TypeError:
        raise ValueError(
            f"window must be a positive integer (the number of keys with exact softmax weights), got {window!r}"
        ) from None
    if value < 1:
        raise ValueError(f"window must be a positive integer (the number of keys with exact softmax weights), got {value}")
    return value


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_far_weight(far_weight, heads: int, device=None):
    """``far_weight``: None or a floating-point tensor of shape [H] on q's device, finite and positive (it multiplies
    every Taylor weight of head h; the module passes exp of a learned parameter). The values are checked on the host
    for CPU tensors; on a GPU without a host sync (``torch._assert_async``: a failed check stops the device), and
    not at all while torch.compile traces or a CUDA graph is captured."""
    if far_weight is None:
        return None
    if not isinstance(far_weight, torch.Tensor) or tuple(far_weight.shape) != (heads,):
        raise ValueError(f"far_weight must be a tensor of shape [H] = [{heads}] (positive per-head weights), "
                         f"got {getattr(far_weight, 'shape', type(far_weight).__name__)}")
    if not far_weight.is_floating_point():
        raise TypeError(f"far_weight must be a floating-point tensor, got {far_weight.dtype}")
    if device is not None and far_weight.device != torch.device(device):
        raise ValueError(f"far_weight must be on q's device ({device}), got {far_weight.device}")
    if torch.compiler.is_compiling() or _capturing():
        return far_weight
    ok = torch.isfinite(far_weight).all() & (far_weight > 0).all()
    if far_weight.device.type == "cpu":
        if not bool(ok):
            raise ValueError(f"far_weight must be finite and positive, got {far_weight.tolist()}")
    else:
        torch._assert_async(ok, "far_weight must be finite and positive")
    return far_weight


def check_hybrid_inputs(q, k, v, *, causal: bool, key_padding_mask=None, enable_gqa: bool = False) -> None:
    """q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv]: self-attention (one length), as checked for Taylor."""
    attention_problem(q, k, v, causal=causal, key_padding_mask=key_padding_mask, enable_gqa=enable_gqa)  # the checks
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"hybrid attention is self-attention: q and k need one length, got {q.shape[-2]} and {k.shape[-2]}"
        )
