"""Hybrid attention (softmax inside a window, Taylor beyond, one normalizer): the public functions and the "cpu"
and "reference" backends against the float64 definition (hybrid_attention_reference); gradients, padding, large
logits, far weights, grouped-query heads, dtypes, prefill + steps, custom-op registration, torch.compile, memory.
The module (nn.HybridAttention) is in tests/test_hybrid_module.py, the Triton kernels in tests/test_hybrid_triton.py.

Tolerances are a few times the errors measured on these cases (float64 ~1e-15, float32 ~3e-7 (gradients ~5e-6),
float16 ~4e-4, bfloat16 ~3e-3 (gradients ~6e-3), relative to the largest reference value), so a wrong weight, a missed key or a lost stabilizer fails.
"""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linattn_cuda as la
from linattn_cuda import hybrid_attention, hybrid_attention_prefill, hybrid_attention_reference, hybrid_attention_step

from .helpers import max_rel_err, seed_for

HAS_CPU = "cpu" in la.hybrid_backends("cpu")
BACKENDS = [b for b in ("cpu", "reference") if b in la.hybrid_backends("cpu")]
cpu_only = pytest.mark.skipif(not HAS_CPU, reason="the C++ extension (with the hybrid kernels) is not built")
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# max relative error of the output (and of the gradients) against float64, per input dtype
FWD_TOL = {F64: 1e-14, F32: 2e-6, F16: 2e-3, BF16: 1.5e-2}
GRAD_TOL = {F64: 1e-13, F32: 2e-5, F16: 2e-3, BF16: 3e-2}


