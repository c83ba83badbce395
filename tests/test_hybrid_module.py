"""nn.HybridAttention against the module written out in float64 (projections, short convolution, temperature, far
weight, dense hybrid weights): forward, prefill, in-place decoding steps (also of left-padded batches), the
cross-attention path, training, torch.compile."""
import pytest
import torch

import linattn_cuda as la
from linattn_cuda import hybrid_attention_reference
from linattn_cuda.nn import HybridAttention, HybridAttentionCache, TaylorAttention

from .helpers import seed_for

BACKENDS = [b for b in ("cpu", "reference") if b in la.hybrid_backends("cpu")]


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
    pytest.param(dict(embed_dim=16, num_heads=2, window=1, learn_far_weight=True), id="E16-H2-W1"),
]


def _randomize_temperature(attn):
    with torch.no_grad():
        for p in (attn.log_temperature, attn.log_far_weight):
            if p is not None:
                p.normal_(0, 0.5)


def _module(kw, backend, seed):
    torch.manual_seed(seed)
    attn = HybridAttention(**kw, backend=backend)
    _randomize_temperature(attn)
    return attn


@pytest.mark.parametrize("kw", MODULES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_float64_reference(kw, causal, backend):
    attn = _module(kw, backend, seed_for("module", kw["window"], causal))
    x = torch.randn(2, 19, kw["embed_dim"])
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[1, 13:] = True  # right padding
    out = attn(x, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), reference_module(attn, x, causal=causal, key_padding_mask=mask),
                               atol=3e-6, rtol=3e-6)


@pytest.mark.parametrize("kw", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_cache_matches_full_sequence(kw, backend):
    """Token by token through the fixed-size cache (updated in place) == the full causal forward."""
    attn = _module(kw, backend, seed_for("cache", kw["window"]))
    x = torch.randn(3, 3 * kw["window"] + 2, kw["embed_dim"])
    full = attn(x, causal=True)
    with torch.no_grad():
        cache = attn.init_cache(batch_size=3)
        tensors = [*cache.attn[:3], *cache.attn.state, cache.attn.position]
        sizes = [t.numel() for t in tensors]
        outs = []
        for t in range(x.shape[1]):
            out_t, cache2 = attn.step(x[:, t : t + 1], cache)
            assert cache2 is cache
            outs.append(out_t)
    assert [t.numel() for t in tensors] == sizes
    assert isinstance(cache, HybridAttentionCache) and cache.attn.position.tolist() == [x.shape[1]] * 3
    assert cache.attn.keys.shape[1] == attn.num_kv_heads and cache.attn.state.kv.shape[1] == attn.num_kv_heads
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=3e-6, rtol=3e-6)
    with torch.no_grad():
        out_2d, _ = attn.step(x[:, 0], attn.init_cache(batch_size=3))  # [B, E] in, [B, E] out
    torch.testing.assert_close(out_2d, full[:, 0], atol=3e-6, rtol=3e-6)


@pytest.mark.parametrize("kw", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_of_a_left_padded_batch_then_steps(kw, backend):
    """A left-padded batch of prompts prefilled in one call, then decoded (a row may feed a padding token too):
    equal to the full forward over the padded sequences."""
    attn = _module(kw, backend, seed_for("prefill", kw["window"]))
    x = torch.randn(3, 25, kw["embed_dim"])
    mask = torch.zeros(3, 25, dtype=torch.bool)
    mask[1, :4] = True
    mask[2, :11] = True
    mask[0, 20] = True  # a padding token while decoding
    full = attn(x, causal=True, key_padding_mask=mask)
    with torch.no_grad():
        out, cache = attn.prefill(x[:, :13], key_padding_mask=mask[:, :13])
        outs = [out]
        for t in range(13, 25):
            outs.append(attn.step(x[:, t : t + 1], cache, key_padding_mask=mask[:, t])[0])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(full.double(), reference_module(attn, x, causal=True, key_padding_mask=mask),
                               atol=3e-6, rtol=3e-6)


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
    """A gradient reaches every parameter, the temperature, the far weight and the convolution included."""
    torch.manual_seed(5)
    attn = HybridAttention(16, 2, window=4, conv_size=4, learn_scale=True, learn_far_weight=True)
    attn(torch.randn(2, 13, 16), causal=True).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_argument_errors():
    with pytest.raises(ValueError, match="window"):
        HybridAttention(16, 2, window=-1)
    with pytest.raises(ValueError, match="conv_size"):
        HybridAttention(16, 2, conv_size=-2)
    with pytest.raises(ValueError, match="cross-attention"):
        HybridAttention(16, 2, conv_size=3)(torch.randn(1, 4, 16), torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="HybridAttention backend"):
        HybridAttention(16, 2, backend="cuda")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
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
    assert attn.log_far_weight.grad is not None
