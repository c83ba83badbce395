"""The second-order Taylor feature map phi with phi(q).phi(k) = 1 + s + s^2/2, s = scale * q.k.

Symmetric map (the default, M = 1 + D + D(D+1)/2):

    phi(x) = [ 1,  c1 * x_a (a = 0..D-1),  c2 * x_a^2 (a = 0..D-1),  c3 * x_a x_b (a < b, row-major) ]
    c1 = sqrt(scale),  c2 = scale / sqrt(2),  c3 = scale

The full outer-product map [1, c1 * x, (scale/sqrt(2)) * vec(x x^T)] has M = 1 + D + D^2 and gives the same
weights. Every backend's recurrent state (``kv = sum phi(k) v^T``, ``k_sum = sum phi(k)``) uses the
symmetric map in exactly this feature order, so states move freely between backends.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["feature_dim", "taylor_feature_map", "feature_map_coefficients", "resolve_scale"]


def feature_dim(head_dim: int, symmetric: bool = True, terms: int = 3) -> int:
    """Number of features M of the Taylor map with ``terms`` terms (3 = second order) for head dim D.

    Symmetric map: C(D + terms - 1, terms - 1) monomials; full map: sum_{n < terms} D^n.
    """
    if head_dim < 0:
        raise ValueError(f"head_dim must be >= 0, got {head_dim}")
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    if symmetric:
        return math.comb(head_dim + terms - 1, terms - 1)
    return sum(head_dim**n for n in range(terms))


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    """``scale`` or the default ``1/sqrt(head_dim)``; rejects non-finite and non-positive values."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return scale


def feature_map_coefficients(scale: float) -> tuple[float, float, float]:
    """(c1, c2, c3) of the symmetric map for a given scale."""
    return math.sqrt(scale), scale / math.sqrt(2.0), scale


def taylor_feature_map(x: torch.Tensor, scale: Optional[float] = None, symmetric: bool = True) -> torch.Tensor:
    """phi(x) over the last dimension: ``[..., D] -> [..., M]`` (see the module docstring).

    Equivalent to building the weights directly: ``phi(q) @ phi(k).T == 1 + s + s**2 / 2`` with
    ``s = scale * q @ k.T``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the feature dimension D last)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    d = x.shape[-1]
    scale = resolve_scale(scale, d)
    c1, c2, c3 = feature_map_coefficients(scale)
    ones = x.new_ones(*x.shape[:-1], 1)
    if not symmetric:
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * c2
        return torch.cat([ones, x * c1, outer], dim=-1)
    rows, cols = torch.triu_indices(d, d, offset=1, device=x.device)
    cross = x[..., rows] * x[..., cols] * c3
    return torch.cat([ones, x * c1, x * x * c2, cross], dim=-1)
