"""The hybrid attention's Triton kernels (linattn_cuda/ops/hybrid/triton) against the float64 definition.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at small odd
shapes; outputs are NaN-poisoned (LINATTN_POISON_OUTPUTS=1), so an element a kernel forgets to write fails. The
``gpu``-marked tests add real sizes, opcheck and torch.compile on a CUDA device. Every launch is also compiled for
sm_90 without a GPU (tests/hybrid_triton_compile_check.py).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import linattn_cuda as la
from linattn_cuda import hybrid_attention, hybrid_attention_prefill, hybrid_attention_step

from .helpers import max_rel_err, seed_for
from .test_hybrid import FWD_TOL, GRAD_TOL, inputs, reference, reference_grads

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
triton = pytest.importorskip("triton")
if not HAS_CUDA and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# the Triton kernels' float32 dots: "ieee" in the window, tf32x3 in the Taylor part (float32-accurate on GPUs)
TOL32_FWD, TOL32_GRAD = 2e-6, 2e-5


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("LINATTN_POISON_OUTPUTS", "1")


def to_device(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


# (B, H, Hkv, L, D, Dv, window): odd sizes, grouped heads, D > 16 (the Taylor part split over programs),
# W = 1, W > L, L spanning several chunks
CASES = [
    pytest.param((2, 2, 2, 45, 8, 12, 7), id="B2-H2-L45-D8-Dv12-W7"),
    pytest.param((1, 4, 2, 70, 16, 16, 20), id="B1-H4-Hkv2-L70-D16-W20-gqa"),
    pytest.param((1, 2, 2, 50, 20, 5, 9), id="B1-H2-L50-D20-W9-split"),
    pytest.param((2, 1, 1, 21, 5, 3, 1), id="B2-H1-L21-W1"),
    pytest.param((2, 2, 2, 13, 4, 6, 40), id="B2-H2-L13-W40(>L)"),
]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fwd_bwd_matches_float64_definition(shape, causal):
    b, h, hk, L, d, dv, w = shape
    q, k, v, m = inputs(b, h, hk, L, d, dv, seed=seed_for("triton", shape, causal), mask="full-row",
                        requires_grad=True)
    fw = (torch.rand(h, generator=torch.Generator().manual_seed(L)) * 3 + 0.2).requires_grad_()
    qd, kd, vd, md, fwd = to_device(q, k, v, m, fw)
    out = hybrid_attention(qd, kd, vd, window=w, causal=causal, key_padding_mask=md, far_weight=fwd,
                           enable_gqa=hk != h, backend="triton")
    kw = dict(window=w, causal=causal, key_padding_mask=m)
    assert out.dtype == F32 and torch.isfinite(out).all()
    assert max_rel_err(out, reference(q, k, v, far_weight=fw.detach(), **kw)) < TOL32_FWD
    if b > 1:
        assert (out[1] == 0).all()  # row 1 is all padding: 0, never NaN
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (q, k, v, fw), g.to(DEVICE))
    for name, a, r in zip(("q", "k", "v", "far_weight"), got, reference_grads(q, k, v, g, fw, **kw)):
        assert torch.isfinite(a).all(), name
        assert max_rel_err(a, r) < TOL32_GRAD, name


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_half_precision(dtype, causal):
    q, k, v, m = inputs(2, 2, 2, 45, 8, 8, seed=seed_for("triton-dtype", dtype, causal), mask="random", dtype=dtype,
                        requires_grad=True)
    qd, kd, vd, md = to_device(q, k, v, m)
    out = hybrid_attention(qd, kd, vd, window=7, causal=causal, key_padding_mask=md, backend="triton")
    assert out.dtype == dtype
    kw = dict(window=7, causal=causal, key_padding_mask=m)
    assert max_rel_err(out, reference(q, k, v, **kw)) < FWD_TOL[dtype]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g.to(DEVICE))
    for name, a, r in zip("qkv", grads, reference_grads(q, k, v, g, **kw)):
        assert a.dtype == dtype and max_rel_err(a, r) < GRAD_TOL[dtype], name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_large_logits_and_nan_in_padded_keys(causal):
    """Logits in the hundreds both ways (window-dominated and Taylor-dominated rows) stay finite and exact; padded
    keys holding NaN / inf change nothing."""
    q, k, v, m = inputs(2, 2, 2, 40, 8, 4, seed=seed_for("triton-large", causal), mask="random", scale_q=40.0)
    pad = m[:, None, :, None]
    for sign in (1.0, -1.0):
        kk = sign * k
        out = hybrid_attention(*to_device(q, kk.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf"))),
                               window=8, causal=causal, key_padding_mask=m.to(DEVICE), backend="triton")
        assert torch.isfinite(out).all()
        assert max_rel_err(out, reference(q, kk, v, window=8, causal=causal, key_padding_mask=m)) < 1e-4


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prompt,window", [(17, 6), (12, 1), (7, 30), (0, 5)], ids=["W6", "W1", "W>L", "empty-prompt"])
def test_prefill_then_steps(dtype, prompt, window):
    """Prefill (one fused pass) + in-place steps == the full causal forward, with left padding, grouped heads and
    far weights."""
    b, h, hk, L = 3, 4, 2, 26
    q, k, v, m = inputs(b, h, hk, L, 5, 7, seed=seed_for("triton-decode", dtype, prompt, window), mask="left",
                        dtype=dtype)
    fw = torch.tensor([0.5, 1.0, 2.0, 4.0])
    qd, kd, vd, md, fwd = to_device(q, k, v, m, fw)
    with torch.no_grad():
        out, cache = hybrid_attention_prefill(qd[:, :, :prompt], kd[:, :, :prompt], vd[:, :, :prompt], window=window,
                                              key_padding_mask=md[:, :prompt], far_weight=fwd, enable_gqa=True,
                                              backend="triton")
        ptrs = [t.data_ptr() for t in (cache.keys, cache.values, cache.key_padding, *cache.state, cache.position)]
        outs = [out]
        for t in range(prompt, L):
            o, _ = hybrid_attention_step(qd[:, :, t], kd[:, :, t], vd[:, :, t], cache, key_padding_mask=md[:, t],
                                         far_weight=fwd, enable_gqa=True, backend="triton")
            outs.append(o.unsqueeze(2))
    assert [t.data_ptr() for t in (cache.keys, cache.values, cache.key_padding, *cache.state, cache.position)] == ptrs
    got = torch.cat(outs, 2)
    assert got.dtype == dtype and cache.position.tolist() == [L] * b
    assert max_rel_err(got, reference(q, k, v, window=window, causal=True, key_padding_mask=m, far_weight=fw)) < FWD_TOL[dtype]


def test_cache_moves_between_triton_and_cpu():
    if "cpu" not in la.hybrid_backends("cpu") or HAS_CUDA:
        pytest.skip("CPU tensors for both backends: the interpreter and the C++ extension")
    q, k, v, m = inputs(2, 2, 2, 24, 4, 3, seed=51, mask="left")
    ref = reference(q, k, v, window=5, causal=True, key_padding_mask=m)
    with torch.no_grad():
        out, cache = hybrid_attention_prefill(q[:, :, :15], k[:, :, :15], v[:, :, :15], window=5,
                                              key_padding_mask=m[:, :15], backend="triton")
        outs = [out]
        for t in range(15, 24):
            be = "cpu" if t % 2 else "triton"
            outs.append(hybrid_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], cache, backend=be)[0][:, :, None])
    assert max_rel_err(torch.cat(outs, 2), ref) < FWD_TOL[F32]


def test_float64_is_refused_with_the_alternatives():
    q, k, v, _ = inputs(1, 1, 1, 8, 4, 4, seed=1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"float64.*backend='reference'"):
        hybrid_attention(*to_device(q, k, v), window=3, backend="triton")
    if HAS_CUDA:  # auto on a GPU means triton: never a silent fallback
        with pytest.raises(RuntimeError, match="chosen by backend='auto'"):
            hybrid_attention(*to_device(q, k, v), window=3)


# ------------------------------------------------------------------------------------------------------
# GPU compilation without a GPU: every launch compiled for sm_90 (Triton + ptxas)
# ------------------------------------------------------------------------------------------------------
def _has_nvidia_toolchain() -> bool:
    base = os.path.dirname(triton.__file__)
    return os.path.exists(os.path.join(base, "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled by the other tests")
@pytest.mark.skipif(not _has_nvidia_toolchain(), reason="triton without its NVIDIA toolchain")
def test_kernels_compile_for_sm90():
    """Every launch of the benchmark and test shapes compiles for sm_90, with float scalars typed fp64 as
    torch.compile's inductor passes them (the kernels cast them to fp32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LINATTN_COMPILE_CHECK_FLOAT"] = "fp64"
    script = os.path.join(os.path.dirname(__file__), "hybrid_triton_compile_check.py")
    res = subprocess.run([sys.executable, script, "--arch", "90"], env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]