def inputs(b, h, hk, L, d, dv, *, seed, mask=None, dtype=F32, scale_q=1.0, requires_grad=False):
    """q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] ~ N(0, 1) (q times scale_q) and a key padding mask:
    None, "random" (30 %, plus the first 3 keys of row 0), "full-row" (random, row 1 all padding) or "left"
    (row b padded on its first 3 b + 1 positions)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, L, d, generator=gen, dtype=F64) * scale_q
    k = torch.randn(b, hk, L, d, generator=gen, dtype=F64)
    v = torch.randn(b, hk, L, dv, generator=gen, dtype=F64)
    m = None
    if mask in ("random", "full-row"):
        m = torch.rand(b, L, generator=gen) < 0.3
        m[0, : min(3, L)] = True
        if mask == "full-row" and b > 1:
            m[1] = True
    elif mask == "left":
        m = torch.zeros(b, L, dtype=torch.bool)
        for r in range(b):
            m[r, : min(L, 3 * r + 1)] = True
    ts = [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return (*ts, m)


def reference(q, k, v, **kw):
    return hybrid_attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), **kw)


def reference_grads(q, k, v, g, far_weight=None, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    fw = None if far_weight is None else far_weight.detach().double().requires_grad_()
    out = hybrid_attention_reference(*leaves, far_weight=fw, **kw)
    return torch.autograd.grad(out, leaves + ([fw] if fw is not None else []), g.double())


# (B, H, Hkv, L, D, Dv, window): odd lengths, windows shorter / longer than the chunk, W > L, W = 1, W = L,
# L a multiple of W, grouped-query heads
SHAPES = [
    pytest.param((2, 3, 3, 37, 8, 12, 8), id="B2-H3-L37-D8-Dv12-W8"),
    pytest.param((1, 2, 2, 130, 16, 16, 64), id="B1-H2-L130-D16-W64"),
    pytest.param((2, 2, 2, 9, 4, 5, 16), id="B2-H2-L9-W16(>L)"),
    pytest.param((1, 1, 1, 20, 6, 3, 1), id="B1-H1-L20-W1"),
    pytest.param((2, 1, 1, 96, 16, 8, 32), id="B2-H1-L96-D16-W32"),
    pytest.param((1, 2, 2, 23, 3, 4, 23), id="B1-H2-L23-W23(=L)"),
    pytest.param((2, 4, 2, 75, 5, 7, 13), id="B2-H4-Hkv2-L75-W13-gqa"),
    pytest.param((1, 3, 1, 201, 7, 9, 70), id="B1-H3-Hkv1-L201-W70-mqa"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("mask", [None, "full-row", "left"], ids=["nomask", "mask", "leftpad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_definition(shape, causal, mask, backend):
    b, h, hk, L, d, dv, w = shape
    q, k, v, m = inputs(b, h, hk, L, d, dv, seed=seed_for(shape, causal, mask), mask=mask)
    out = hybrid_attention(q, k, v, window=w, causal=causal, key_padding_mask=m, enable_gqa=hk != h, backend=backend)
    ref = reference(q, k, v, window=w, causal=causal, key_padding_mask=m)
    assert out.dtype == q.dtype and out.shape == (b, h, L, dv)
    assert max_rel_err(out, ref) < FWD_TOL[F32]
    if mask == "full-row" and b > 1:
        assert (out[1] == 0).all()  # every key of row 1 is padding: 0, never NaN


@cpu_only
@pytest.mark.parametrize("chunk", [1, 5, 16, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_block_sizes(monkeypatch, chunk, causal):
    """The kernel's query blocks (LINATTN_CPU_HYBRID_CHUNK) need not align with the window: every block size
    gives the definition, forward and backward (float64, so that a single misplaced pair shows)."""
    monkeypatch.setenv("LINATTN_CPU_HYBRID_CHUNK", str(chunk))
    q, k, v, m = inputs(2, 2, 2, 61, 5, 6, seed=seed_for("chunk", chunk, causal), mask="random", dtype=F64,
                        requires_grad=True)
    fw = torch.tensor([0.3, 2.5], dtype=F64, requires_grad=True)
    out = hybrid_attention(q, k, v, window=11, causal=causal, key_padding_mask=m, far_weight=fw, backend="cpu")
    kw = dict(window=11, causal=causal, key_padding_mask=m)
    assert max_rel_err(out, reference(q, k, v, far_weight=fw.detach(), **kw)) < FWD_TOL[F64]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = torch.autograd.grad(out, (q, k, v, fw), g)
    for name, a, r in zip(("q", "k", "v", "far_weight"), got, reference_grads(q, k, v, g, fw, **kw)):
        assert max_rel_err(a, r) < GRAD_TOL[F64], name


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_forward_and_backward(dtype, causal, backend):
    """Every dtype class: output and gradients in the input dtype, within the dtype's tolerance of float64."""
    q, k, v, m = inputs(2, 2, 2, 45, 8, 8, seed=seed_for("dtype", dtype, causal), mask="random", dtype=dtype,
                        requires_grad=True)
    out = hybrid_attention(q, k, v, window=7, causal=causal, key_padding_mask=m, backend=backend)
    assert out.dtype == dtype
    kw = dict(window=7, causal=causal, key_padding_mask=m)
    assert max_rel_err(out, reference(q, k, v, **kw)) < FWD_TOL[dtype]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for name, a, r in zip("qkv", grads, reference_grads(q, k, v, g, **kw)):
        assert a.dtype == dtype, name
        assert max_rel_err(a, r) < GRAD_TOL[dtype], name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_definition(shape, causal, backend):
    b, h, hk, L, d, dv, w = shape
    q, k, v, m = inputs(b, h, hk, L, d, dv, seed=seed_for("grad", shape, causal), mask="random", requires_grad=True)
    fw = torch.rand(h, generator=torch.Generator().manual_seed(L)) * 3 + 0.2
    fw.requires_grad_()
    g = torch.randn(b, h, L, dv, generator=torch.Generator().manual_seed(3))
    out = hybrid_attention(q, k, v, window=w, causal=causal, key_padding_mask=m, far_weight=fw, enable_gqa=hk != h,
                           backend=backend)
    grads = torch.autograd.grad(out, (q, k, v, fw), g)
    ref = reference_grads(q, k, v, g, fw, window=w, causal=causal, key_padding_mask=m)
    for name, a, r in zip(("q", "k", "v", "far_weight"), grads, ref):
        assert a.shape == r.shape and max_rel_err(a, r) < GRAD_TOL[F32], name


