"""linattn_cuda.nn.TaylorAttention: float64 reference, masks, feature_dim, decoding caches."""
import math

import pytest
import torch

from linattn_cuda.nn import TaylorAttention, TaylorAttentionCache


def reference_mha(attn: TaylorAttention, x, context=None, *, causal=False, key_padding_mask=None):
    """Multi-head Taylor attention written out in float64: w = 1 + s + s^2/2, s = scale * q.k."""
    p = {k: v.double() for k, v in attn.state_dict().items()}
    x = x.double()
    src = x if context is None else context.double()
    b, lq, _ = x.shape
    lk = src.shape[1]
    h = attn.num_heads
    q = (x @ p["query.weight"].T + p.get("query.bias", 0)).view(b, lq, h, -1).transpose(1, 2)
    k = (src @ p["key.weight"].T).view(b, lk, h, -1).transpose(1, 2)
    v = (src @ p["value.weight"].T + p.get("value.bias", 0)).view(b, lk, h, -1).transpose(1, 2)
    s = attn.scale * q @ k.transpose(-1, -2)
    w = 1 + s + s * s / 2
    if causal:
        w = w * torch.ones(lq, lk, dtype=torch.float64).tril()
    if key_padding_mask is not None:
        w = w * (~key_padding_mask)[:, None, None, :].double()
    den = w.sum(-1, keepdim=True)
    out = torch.where(den > 0, (w @ v) / den.clamp_min(1e-300), torch.zeros(()))
    out = out.transpose(1, 2).reshape(b, lq, -1)
    return out @ p["out.weight"].T + p.get("out.bias", 0)


CASES = [
    pytest.param(dict(embed_dim=32, num_heads=2), id="E32-H2-headdim"),
    pytest.param(dict(embed_dim=48, num_heads=3, feature_dim=8), id="E48-H3-F8"),
    pytest.param(dict(embed_dim=20, num_heads=4, feature_dim=16, bias=False), id="E20-H4-F16-nobias"),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention_matches_float64_reference(kw, causal):
    torch.manual_seed(0)
    attn = TaylorAttention(**kw)
    x = torch.randn(2, 13, kw["embed_dim"])
    out = attn(x, causal=causal)
    torch.testing.assert_close(out.double(), reference_mha(attn, x, causal=causal), atol=2e-5, rtol=2e-5)


def test_cross_attention_with_padding_mask_matches_reference():
    torch.manual_seed(1)
    attn = TaylorAttention(24, 2, context_dim=10, feature_dim=6)
    x, ctx = torch.randn(3, 7, 24), torch.randn(3, 11, 10)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 8:] = True
    mask[2, :] = True  # a sample with no key: output is the output bias (attention part 0), never NaN
    out = attn(x, ctx, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference_mha(attn, x, ctx, key_padding_mask=mask), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[2], attn.out.bias.expand(7, -1))


def test_float64_module_is_exact():
    torch.manual_seed(2)
    attn = TaylorAttention(16, 2).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x, causal=True), reference_mha(attn, x, causal=True), atol=1e-12, rtol=1e-12)


def test_default_scale_is_softmax_logit_scale():
    """scale = 1/sqrt(d_qk): the logit of a softmax MHA scaling q and k by d_qk^(-1/4) each."""
    assert TaylorAttention(200, 2).scale == pytest.approx(100 ** -0.5)
    assert TaylorAttention(200, 2, feature_dim=16).scale == pytest.approx(16 ** -0.5)
    assert TaylorAttention(200, 2, scale=0.3).scale == pytest.approx(0.3)
    assert TaylorAttention(200, 2, feature_dim=16).query.out_features == 32
    assert TaylorAttention(200, 2).key.bias is None


@pytest.mark.parametrize("feature_dim", [None, 4], ids=["headdim", "F4"])
def test_self_attention_cache_matches_full_causal(feature_dim):
    torch.manual_seed(3)
    attn = TaylorAttention(16, 2, feature_dim=feature_dim).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    full = attn(x, causal=True)
    cache = attn.init_cache(batch_size=2)
    assert isinstance(cache, TaylorAttentionCache) and not cache.frozen
    outs = []
    for t in range(10):
        out, cache = attn.step(x[:, t : t + 1], cache)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-12)
    out2d, _ = attn.step(x[:, 0], attn.init_cache(batch_size=2))  # [B, E] input works too
    torch.testing.assert_close(out2d, full[:, 0])


def test_cross_attention_cache_matches_full():
    torch.manual_seed(4)
    attn = TaylorAttention(16, 2, feature_dim=4).double()
    x, ctx = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 30, 16, dtype=torch.float64)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:] = True
    full = attn(x, ctx, key_padding_mask=mask)
    cache = attn.init_cache(context=ctx, key_padding_mask=mask)
    assert cache.frozen
    for t in range(5):
        out, new = attn.step(x[:, t : t + 1], cache)
        assert new is cache  # cross-attention state is read, never updated
        torch.testing.assert_close(out, full[:, t : t + 1], atol=1e-12, rtol=1e-12)


def test_padded_context_positions_may_hold_nan():
    """Padded context positions (e.g. NaN from an upstream pad) change neither the full forward nor the cache."""
    torch.manual_seed(5)
    attn = TaylorAttention(16, 2, feature_dim=4).double()
    x, ctx = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 30, 16, dtype=torch.float64)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:] = True
    bad = ctx.masked_fill(mask[:, :, None], float("nan"))
    want = attn(x, ctx, key_padding_mask=mask)
    torch.testing.assert_close(attn(x, bad, key_padding_mask=mask), want, atol=1e-12, rtol=1e-12)
    cache = attn.init_cache(context=bad, key_padding_mask=mask)
    out, _ = attn.step(x[:, :1], cache)
    torch.testing.assert_close(out, want[:, :1], atol=1e-12, rtol=1e-12)


def test_state_size_is_independent_of_length():
    attn = TaylorAttention(32, 2, feature_dim=16)
    cache = attn.init_cache(batch_size=1)
    m = 1 + 16 + 16 * 17 // 2
    for _ in range(5):
        _, cache = attn.step(torch.randn(1, 1, 32), cache)
    assert cache.state.kv.shape == (1, 2, m, 16) and cache.state.k_sum.shape == (1, 2, m)


def test_gradients_flow_to_every_parameter():
    torch.manual_seed(5)
    attn = TaylorAttention(16, 2, feature_dim=8)
    x = torch.randn(2, 6, 16, requires_grad=True)
    attn(x, causal=True).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        TaylorAttention(10, 3)
    with pytest.raises(ValueError, match="init_cache"):
        TaylorAttention(8, 2).init_cache()
    with pytest.raises(ValueError, match=r"\[B, 1, E\]"):
        attn = TaylorAttention(8, 2)
        attn.step(torch.randn(1, 2, 8), attn.init_cache(batch_size=1))