# ------------------------------------------------------------------------------------------------------
# GPU only: real sizes, opcheck, torch.compile, CUDA-graph capture of a step
# ------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_based_shape_bf16(causal):
    q, k, v, m = inputs(2, 4, 4, 2000, 16, 64, seed=61, mask="random", dtype=BF16, requires_grad=True)
    qd, kd, vd, md = to_device(q, k, v, m)
    out = hybrid_attention(qd, kd, vd, window=64, causal=causal, key_padding_mask=md)  # auto: triton
    kw = dict(window=64, causal=causal, key_padding_mask=m)
    assert max_rel_err(out, reference(q, k, v, **kw)) < FWD_TOL[BF16]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(BF16)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g.to(DEVICE)), reference_grads(q, k, v, g, **kw)):
        assert max_rel_err(a, r) < GRAD_TOL[BF16]


@gpu
@pytest.mark.gpu
def test_gpu_opcheck():
    q, k, v, m = to_device(*inputs(2, 4, 2, 70, 16, 32, seed=63, mask="random", dtype=BF16, requires_grad=True))
    fw = (torch.rand(4, device=DEVICE) + 0.5).requires_grad_()
    args = (q, k, v, m, fw, 9, True, 0.25)
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_triton_fwd, args)
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_triton_prefill, (q.detach(), k.detach(), v.detach(), m,
                                                                         fw.detach(), 9, 0.25))