@cpu_only
def test_gradcheck_float64():
    q, k, v, m = inputs(1, 2, 1, 11, 3, 2, seed=5, mask="random", dtype=F64, requires_grad=True)
    m[0, 0] = False
    fw = torch.tensor([0.7, 1.9], dtype=F64, requires_grad=True)
    for causal in (True, False):
        def fn(q, k, v, fw):
            return hybrid_attention(q, k, v, window=3, causal=causal, key_padding_mask=m, far_weight=fw,
                                    enable_gqa=True, backend="cpu")

        assert torch.autograd.gradcheck(fn, (q, k, v, fw))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(causal, backend):
    """Logits of several hundred (exp overflows float32 at 88): stabilized, equal to the float64 definition, and
    with very negative window logits the Taylor part (>= 1/2 per key) carries the row instead of 0/0."""
    q, k, v, m = inputs(2, 2, 2, 40, 8, 4, seed=seed_for("large", causal), mask="random", scale_q=40.0,
                        requires_grad=True)
    for sign in (1.0, -1.0):
        kk = (sign * k).detach().requires_grad_()
        out = hybrid_attention(q, kk, v, window=8, causal=causal, key_padding_mask=m, backend=backend)
        ref = reference(q, kk, v, window=8, causal=causal, key_padding_mask=m)
        assert torch.isfinite(out).all()
        assert max_rel_err(out, ref) < 1e-4
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad(out, (q, kk, v), g)
        for name, a, r in zip("qkv", grads, reference_grads(q, kk, v, g, window=8, causal=causal, key_padding_mask=m)):
            assert torch.isfinite(a).all(), name
            assert max_rel_err(a, r) < 1e-3, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_keys_holding_nan_change_nothing(backend):
    q, k, v, m = inputs(2, 2, 2, 33, 8, 6, seed=17, mask="random", requires_grad=True)
    out = hybrid_attention(q, k, v, window=5, key_padding_mask=m, backend=backend)
    pad = m[:, None, :, None]
    k_nan = k.detach().masked_fill(pad, float("nan")).requires_grad_()
    v_inf = v.detach().masked_fill(pad, float("inf")).requires_grad_()
    out_nan = hybrid_attention(q, k_nan, v_inf, window=5, key_padding_mask=m, backend=backend)
    torch.testing.assert_close(out_nan, out)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    for a, b_ in zip(torch.autograd.grad(out_nan, (q, k_nan, v_inf), g), torch.autograd.grad(out, (q, k, v), g)):
        torch.testing.assert_close(a, b_)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_covering_the_sequence_is_softmax(backend):
    """W >= L: every key is inside the window: the result is softmax attention (SDPA with the same masks)."""
    q, k, v, m = inputs(2, 2, 2, 29, 8, 5, seed=21, mask="random")
    m[:, 0] = False  # every row sees a key (SDPA gives NaN for a row without one, the hybrid 0)
    for causal in (True, False):
        out = hybrid_attention(q, k, v, window=100, causal=causal, key_padding_mask=m, backend=backend)
        allowed = ~m[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(29, 29, dtype=torch.bool).tril()
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
        assert max_rel_err(out, sdpa) < FWD_TOL[F32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_weight_checks(backend):
    q, k, v, _ = inputs(1, 2, 2, 12, 4, 3, seed=7)
    for bad in (torch.tensor([1.0, -0.5]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, float("inf")]),
                torch.tensor([float("nan"), 1.0])):
        with pytest.raises(ValueError, match="far_weight must be finite and positive"):
            hybrid_attention(q, k, v, window=3, far_weight=bad, backend=backend)
    with pytest.raises(ValueError, match=r"far_weight must be a tensor of shape \[H\] = \[2\]"):
        hybrid_attention(q, k, v, window=3, far_weight=torch.ones(3), backend=backend)


@cpu_only
def test_cpu_op_checks_far_weight_itself():
    q, k, v, _ = inputs(1, 2, 2, 12, 4, 3, seed=8)
    with pytest.raises(RuntimeError, match="far_weight must be finite and positive"):
        torch.ops.linattn_cuda.hybrid_fwd(q, k, v, None, torch.tensor([1.0, -1.0]), None, 3, True, 0.5)


def test_window_accepts_numpy_and_torch_integers():
    q, k, v, _ = inputs(1, 1, 1, 10, 4, 3, seed=9)
    want = hybrid_attention(q, k, v, window=4, backend="reference")
    for w in (np.int64(4), np.int32(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)):
        torch.testing.assert_close(hybrid_attention(q, k, v, window=w, backend="reference"), want)
    for bad in (0, -1, 2.5, True, np.float32(4.0), torch.tensor(4.0), "4"):
        with pytest.raises(ValueError, match="window must be a positive integer"):
            hybrid_attention(q, k, v, window=bad, backend="reference")


def test_argument_errors():
    q, k, v, _ = inputs(1, 1, 1, 8, 4, 4, seed=1)
    with pytest.raises(ValueError, match="self-attention"):
        hybrid_attention(q, k[:, :, :5], v[:, :, :5], window=4, causal=False)
    with pytest.raises(ValueError, match="unknown backend"):
        hybrid_attention(q, k, v, window=4, backend="cuda")
    with pytest.raises(ValueError, match="enable_gqa"):
        hybrid_attention(q.expand(1, 2, 8, 4), k, v, window=4)
    with pytest.raises(TypeError, match="cache must be a HybridCache"):
        hybrid_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], la.empty_state(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"state.kv must have shape \[1, 1, 15, 4\]"):
        hybrid_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], la.empty_hybrid_cache(2, 1, 4, 4, 3))
    if HAS_CPU:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        with pytest.raises(RuntimeError, match="inference-only"):
            hybrid_attention_prefill(qg, kg, vg, window=4, backend="cpu")


