"""The ``auto`` rule and the refusals, on problems of every feature: GPU-typed calls go to a fused kernel or raise an
error naming what is missing, never silently to the reference; explicit backends say why they cannot serve a call."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import linattn_cuda as la
from linattn_cuda.ops import dispatch
from linattn_cuda.ops.problem import TaylorProblem

from .cases import CASES, make_inputs
from .test_taylor import _problem


def _gpu_problem(case, dtype=torch.bfloat16, **kw):
    """The case's problem as if its tensors were on a GPU (the rule reads the description only)."""
    x = make_inputs(case).to(dtype)
    p = _problem(case, x, torch.device("cpu"))
    return dataclasses.replace(p, device=torch.device("cuda"), **kw)


@pytest.fixture
def gpu_backends_available(monkeypatch):
    """Pretend the cuda and triton backends are usable (no GPU needed to test the rule)."""
    real = dispatch.unavailable_reason

    def fake(name, device):
        if torch.device(device).type == "cuda" and name in ("cuda", "triton"):
            return None
        return real(name, device)

    monkeypatch.setattr(dispatch, "unavailable_reason", fake)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_calls_never_fall_back_to_the_reference(gpu_backends_available, case):
    for needs_grad in (False, True):
        p = _gpu_problem(case, needs_grad=needs_grad)
        try:
            name = dispatch.choose_backend(p)
        except NotImplementedError as exc:  # no fused kernel: the error names each backend's reason
            msg = str(exc)
            assert "cuda:" in msg and "triton:" in msg and "backend='reference'" in msg
            continue
        assert name in ("cuda", "triton")
        assert dispatch.get_backend(name).cannot_serve(p) is None


def test_gpu_rule_order(gpu_backends_available):
    """Measured on an H200: CUDA kernels for forward-only, Triton for training and decoding, CUDA for float64."""
    base = next(c for c in CASES if not c.packed and not c.causal and c.hkv == c.h and not c.state_in)
    assert dispatch.choose_backend(_gpu_problem(base)) == "cuda"
    assert dispatch.choose_backend(_gpu_problem(base, needs_grad=True)) == "triton"
    assert dispatch.choose_backend(_gpu_problem(base, kind="step")) == "triton"
    assert dispatch.choose_backend(_gpu_problem(base, dtype=torch.float64)) == "cuda"


def test_gpu_call_no_fused_kernel_serves_raises(monkeypatch):
    """Without the GPU backends (nothing built for CUDA) a GPU call raises instead of running the reference."""
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda name, device: "not built" if name in ("cuda", "triton") else None)
    p = _gpu_problem(CASES[0])
    with pytest.raises(NotImplementedError, match=r"no fused kernel computes this call on cuda .*cuda: not built; "
                                                  r"triton: not built.*backend='reference'"):
        dispatch.choose_backend(p)


def test_one_query_causal_is_the_non_causal_problem():
    """A causal call with one query (decoding against a cache) is described as non-causal: every fused path serves
    it."""
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 4)
    from linattn_cuda.ops.problem import attention_problem

    assert attention_problem(q, k, v, causal=True).causal is False
    torch.testing.assert_close(la.taylor_attention(q, k, v, causal=True), la.taylor_attention(q, k, v))


def test_explicit_backend_names_what_it_cannot_serve():
    case = next(c for c in CASES if c.packed)
    x = make_inputs(case).to(torch.float32)
    p = _problem(case, x, torch.device("cpu"))
    assert isinstance(p, TaylorProblem)
    if "triton" not in la.available_backends("cpu"):
        pytest.skip("triton (interpreter) not available")
    reason = dispatch.get_backend("triton").cannot_serve(p)
    if reason is None:
        pytest.skip("triton serves packed sequences")
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot compute this call .*backends that can"):
        la.taylor_attention_varlen(x.q, x.k, x.v, x.cu_q, x.cu_k, enable_gqa=True, backend="triton")