@gpu
@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, m = to_device(*inputs(2, 4, 2, 300, 16, 64, seed=65, mask="random", dtype=BF16, requires_grad=True))

    def f(q, k, v):
        return hybrid_attention(q, k, v, window=64, key_padding_mask=m, enable_gqa=True).float().square().sum()

    loss = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    want = f(q2, k2, v2)
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
    for a, b_ in zip(grads, torch.autograd.grad(want, (q2, k2, v2))):
        torch.testing.assert_close(a, b_, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_gpu_step_in_a_cuda_graph():
    """A decoding step is capturable: replaying the graph equals stepping eagerly."""
    q, k, v, _ = to_device(*inputs(4, 8, 2, 40, 16, 64, seed=67, dtype=BF16))
    with torch.no_grad():
        _, cache = hybrid_attention_prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], window=16, enable_gqa=True)
        _, eager = hybrid_attention_prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], window=16, enable_gqa=True)
        qs, ks, vs = q[:, :, 30].clone(), k[:, :, 30].clone(), v[:, :, 30].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (compiles the kernel) on a copy of the cache
            scratch = la.empty_hybrid_cache(4, 2, 16, 64, 16, device=DEVICE)
            hybrid_attention_step(qs, ks, vs, scratch, enable_gqa=True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = hybrid_attention_step(qs, ks, vs, cache, enable_gqa=True)
        for t in range(30, 40):
            qs.copy_(q[:, :, t]), ks.copy_(k[:, :, t]), vs.copy_(v[:, :, t])
            graph.replay()
            want, _ = hybrid_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], eager, enable_gqa=True)
            torch.testing.assert_close(out, want)