def test_auto_never_falls_back_silently(monkeypatch):
    """When the fused backend "auto" picks cannot serve a call, the error says why and names the alternatives
    instead of running the blocked PyTorch path."""
    from linattn_cuda.ops.hybrid import functions

    real = functions._unavailable
    monkeypatch.setattr(functions, "_unavailable",
                        lambda name, q: "not built (simulated)" if name == "cpu" else real(name, q))
    q, k, v, _ = inputs(1, 1, 1, 8, 4, 4, seed=2)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' \(chosen by backend='auto' for cpu tensors\).*"
                                           r"not built \(simulated\).*backend='reference'"):
        hybrid_attention(q, k, v, window=3)
    with pytest.raises(RuntimeError, match="not built"):
        hybrid_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], la.empty_hybrid_cache(1, 1, 4, 4, 3))
    torch.testing.assert_close(hybrid_attention(q, k, v, window=3, backend="reference"),
                               reference(q, k, v, window=3).float())


def test_empty_inputs():
    for L in (0,):
        q, k, v, _ = inputs(2, 2, 2, L, 4, 3, seed=1)
        for backend in BACKENDS:
            assert hybrid_attention(q, k, v, window=4, backend=backend).shape == (2, 2, 0, 3)
    q, k, v, _ = inputs(0, 2, 2, 5, 4, 3, seed=1)
    assert hybrid_attention(q, k, v, window=4).shape == (0, 2, 5, 3)


# ---------------------------------------------------------------------------------------------------- decoding


def prefill_then_steps(q, k, v, m, *, window, prompt, backend, far_weight=None):
    """hybrid_attention_prefill on the first ``prompt`` tokens, then one step per token; the outputs concatenated."""
    with torch.no_grad():
        hk = k.shape[1]
        out, cache = hybrid_attention_prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], window=window,
                                              key_padding_mask=None if m is None else m[:, :prompt],
                                              far_weight=far_weight, enable_gqa=hk != q.shape[1], backend=backend)
        outs = [out]
        for t in range(prompt, q.shape[2]):
            o, cache2 = hybrid_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], cache,
                                              key_padding_mask=None if m is None else m[:, t], far_weight=far_weight,
                                              enable_gqa=hk != q.shape[1], backend=backend)
            assert cache2 is cache
            outs.append(o.unsqueeze(2))
    return torch.cat(outs, 2), cache


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mask", [None, "left", "random"], ids=["nomask", "leftpad", "random"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_steps_equal_the_full_forward(dtype, mask, backend):
    """Every dtype, with left padding (a batch of prompts of different lengths) and with padding anywhere, grouped
    key/value heads and far weights: prefill + steps == the causal forward of the whole sequence."""
    b, h, hk, L, w = 3, 4, 2, 40, 6
    q, k, v, m = inputs(b, h, hk, L, 5, 7, seed=seed_for("decode", dtype, mask), mask=mask, dtype=dtype)
    fw = torch.tensor([0.5, 1.0, 2.0, 4.0])
    full = hybrid_attention(q, k, v, window=w, key_padding_mask=m, far_weight=fw, enable_gqa=True, backend=backend)
    got, cache = prefill_then_steps(q, k, v, m, window=w, prompt=17, backend=backend, far_weight=fw)
    assert got.dtype == dtype
    ref = reference(q, k, v, window=w, causal=True, key_padding_mask=m, far_weight=fw)
    assert max_rel_err(got, ref) < FWD_TOL[dtype]
    assert max_rel_err(got, full) < 2 * FWD_TOL[dtype]
    assert cache.position.tolist() == [L] * b
    assert cache.keys.shape == (b, hk, w - 1, 5) and cache.state.kv.shape == (b, hk, la.feature_dim(5), 7)


