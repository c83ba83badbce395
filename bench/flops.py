"""FLOP counts of every benchmarked form (SPEC section 1), used for GFLOP/s and the FLOP crossover.

Conventions (written once here, quoted in the results tables):

* A multiply-add counts 2 FLOPs; element-wise work (the polynomial, the feature map, the division by the
  normalizer, softmax's exp) is not counted: the counts are the matmul work of each form.
* Quadratic Taylor form and softmax attention: ``2·Lq·Lk·(D + Dv)`` per (batch, head) non-causal
  (``QKᵀ`` is ``2·Lq·Lk·D``, ``P·V`` is ``2·Lq·Lk·Dv``); causal counts half of it (only the visible pairs).
* Linear (feature-map) form: ``4·L·M·Dv`` with ``M = 1 + D + D(D+1)/2`` (symmetric map; 153 for D = 16):
  ``2·L·M·Dv`` to accumulate ``S = Σ φ(k) vᵀ`` and ``2·L·M·Dv`` to read it with ``φ(q)``.
  Causal runs the chunked form: on top of that, each chunk of ``C`` tokens does the quadratic form on
  its full ``C × C`` tile, ``2·L·C·(D + Dv)`` (the tile is computed whole and masked, as kernels do).
  With D = 16, Dv = 64, C = 64 these give the SPEC's FLOP crossovers, L ≈ 245 non-causal, ≈ 618 causal.
* Forward + backward ≈ 3 × forward (the backward of each matmul is two matmuls of the same size);
  the same factor for every implementation, so GFLOP/s of fwd+bwd compare like for like.
* A fused backend that picks its form per shape ("auto") is credited with the cheaper form's count:
  GFLOP/s then measure useful work, never work the algorithm chose to waste.
"""
from __future__ import annotations

import math

__all__ = [
    "BWD_FACTOR",
    "DEFAULT_CHUNK",
    "feature_dim",
    "quadratic_flops",
    "linear_flops",
    "softmax_flops",
    "form_flops",
    "matmul_flops",
    "flop_crossover",
]

BWD_FACTOR = 3.0  # forward + backward ≈ 3 × forward
DEFAULT_CHUNK = 64


def feature_dim(d: int, symmetric: bool = True, terms: int = 3) -> int:
    """Taylor feature count M (same as ``linattn_cuda.feature_dim``; kept here so the counts need no build)."""
    if symmetric:
        return math.comb(d + terms - 1, terms - 1)
    return sum(d**n for n in range(terms))


def _mode_factor(mode: str) -> float:
    if mode == "fwd":
        return 1.0
    if mode == "fwdbwd":
        return BWD_FACTOR
    raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")


def quadratic_flops(lq: int, lk: int, d: int, dv: int, *, causal: bool, batch_heads: int = 1, mode: str = "fwd") -> float:
    """Quadratic Taylor form: ``2·Lq·Lk·(D+Dv)``, half when causal."""
    f = 2.0 * lq * lk * (d + dv)
    if causal:
        f /= 2.0
    return f * batch_heads * _mode_factor(mode)


def softmax_flops(lq: int, lk: int, d: int, dv: int, *, causal: bool, batch_heads: int = 1, mode: str = "fwd") -> float:
    """Softmax attention: ``2·Lq·Lk·(D+Dv)``, half when causal (same matmuls as the quadratic form)."""
    return quadratic_flops(lq, lk, d, dv, causal=causal, batch_heads=batch_heads, mode=mode)


def linear_flops(
    length: int,
    d: int,
    dv: int,
    *,
    causal: bool,
    batch_heads: int = 1,
    mode: str = "fwd",
    m: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> float:
    """Linear form: ``4·L·M·Dv``; causal (chunked) adds ``2·L·C·(D+Dv)`` for the intra-chunk tiles."""
    m = feature_dim(d) if m is None else m
    f = 4.0 * length * m * dv
    if causal:
        f += 2.0 * length * min(chunk, length) * (d + dv)
    return f * batch_heads * _mode_factor(mode)


def form_flops(form: str, length: int, d: int, dv: int, *, causal: bool, batch_heads: int = 1, mode: str = "fwd") -> float:
    """FLOPs of ``form``: "quadratic", "softmax", "linear", "linear_unnormalized" or "auto" (the cheaper form)."""
    if form in ("quadratic", "softmax"):
        return quadratic_flops(length, length, d, dv, causal=causal, batch_heads=batch_heads, mode=mode)
    if form == "linear":
        return linear_flops(length, d, dv, causal=causal, batch_heads=batch_heads, mode=mode)
    if form == "linear_unnormalized":  # a causal product fed precomputed features: 4·L·M·Dv, no chunk tiles
        return 4.0 * length * feature_dim(d) * dv * batch_heads * _mode_factor(mode)
    if form == "auto":
        return min(
            form_flops("quadratic", length, d, dv, causal=causal, batch_heads=batch_heads, mode=mode),
            form_flops("linear", length, d, dv, causal=causal, batch_heads=batch_heads, mode=mode),
        )
    raise ValueError(f"unknown form {form!r}")


def matmul_flops(n: int, m: int | None = None, k: int | None = None) -> float:
    """``[n, k] @ [k, m]``: ``2·n·m·k`` (square by default)."""
    m = n if m is None else m
    k = n if k is None else k
    return 2.0 * n * m * k


def flop_crossover(d: int, dv: int, *, causal: bool, chunk: int = DEFAULT_CHUNK) -> float:
    """The length at which the linear form's FLOPs equal the quadratic form's (solved in closed form).

    Non-causal: ``2·L²·(D+Dv) = 4·L·M·Dv``; causal: ``L²·(D+Dv) = 4·L·M·Dv + 2·L·C·(D+Dv)``.
    """
    m = feature_dim(d)
    if causal:
        return (4.0 * m * dv + 2.0 * chunk * (d + dv)) / (d + dv)
    return 4.0 * m * dv / (2.0 * (d + dv))
