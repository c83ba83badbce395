"""Everything the scaling suite times, behind one small interface.

An :class:`Impl` turns ``q [B,H,L,D], k [B,H,L,D], v [B,H,L,Dv]`` into ``(fn, args)``: ``fn(*args)`` is the
timed call, ``args`` are the leaf tensors it differentiates (layout changes and peer-specific inputs are
prepared outside the timed region). Implementations:

* ``taylor_ref_quadratic``   linattn_cuda.ops.taylor.naive.taylor_attention_quadratic (L×L weights materialized)
* ``taylor_ref_featuremap``  the reference linear forms: taylor_attention_linear (non-causal) and
                             taylor_attention_chunked (causal, C = 64)
* ``taylor_<backend>``       ``taylor_attention(..., backend=<name>)`` for every registered backend except
                             "reference" (cpu, triton, cuda, and any added later): new backends appear here
                             automatically once ``available_backends(device)`` lists them
* ``softmax_sdpa``           ``F.scaled_dot_product_attention`` as dispatched (D ≠ Dv rules out the flash kernel)
* ``softmax_sdpa_padded``    the same with q, k zero-padded to Dv so the flash kernel applies (same output)
* ``fla_parallel_based``, ``fla_fused_chunk_based``  flash-linear-attention (``[B,T,H,D]``, causal only, Triton)
* ``ft_causal_product``      pytorch-fast-transformers ``causal_dot_product`` fed materialized symmetric
                             features (M = 153 for D = 16), fp32, unnormalized (causal only)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.flops import feature_dim

__all__ = ["Impl", "all_impls", "GIB"]

GIB = 2**30


@dataclass
class Impl:
    name: str
    form: str  # flops.form_flops form: quadratic | softmax | linear | linear_unnormalized | auto
    family: str  # taylor-quadratic | taylor-linear | taylor-fused | softmax | peer-quadratic | peer-linear
    prepare: Callable  # (q, k, v, causal) -> (fn, args)
    causal_only: bool = False
    computes_taylor: bool = True  # output equals Taylor attention (checked against the quadratic reference)
    check_required: bool = True  # a mismatch fails the case (own code) rather than only being recorded (peers)
    growth: float = 1.0  # exponent used to extrapolate time to the next length (skip estimates)
    mem_per_pair: float = 0.0  # bytes per (batch, head, query, key) pair materialized (forward)
    pairs_on: tuple = ("cpu", "cuda")  # device types on which those pairs are materialized
    mem_per_token: object = 0.0  # bytes per (batch, head, token) materialized (forward); or a function of (D, Dv)
    flop_dims: Optional[Callable[[int, int], tuple]] = None  # (D, Dv) -> dims actually multiplied
    availability: Callable = field(default=lambda device: None)  # device -> None or the reason it is unusable
    note: str = ""

    def unavailable_reason(self, device: torch.device, causal: bool) -> Optional[str]:
        if self.causal_only and not causal:
            return f"{self.name} is causal only"
        return self.availability(device)

    def memory_estimate(self, batch: int, heads: int, length: int, d: int, dv: int, mode: str,
                        device_type: str = "cpu") -> float:
        """Peak bytes the call materializes beyond its inputs (a rough upper estimate)."""
        bh = batch * heads
        per_pair = self.mem_per_pair if device_type in self.pairs_on else 0.0
        per_token = self.mem_per_token(d, dv) if callable(self.mem_per_token) else self.mem_per_token
        est = per_pair * bh * length * length + per_token * bh * length
        return est * (2.5 if mode == "fwdbwd" else 1.0)


# ---------------------------------------------------------------------------------------------------- taylor


def _ref_quadratic(q, k, v, causal):
    from linattn_cuda.ops.taylor.naive import taylor_attention_quadratic

    return (lambda q, k, v: taylor_attention_quadratic(q, k, v, causal=causal)), (q, k, v)


def _ref_featuremap(q, k, v, causal):
    from linattn_cuda.ops.taylor.naive import taylor_attention_chunked, taylor_attention_linear

    if causal:
        return (lambda q, k, v: taylor_attention_chunked(q, k, v)[0]), (q, k, v)
    return (lambda q, k, v: taylor_attention_linear(q, k, v, causal=False)), (q, k, v)


def _backend_impl(backend: str) -> Impl:
    def prepare(q, k, v, causal):
        from linattn_cuda import taylor_attention

        return (lambda q, k, v: taylor_attention(q, k, v, causal=causal, backend=backend)), (q, k, v)

    def availability(device):
        from linattn_cuda.ops.dispatch import unavailable_reason

        return unavailable_reason(backend, device)

    return Impl(
        name=f"taylor_{backend}",
        form="auto",
        family="taylor-fused",
        prepare=prepare,
        growth=1.5,
        mem_per_token=lambda d, dv: 4.0 * (2 * d + 2 * dv),
        availability=availability,
        note=f"taylor_attention(backend={backend!r})",
    )


# ---------------------------------------------------------------------------------------------------- softmax


def _sdpa(q, k, v, causal):
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), (q, k, v)


def _sdpa_padded(q, k, v, causal):
    d, dv = q.shape[-1], v.shape[-1]
    scale = 1.0 / math.sqrt(d)
    if dv > d:
        pad = (0, dv - d)
        q, k = F.pad(q, pad), F.pad(k, pad)  # zero columns: q·k unchanged
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)), (q, k, v)


# ---------------------------------------------------------------------------------------------------- peers


def _fla_availability(device):
    try:
        import fla.ops.based  # noqa: F401
    except Exception as exc:  # ImportError, or Triton refusing the platform
        return f"flash-linear-attention not importable ({type(exc).__name__}: {exc})"
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "flash-linear-attention runs Triton kernels: CUDA only (on CPU only under TRITON_INTERPRET=1)"
    return None


def _fla(op_name):
    def prepare(q, k, v, causal):
        import fla.ops.based as based

        op = getattr(based, op_name)
        # fla takes [B, T, H, D]; the layout change happens outside the timed call
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        return (lambda q, k, v: op(q, k, v).transpose(1, 2)), (qt, kt, vt)

    return prepare


def _ft_availability(device):
    try:
        import fast_transformers.causal_product as cp
    except Exception as exc:
        return f"pytorch-fast-transformers not importable ({type(exc).__name__}: {exc}); see bench/install_peers.sh"
    if device.type == "cuda" and getattr(cp, "causal_dot_product_cuda", None) is None:
        return "pytorch-fast-transformers was built without its CUDA kernels"
    return None


def _ft(q, k, v, causal):
    from fast_transformers.causal_product import causal_dot_product
    from linattn_cuda.feature_map import taylor_feature_map

    with torch.no_grad():  # features materialized outside the timed call (the peer takes features, not q/k)
        fq = taylor_feature_map(q.float()).contiguous()
        fk = taylor_feature_map(k.float()).contiguous()
    return (lambda fq, fk, v: causal_dot_product(fq, fk, v)), (fq, fk, v.float().contiguous())


def all_impls() -> list[Impl]:
    """Every implementation the suite knows, in display order (availability is checked per case)."""
    impls = [
        Impl("taylor_ref_quadratic", "quadratic", "taylor-quadratic", _ref_quadratic, growth=2.0,
             mem_per_pair=5 * 4.0, note="reference quadratic form"),
        Impl("taylor_ref_featuremap", "linear", "taylor-linear", _ref_featuremap, growth=1.0,
             # φ(q), φ(k) and autograd copies (~6 L×M), the per-chunk states of the causal form (M·Dv/C per token)
             mem_per_token=lambda d, dv: 4.0 * (6 * feature_dim(d) + feature_dim(d) * dv / 64 + 2 * dv),
             note="reference linear form (non-causal) / chunked form C=64 (causal)"),
    ]
    from linattn_cuda.ops.dispatch import backend_names

    impls += [_backend_impl(name) for name in backend_names() if name != "reference"]
    impls += [
        Impl("softmax_sdpa", "softmax", "softmax", _sdpa, computes_taylor=False, growth=2.0,
             # CPU runs the math kernel when D != Dv (scores, probabilities, temporaries: ~3 L×L fp32 matrices);
             # CUDA picks the memory-efficient kernel (O(L)); an out-of-memory error is reported as a skip anyway
             mem_per_pair=3 * 4.0, pairs_on=("cpu",), note="F.scaled_dot_product_attention"),
        Impl("softmax_sdpa_padded", "softmax", "softmax", _sdpa_padded, computes_taylor=False, growth=2.0,
             flop_dims=lambda d, dv: (max(d, dv), dv),
             note="SDPA with q,k zero-padded to Dv (flash kernel; FLOPs counted at the padded width)"),
        Impl("fla_parallel_based", "quadratic", "peer-quadratic", _fla("parallel_based"), causal_only=True,
             check_required=False, growth=2.0, availability=_fla_availability,
             note="fla.ops.based.parallel_based ([B,T,H,D])"),
        Impl("fla_fused_chunk_based", "linear", "peer-linear", _fla("fused_chunk_based"), causal_only=True,
             check_required=False, growth=1.0, availability=_fla_availability,
             note="fla.ops.based.fused_chunk_based ([B,T,H,D], D <= 16)"),
        Impl("ft_causal_product", "linear_unnormalized", "peer-linear", _ft, causal_only=True,
             computes_taylor=False, growth=1.0, mem_per_token=lambda d, dv: 4.0 * 4 * feature_dim(d),
             availability=_ft_availability,
             note="fast_transformers causal_dot_product on materialized features M=153, fp32, unnormalized"),
    ]
    return impls