@pytest.mark.parametrize("prompt,window", [(0, 5), (3, 5), (4, 5), (5, 5), (12, 1), (12, 2), (7, 30)],
                         ids=["empty-prompt", "prompt<W-1", "prompt=W-1", "prompt=W", "W1", "W2", "W>L"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_steps_edge_windows(prompt, window, backend):
    q, k, v, m = inputs(2, 2, 2, 19, 4, 3, seed=seed_for("edges", prompt, window), mask="random", dtype=F64)
    got, _ = prefill_then_steps(q, k, v, m, window=window, prompt=prompt, backend=backend)
    assert max_rel_err(got, reference(q, k, v, window=window, causal=True, key_padding_mask=m)) < FWD_TOL[F64]


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_updates_the_cache_in_place(backend):
    """A step writes into the cache's own tensors (no copy of the ring or the state, the same storage after it),
    from an empty cache too; positions are per-row device tensors, never host values."""
    q, k, v, _ = inputs(2, 2, 1, 9, 4, 3, seed=31)
    cache = la.empty_hybrid_cache(2, 1, 4, 3, 4)
    ptrs = [t.data_ptr() for t in (cache.keys, cache.values, cache.key_padding, *cache.state, cache.position)]
    outs = []
    for t in range(9):
        o, cache = hybrid_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], cache, enable_gqa=True, backend=backend)
        outs.append(o.unsqueeze(2))
    assert [t.data_ptr() for t in (cache.keys, cache.values, cache.key_padding, *cache.state, cache.position)] == ptrs
    assert isinstance(cache.position, torch.Tensor) and cache.position.tolist() == [9, 9]
    want = reference(q, k, v, window=4, causal=True)
    assert max_rel_err(torch.cat(outs, 2), want) < FWD_TOL[F32]


def test_backends_share_the_cache_format():
    """A cache from one backend's prefill continues in another's steps (same ring slots, state, positions)."""
    if not HAS_CPU:
        pytest.skip("needs the cpu backend")
    q, k, v, m = inputs(2, 2, 2, 30, 4, 3, seed=33, mask="left", dtype=F64)
    ref = reference(q, k, v, window=7, causal=True, key_padding_mask=m)
    for first, second in (("cpu", "reference"), ("reference", "cpu")):
        with torch.no_grad():
            out, cache = hybrid_attention_prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20], window=7,
                                                  key_padding_mask=m[:, :20], backend=first)
            outs = [out]
            for t in range(20, 30):
                outs.append(hybrid_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], cache, backend=second)[0][:, :, None])
        assert max_rel_err(torch.cat(outs, 2), ref) < FWD_TOL[F64]


def test_prefill_reference_is_differentiable():
    q, k, v, m = inputs(1, 2, 2, 14, 4, 3, seed=35, mask="random", dtype=F64, requires_grad=True)
    out, _ = hybrid_attention_prefill(q, k, v, window=4, key_padding_mask=m, backend="reference")
    g = torch.randn(out.shape, dtype=F64)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), reference_grads(q, k, v, g, window=4, causal=True,
                                                                             key_padding_mask=m)):
        assert max_rel_err(a, r) < 1e-10


# ---------------------------------------------------------------------------------------------------- registration


@cpu_only
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_opcheck(causal):
    q, k, v, m = inputs(2, 4, 2, 21, 5, 6, seed=41, mask="random", requires_grad=True)
    fw = (torch.rand(4) + 0.5).requires_grad_()
    args = (q, k, v, m, fw, None, 6, causal, 0.4)
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_fwd.default, args)
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_fwd.default, (q, k, v, None, None, None, 6, causal, 0.4))
    out, lse = torch.ops.linattn_cuda.hybrid_fwd(*args)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_bwd.default,
                          (g, q.detach(), k.detach(), v.detach(), m, fw.detach(), None, out.detach(), lse, 6, causal, 0.4))
    if causal:
        torch.library.opcheck(torch.ops.linattn_cuda.hybrid_prefill.default,
                              (q.detach(), k.detach(), v.detach(), m, fw.detach(), 6, 0.4))


