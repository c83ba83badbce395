"""Hybrid attention (softmax inside a window, Taylor beyond, one normalizer): linattn_cuda.ops.hybrid and
linattn_cuda.nn.HybridAttention against plain float64 definitions; caches, masks, large logits, gradients,
linear memory, torch.compile."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linattn_cuda as la
from linattn_cuda.ops.hybrid.blocked import hybrid_attention, hybrid_attention_reference
from linattn_cuda.nn import HybridAttention, HybridAttentionCache, TaylorAttention

from .helpers import make_inputs, max_rel_err, seed_for

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in la.available_backends("cpu")]

# (B, H, L, D, Dv, window): odd lengths, a window longer than the sequence, window 1, L a multiple of W
SHAPES = [
    pytest.param((2, 3, 37, 8, 12, 8), id="B2-H3-L37-D8-Dv12-W8"),
    pytest.param((1, 2, 64, 16, 16, 64), id="B1-H2-L64-D16-W64"),
    pytest.param((2, 2, 9, 4, 5, 16), id="B2-H2-L9-W16(>L)"),
    pytest.param((1, 1, 20, 6, 3, 1), id="B1-H1-L20-W1"),
    pytest.param((2, 1, 96, 16, 8, 32), id="B2-H1-L96-D16-W32"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("mask", [None, "full-row"], ids=["nomask", "mask"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_definition(shape, causal, mask, backend):
    b, h, L, d, dv, w = shape
    if backend == "triton" and L > 40:
        pytest.skip("the Triton interpreter is slow: short cases only")
    q, k, v, m = make_inputs(b, h, L, L, d, dv, seed=seed_for(shape, causal, mask), mask=mask)
    out = hybrid_attention(q, k, v, window=w, causal=causal, key_padding_mask=m, backend=backend)
    ref = hybrid_attention_reference(q.double(), k.double(), v.double(), window=w, causal=causal, key_padding_mask=m)
    assert out.dtype == q.dtype and out.shape == (b, h, L, dv)
    assert max_rel_err(out, ref) < 2e-5
    if m is not None and b > 1:
        assert (out[1] == 0).all()  # every key of sample 1 is padding: 0, never NaN


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)],
                         ids=["fp64", "bf16", "fp16"])
def test_dtypes(dtype, tol):
    q, k, v, m = make_inputs(2, 2, 29, 29, 8, 8, seed=seed_for("dtype", str(dtype)), mask="random", dtype=dtype)
    out = hybrid_attention(q, k, v, window=7, key_padding_mask=m, backend="cpu" if dtype != torch.float64 else "reference")
    ref = hybrid_attention_reference(q, k, v, window=7, key_padding_mask=m)
    assert out.dtype == dtype
    assert max_rel_err(out, ref) < tol


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradients_match_float64_definition(causal, backend):
    b, h, L, d, dv, w = 2, 2, 27, 6, 5, 6
    q, k, v, m = make_inputs(b, h, L, L, d, dv, seed=seed_for("grad", causal), mask="random", requires_grad=True)
    g = torch.randn(b, h, L, dv, generator=torch.Generator().manual_seed(3))
    out = hybrid_attention(q, k, v, window=w, causal=causal, key_padding_mask=m, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = hybrid_attention_reference(q64, k64, v64, window=w, causal=causal, key_padding_mask=m)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for name, a, r in zip("qkv", grads, ref_grads):
        assert max_rel_err(a, r) < 1e-4, name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_far_weight_matches_definition_and_gets_gradients(causal):
    q, k, v, m = make_inputs(2, 3, 31, 31, 6, 5, seed=seed_for("farweight", causal), mask="random")
    fw = torch.tensor([0.05, 1.0, 7.0], requires_grad=True)
    out = hybrid_attention(q, k, v, window=5, causal=causal, key_padding_mask=m, far_weight=fw, backend="cpu")
    ref = hybrid_attention_reference(q.double(), k.double(), v.double(), window=5, causal=causal,
                                     key_padding_mask=m, far_weight=fw.detach().double())
    assert max_rel_err(out, ref) < 2e-5
    g = torch.autograd.grad(out.square().sum(), fw)[0]
    fw64 = fw.detach().double().requires_grad_()
    ref = hybrid_attention_reference(q.double(), k.double(), v.double(), window=5, causal=causal,
                                     key_padding_mask=m, far_weight=fw64)
    torch.testing.assert_close(g.double(), torch.autograd.grad(ref.square().sum(), fw64)[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="far_weight"):
        hybrid_attention(q, k, v, window=5, far_weight=torch.ones(2))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_grouped_query_attention_matches_repeated_heads(causal):
    """enable_gqa: k, v with Hkv heads == the same call on heads repeated SDPA-style; gradients summed over groups."""
    b, h, hk, L = 2, 6, 2, 29
    gen = torch.Generator().manual_seed(seed_for("gqa", causal))
    q = torch.randn(b, h, L, 8, generator=gen, requires_grad=True)
    k = torch.randn(b, hk, L, 8, generator=gen, requires_grad=True)
    v = torch.randn(b, hk, L, 5, generator=gen, requires_grad=True)
    m = torch.rand(b, L, generator=gen) < 0.3
    out = hybrid_attention(q, k, v, window=6, causal=causal, key_padding_mask=m, enable_gqa=True, backend="cpu")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = hybrid_attention_reference(q64, k64.repeat_interleave(h // hk, 1), v64.repeat_interleave(h // hk, 1),
                                     window=6, causal=causal, key_padding_mask=m)
    assert max_rel_err(out, ref) < 2e-5
    g = torch.randn(out.shape, generator=gen)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q64, k64, v64), g.double())):
        assert a.shape == r.shape and max_rel_err(a, r) < 1e-4
    with pytest.raises(ValueError):
        hybrid_attention(q, k, v, window=6, causal=causal)  # a head mismatch without enable_gqa stays an error


def test_gradcheck_float64():
    q, k, v, m = make_inputs(1, 2, 11, 11, 3, 2, seed=5, mask="random", dtype=torch.float64, requires_grad=True)
    m[0, 0] = False
    for causal in (True, False):
        fn = lambda q, k, v: hybrid_attention(q, k, v, window=3, causal=causal, key_padding_mask=m, backend="cpu")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_large_logits_stay_finite(causal):
    """Logits of several hundred (exp overflows float32 at 88): stabilized, equal to the float64 definition."""
    q, k, v, _ = make_inputs(2, 2, 40, 40, 8, 4, seed=seed_for("large", causal))
    q = q * 40.0  # |s| up to a few hundred
    out = hybrid_attention(q, k, v, window=8, causal=causal, backend="cpu")
    ref = hybrid_attention_reference(q.double(), k.double(), v.double(), window=8, causal=causal)
    assert torch.isfinite(out).all()
    assert max_rel_err(out, ref) < 1e-4
    # very negative window logits everywhere: the Taylor weights beyond the window (>= 1/2) dominate
    out = hybrid_attention(q, -k, v, window=8, causal=causal, backend="cpu")
    ref = hybrid_attention_reference(q.double(), -k.double(), v.double(), window=8, causal=causal)
    assert torch.isfinite(out).all() and max_rel_err(out, ref) < 1e-4


def test_padded_keys_holding_nan_change_nothing():
    q, k, v, m = make_inputs(2, 2, 33, 33, 8, 6, seed=17, mask="random")
    out = hybrid_attention(q, k, v, window=5, key_padding_mask=m, backend="cpu")
    pad = m[:, None, :, None]
    out_nan = hybrid_attention(q, k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")), window=5,
                               key_padding_mask=m, backend="cpu")
    torch.testing.assert_close(out_nan, out)


class _MaxTensorSize(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_linear_in_length():
    """No L x L tensor: at L = 4096, W = 64 the largest intermediate is ~L * 2W per head, not L^2."""
    L, w = 4096, 64
    q, k, v, _ = make_inputs(1, 1, L, L, 4, 4, seed=7)
    with _MaxTensorSize() as probe:
        hybrid_attention(q, k, v, window=w, backend="reference")
    assert probe.largest <= 4 * L * w < L * L // 8


def test_argument_errors():
    q, k, v, _ = make_inputs(1, 1, 8, 8, 4, 4, seed=1)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="self-attention"):
        hybrid_attention(q, k[:, :, :5], v[:, :, :5], window=4, causal=False)
    with pytest.raises(ValueError, match="window"):
        HybridAttention(16, 2, window=-1)
    with pytest.raises(ValueError, match="conv_size"):
        HybridAttention(16, 2, conv_size=-2)
    with pytest.raises(ValueError, match="cross-attention"):
        HybridAttention(16, 2, conv_size=3)(torch.randn(1, 4, 16), torch.randn(1, 5, 16))


def test_empty_inputs():
    q, k, v, _ = make_inputs(2, 2, 0, 0, 4, 3, seed=1)
    assert hybrid_attention(q, k, v, window=4).shape == (2, 2, 0, 3)


# ---------------------------------------------------------------------------------------------------- module


def reference_module(attn: HybridAttention, x, *, causal, key_padding_mask=None):
    """The module written out in float64: projections, short convolution, temperature, dense hybrid weights."""
    p = {name: t.double() for name, t in attn.state_dict().items()}
    x = x.double()
    b, length, _ = x.shape
    h = attn.num_heads
    q = x @ p["query.weight"].T + p.get("query.bias", 0)
    k = x @ p["key.weight"].T
    v = x @ p["value.weight"].T + p.get("value.bias", 0)
    if attn.conv is not None:
        y = torch.cat([q, k, v], -1)
        if key_padding_mask is not None:
            y = y.masked_fill(key_padding_mask[..., None], 0)
        taps = p["conv.weight"][:, 0]  # [C, K]: out_t = sum_i taps[:, i] * y_{t - (K - 1) + i}
        ypad = torch.nn.functional.pad(y, (0, 0, attn.conv_size - 1, 0))
        y = sum(taps[:, i] * ypad[:, i : i + length] for i in range(attn.conv_size)) + p["conv.bias"]
        hq, hk = h * attn.qk_dim, attn.num_kv_heads * attn.qk_dim
        q, k, v = y[..., :hq], y[..., hq : hq + hk], y[..., hq + hk :]
    q = q.view(b, length, h, -1).transpose(1, 2)
    k, v = (t.view(b, length, attn.num_kv_heads, -1).transpose(1, 2) for t in (k, v))
    if attn.log_temperature is not None:
        q = q * p["log_temperature"].exp()[None, :, None, None]
    far_weight = p["log_far_weight"].exp() if attn.log_far_weight is not None else None
    out = hybrid_attention_reference(q, k, v, window=attn.window, causal=causal, scale=attn.scale,
                                     key_padding_mask=key_padding_mask, far_weight=far_weight)
    out = out.transpose(1, 2).reshape(b, length, -1)
    return out @ p["out.weight"].T + p.get("out.bias", 0)


MODULES = [
    pytest.param(dict(embed_dim=32, num_heads=4, window=8), id="E32-H4-W8"),
    pytest.param(dict(embed_dim=24, num_heads=2, window=5, feature_dim=6, conv_size=3), id="E24-H2-W5-F6-conv3"),
    pytest.param(dict(embed_dim=16, num_heads=2, window=4, feature_dim=None, learn_scale=True, bias=False),
                 id="E16-H2-W4-headdim-temp-nobias"),
    pytest.param(dict(embed_dim=24, num_heads=3, window=6, learn_far_weight=True, conv_size=2),
                 id="E24-H3-W6-farweight-conv2"),
    pytest.param(dict(embed_dim=32, num_heads=4, num_kv_heads=2, window=5, feature_dim=6, conv_size=3,
                      learn_far_weight=True, learn_scale=True), id="E32-H4-KV2-W5-gqa-conv3"),
]


def _randomize_temperature(attn):
    with torch.no_grad():
        for p in (attn.log_temperature, attn.log_far_weight):
            if p is not None:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("kw", MODULES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_module_matches_float64_reference(kw, causal):
    torch.manual_seed(seed_for("module", kw["window"], causal))
    attn = HybridAttention(**kw)
    _randomize_temperature(attn)
    x = torch.randn(2, 19, kw["embed_dim"])
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[1, 13:] = True  # right padding
    out = attn(x, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), reference_module(attn, x, causal=causal, key_padding_mask=mask),
                               atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("kw", MODULES)
def test_decoding_cache_matches_full_sequence(kw):
    """Token by token through the fixed-size cache == the full causal forward; the cache never grows."""
    torch.manual_seed(seed_for("cache", kw["window"]))
    attn = HybridAttention(**kw)
    _randomize_temperature(attn)
    x = torch.randn(3, 3 * kw["window"] + 2, kw["embed_dim"])
    full = attn(x, causal=True)
    cache = attn.init_cache(batch_size=3)
    sizes = {t.numel() for t in (cache.keys, cache.values, *cache.state)}
    outs = []
    for t in range(x.shape[1]):
        out_t, cache = attn.step(x[:, t : t + 1], cache)
        outs.append(out_t)
        assert {t_.numel() for t_ in (cache.keys, cache.values, *cache.state)} == sizes
    assert isinstance(cache, HybridAttentionCache) and cache.position == x.shape[1]
    assert cache.keys.shape[1] == attn.num_kv_heads and cache.state.kv.shape[1] == attn.num_kv_heads
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=2e-5)
    out_2d, _ = attn.step(x[:, 0], attn.init_cache(batch_size=3))  # [B, E] in, [B, E] out
    torch.testing.assert_close(out_2d, full[:, 0], atol=2e-5, rtol=2e-5)


def test_cross_attention_is_taylor_attention():
    torch.manual_seed(4)
    hyb = HybridAttention(24, 2, window=4, feature_dim=6, context_dim=10)
    tay = TaylorAttention(24, 2, feature_dim=6, context_dim=10)
    tay.load_state_dict(hyb.state_dict())
    x, ctx = torch.randn(2, 7, 24), torch.randn(2, 9, 10)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    torch.testing.assert_close(hyb(x, ctx, key_padding_mask=mask), tay(x, ctx, key_padding_mask=mask))
    cache = hyb.init_cache(context=ctx, key_padding_mask=mask)
    out, _ = hyb.step(x[:, 3:4], cache)
    torch.testing.assert_close(out, tay(x, ctx, key_padding_mask=mask)[:, 3:4], atol=2e-5, rtol=2e-5)


def test_module_trains():
    """A gradient reaches every parameter, the temperature and the convolution included."""
    torch.manual_seed(5)
    attn = HybridAttention(16, 2, window=4, conv_size=4, learn_scale=True, learn_far_weight=True)
    attn(torch.randn(2, 13, 16), causal=True).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(6)
    attn = HybridAttention(16, 2, window=4, conv_size=3, learn_scale=True, learn_far_weight=True, backend="cpu")
    x = torch.randn(2, 21, 16)
    compiled = torch.compile(attn, fullgraph=True)
    eager = attn(x, causal=True)
    out = compiled(x, causal=True)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert attn.query.weight.grad is not None and attn.log_temperature.grad is not None
