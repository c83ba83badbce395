"""hybrid_prefill / hybrid_step (linattn_cuda.integrations.transformers.hybrid_decoding): prefill, chunks and steps of
causal hybrid attention against linattn_cuda.hybrid_attention on the whole sequence and a float64 dense definition.
Needs no transformers."""
import pytest
import torch

import linattn_cuda as la
from linattn_cuda.integrations.transformers import HybridState, hybrid_prefill, hybrid_step
from linattn_cuda.integrations.transformers.hybrid_decoding import hybrid_attention_with_prefix


def dense_hybrid(q, k, v, window, key_padding_mask=None, scale=None):
    """Causal hybrid attention written out in float64: exp(s) for 0 <= i - j < W, 1 + s + s^2/2 before."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    w = torch.where(i - j < window, torch.exp(s), 1 + s + s * s / 2) * (j <= i)
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    den = w.sum(-1, keepdim=True)
    return torch.where(den > 0, (w @ v) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros(()))


# (B, H, Hkv, L, D, Dv, W)
CASES = [
    (2, 4, 2, 37, 8, 5, 6),
    (1, 2, 2, 20, 4, 3, 1),
    (2, 2, 1, 13, 6, 7, 16),
    (1, 3, 3, 70, 5, 4, 7),
]
IDS = [f"B{b}-H{h}-Hkv{hk}-L{n}-D{d}-Dv{dv}-W{w}" for b, h, hk, n, d, dv, w in CASES]


def inputs(case, seed=0, dtype=torch.float32):
    b, h, hk, n, d, dv, w = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, heads, n, dim, generator=gen).to(dtype) for heads, dim in ((h, d), (hk, d), (hk, dv)))
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[-1, : min(5, n - 1)] = True  # left padding of the last row
    return q, k, v, mask, w


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefill_equals_hybrid_attention_and_float64(case):
    q, k, v, mask, w = inputs(case)
    gqa = k.shape[1] != q.shape[1]
    want = dense_hybrid(q, k, v, w, mask)
    lib = la.hybrid_attention(q, k, v, window=w, key_padding_mask=mask, enable_gqa=gqa)
    out, state = hybrid_prefill(q, k, v, window=w, key_padding_mask=mask, enable_gqa=gqa)
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out, lib, rtol=2e-6, atol=2e-6)
    assert isinstance(state, HybridState) and state.keys.shape[2] == w - 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chunks_then_steps_equal_the_whole_sequence(case):
    """Prefill a third, continue with a chunk, then one token at a time (the state updated in place): every output
    equals hybrid attention over the whole sequence, padding included."""
    q, k, v, mask, w = inputs(case, seed=1)
    gqa = k.shape[1] != q.shape[1]
    n = q.shape[2]
    p = n // 3
    want = la.hybrid_attention(q, k, v, window=w, key_padding_mask=mask, enable_gqa=gqa)
    o1, state = hybrid_prefill(q[:, :, :p], k[:, :, :p], v[:, :, :p], window=w, key_padding_mask=mask[:, :p],
                               enable_gqa=gqa)
    o2, state = hybrid_prefill(q[:, :, p : 2 * p], k[:, :, p : 2 * p], v[:, :, p : 2 * p], window=w,
                               key_padding_mask=mask[:, p : 2 * p], state=state, enable_gqa=gqa)
    nbytes = state.nbytes
    outs = [o1, o2]
    for t in range(2 * p, n):
        outs.append(hybrid_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, valid=~mask[:, t]))
        assert state.nbytes == nbytes  # fixed size
    torch.testing.assert_close(torch.cat(outs, 2), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_queries_after_a_prefix_of_cached_keys(case):
    """Lq < Lk end-aligned (the key/value-cache path of the HF attention): the last queries of the sequence."""
    q, k, v, mask, w = inputs(case, seed=2)
    p = q.shape[2] // 2
    want = dense_hybrid(q, k, v, w, mask)[:, :, p:]
    out = hybrid_attention_with_prefix(q[:, :, p:], k, v, window=w, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)


def test_step_of_a_padded_token_keeps_it_out_of_the_state():
    """A new token marked padding attends to the cache (its own key excluded) and is never seen afterwards."""
    q, k, v, _, w = inputs(CASES[0], seed=3)
    n = q.shape[2]
    mask = torch.zeros(q.shape[0], n, dtype=torch.bool)
    mask[0, n - 4] = True  # row 0: the token 4 before the end is padding
    want = dense_hybrid(q, k, v, w, mask)
    _, state = hybrid_prefill(q[:, :, : n - 6], k[:, :, : n - 6], v[:, :, : n - 6], window=w, enable_gqa=True)
    outs = [hybrid_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, valid=~mask[:, t])
            for t in range(n - 6, n)]
    torch.testing.assert_close(torch.cat(outs, 2).double(), want[:, :, n - 6 :], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)], ids=["float64", "bfloat16"])
def test_dtypes(dtype, tol):
    q, k, v, mask, w = inputs(CASES[0], seed=4, dtype=dtype)
    n = q.shape[2]
    out, state = hybrid_prefill(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], window=w, key_padding_mask=mask[:, :-1],
                                enable_gqa=True)
    last = hybrid_step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
    assert out.dtype == last.dtype == dtype
    assert state.taylor.kv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = dense_hybrid(q, k, v, w, mask)
    torch.testing.assert_close(torch.cat([out, last], 2).double(), want, rtol=tol, atol=tol)
    assert n == want.shape[2]


def test_window_longer_than_the_prompt():
    q, k, v, mask, _ = inputs((1, 2, 2, 9, 4, 4, 1), seed=5)
    out, state = hybrid_prefill(q, k, v, window=32, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), dense_hybrid(q, k, v, 32, mask), rtol=2e-6, atol=2e-6)
    assert state.valid.sum() == (~mask).sum()
    assert (state.taylor.k_sum[..., 0] == 1).all() and state.taylor.k_sum[..., 1:].abs().max() == 0  # only the sink


def test_bad_arguments_are_refused():
    q, k, v, mask, w = inputs(CASES[0])
    with pytest.raises(ValueError, match="window must be a positive int"):
        hybrid_prefill(q, k, v, window=0, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        hybrid_prefill(q, k, v, window=w)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        hybrid_prefill(q, k, v, window=w, key_padding_mask=mask[:, :-1], enable_gqa=True)
    _, state = hybrid_prefill(q, k, v, window=w, enable_gqa=True)
    with pytest.raises(ValueError, match="state was built with window"):
        hybrid_prefill(q, k, v, window=w + 1, state=state, enable_gqa=True)
    with pytest.raises(ValueError, match="one token"):
        hybrid_step(q[:, :, :2], k[:, :, :2], v[:, :, :2], state)