@cpu_only
def test_opcheck_step():
    q, k, v, _ = inputs(2, 4, 2, 1, 5, 6, seed=43)
    cache = la.empty_hybrid_cache(2, 2, 5, 6, 4)
    with torch.no_grad():  # a few tokens in the cache first
        for _ in range(5):
            hybrid_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], cache, enable_gqa=True)
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.tensor([False, True]), cache.keys, cache.values,
            cache.key_padding, cache.state.kv, cache.state.k_sum, cache.position, torch.tensor([1.0, 2.0, 0.5, 1.5]),
            0.4)
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_step.default, args)


@cpu_only
def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    q, k, v, m = inputs(2, 4, 2, 37, 6, 5, seed=45, mask="random", requires_grad=True)
    fw = (torch.rand(4) + 0.5).requires_grad_()

    def fn(q, k, v, fw):
        return hybrid_attention(q, k, v, window=6, key_padding_mask=m, far_weight=fw, enable_gqa=True,
                                backend="cpu")

    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(q, k, v, fw)
    eager = fn(q, k, v, fw)
    torch.testing.assert_close(out, eager)
    g = torch.randn_like(out)
    for a, b_ in zip(torch.autograd.grad(out, (q, k, v, fw), g), torch.autograd.grad(eager, (q, k, v, fw), g)):
        torch.testing.assert_close(a, b_)


@cpu_only
def test_torch_compile_fullgraph_step():
    torch._dynamo.reset()
    q, k, v, _ = inputs(2, 2, 2, 12, 4, 3, seed=47)
    cache = la.empty_hybrid_cache(2, 2, 4, 3, 5)
    want = la.empty_hybrid_cache(2, 2, 4, 3, 5)

    def step(q, k, v, cache):
        return hybrid_attention_step(q, k, v, cache, backend="cpu")[0]

    compiled = torch.compile(step, fullgraph=True)
    for t in range(12):
        torch.testing.assert_close(compiled(q[:, :, t], k[:, :, t], v[:, :, t], cache),
                                   step(q[:, :, t], k[:, :, t], v[:, :, t], want))
    torch.testing.assert_close(cache.state.kv, want.state.kv)
    assert cache.position.tolist() == [12, 12]


# ---------------------------------------------------------------------------------------------------- memory


class _Allocations(TorchDispatchMode):
    """The largest tensor any op produces under the mode (the fused kernels' scratch is inside one op)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_quadratic_intermediate(backend):
    """No L x L tensor: at L = 4096, W = 64 the largest tensor is ~L * 2W per head for the blocked reference
    ([B, H, L/W, W, 2W] blocks) and no more than the output for the fused kernel."""
    L, w = 4096, 64
    q, k, v, _ = inputs(1, 1, 1, L, 4, 4, seed=7)
    with _Allocations() as probe:
        hybrid_attention(q, k, v, window=w, backend=backend)
    limit = 4 * L * w if backend == "reference" else L * 4
    assert probe.largest <= limit < L * L // 8


def _saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


@cpu_only
def test_saved_for_backward_is_like_taylor():
    """The fused hybrid saves q, k, v, out and a float32 log-normalizer per row, as Taylor saves its normalizer:
    not the window's [B, H, L, 2W] weights (the blocked reference saves several such tensors)."""
    q, k, v, _ = inputs(1, 4, 4, 1024, 16, 64, seed=9, requires_grad=True)
    hybrid = _saved_bytes(lambda: hybrid_attention(q, k, v, window=64, backend="cpu"))
    taylor = _saved_bytes(lambda: la.taylor_attention(q, k, v, causal=True, backend="cpu"))
    blocked = _saved_bytes(lambda: hybrid_attention(q, k, v, window=64, backend="reference"))
    assert hybrid <= 1.05 * taylor
    assert blocked > 3 * hybrid


# ---------------------------------------------------------------------------------------------------- packed sequences


def packed_inputs(lengths, h, hk, d, dv, *, seed, dtype=F32, requires_grad=False):
    """Packed q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] ~ N(0, 1) of sequences with `lengths`, and cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, n, c, generator=gen, dtype=F64) for n, c in ((h, d), (hk, d), (hk, dv)))
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    return (*[x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)], cu)


def per_sequence_reference(q, k, v, cu, **kw):
    """The float64 definition on each sequence alone, packed again: the ground truth of a varlen call."""
    b = cu.tolist()
    dense = lambda x, s, e: x[s:e].double().transpose(0, 1)[None]  # noqa: E731
    outs = [hybrid_attention_reference(dense(q, s, e), dense(k, s, e), dense(v, s, e), **kw)[0]
            .transpose(0, 1) for s, e in zip(b[:-1], b[1:])]
    return torch.cat(outs)


# lengths 0, 1, odd, shorter and longer than the window and the chunk (64)
VARLEN = [
    pytest.param(([5, 0, 1, 37, 130], 3, 3, 8, 12, 16), id="mha-W16"),
    pytest.param(([70, 0, 9, 2], 4, 2, 5, 7, 13), id="gqa2-W13"),
    pytest.param(([1, 3, 201], 3, 1, 7, 9, 70), id="mqa-W70"),
]


@pytest.mark.parametrize("case", VARLEN)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_matches_each_sequence_alone(case, causal, backend):
    lengths, h, hk, d, dv, w = case
    q, k, v, cu = packed_inputs(lengths, h, hk, d, dv, seed=seed_for(case, causal, backend), dtype=F64,
                                requires_grad=True)
    fw = (torch.rand(h, dtype=F64) + 0.5).requires_grad_()
    out = la.hybrid_attention_varlen(q, k, v, cu, window=w, causal=causal, far_weight=fw, enable_gqa=True,
                                     backend=backend)
    assert out.shape == (sum(lengths), h, dv)
    kw = dict(window=w, causal=causal, scale=d ** -0.5)
    ref = per_sequence_reference(q.detach(), k.detach(), v.detach(), cu, far_weight=fw.detach(), **kw)
    assert max_rel_err(out, ref) < FWD_TOL[F64]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, fw), g)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, fw)]
    ref_grads = torch.autograd.grad(per_sequence_reference(*leaves[:3], cu, far_weight=leaves[3], **kw), leaves, g)
    for name, a, r in zip(("dq", "dk", "dv", "dfw"), grads, ref_grads):
        assert max_rel_err(a, r) < GRAD_TOL[F64], name


@cpu_only
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_varlen_low_precision_equals_the_dense_kernel(dtype):
    """A packed call equals the dense fused kernel run on each sequence (the same arithmetic, exactly)."""
    lengths = [33, 1, 0, 90]
    q, k, v, cu = packed_inputs(lengths, 4, 2, 16, 8, seed=77, dtype=dtype)
    out = la.hybrid_attention_varlen(q, k, v, cu, window=24, enable_gqa=True, backend="cpu")
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        dense = hybrid_attention(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)), window=24, enable_gqa=True,
                                 backend="cpu")[0].transpose(0, 1)
        torch.testing.assert_close(out[s:e], dense, rtol=0, atol=0)


@cpu_only
def test_varlen_opcheck_and_errors():
    q, k, v, cu = packed_inputs([7, 0, 12], 2, 1, 4, 3, seed=78, requires_grad=True)
    args = (q, k, v, None, None, cu, 5, True, 0.5)
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_fwd.default, args)
    out, lse = torch.ops.linattn_cuda.hybrid_fwd(*args)
    assert lse.shape == (2, 19)  # head-major [H, T]
    torch.library.opcheck(torch.ops.linattn_cuda.hybrid_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None, None, cu, out.detach(),
                           lse, 5, True, 0.5))
    with pytest.raises(RuntimeError, match="key_padding_mask must be None with cu_seqlens"):
        torch.ops.linattn_cuda.hybrid_fwd(q, k, v, torch.zeros(1, 19, dtype=torch.bool), None, cu, 5, True, 0.5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        la.hybrid_attention_varlen(q, k, v, torch.tensor([0, 7, 18], dtype=torch.int32), window=5, enable_gqa=True)
