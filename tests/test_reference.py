"""The reference forms agree with each other in float64 (they are the ground truth of every other test)."""
import pytest
import torch

from linattn_cuda.ops.taylor import naive as ref
from linattn_cuda.feature_map import feature_dim

from .helpers import make_inputs, seed_for


@pytest.mark.parametrize("mask", [None, "full-row"], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "full"])
def test_linear_form_equals_quadratic_form(causal, mask, symmetric):
    q, k, v, m = make_inputs(2, 3, 37, 37, 5, 7, dtype=torch.float64, seed=seed_for(causal, mask), mask=mask)
    a = ref.taylor_attention_quadratic(q, k, v, causal=causal, key_padding_mask=m)
    b = ref.taylor_attention_linear(q, k, v, causal=causal, key_padding_mask=m, symmetric=symmetric)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_and_recurrent_equal_quadratic(chunk):
    q, k, v, m = make_inputs(2, 2, 45, 45, 4, 6, dtype=torch.float64, seed=seed_for(chunk), mask="full-row")
    a = ref.taylor_attention_quadratic(q, k, v, causal=True, key_padding_mask=m)
    b, state_b = ref.taylor_attention_chunked(q, k, v, key_padding_mask=m, chunk_size=chunk)
    c, state_c = ref.taylor_attention_recurrent(q, k, v, key_padding_mask=m)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state_b.kv, state_c.kv)
    assert state_b.kv.shape == (2, 2, feature_dim(4), 6)


def test_fully_masked_query_returns_zero_not_nan():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 3, 2, dtype=torch.float64, seed=3)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = ref.taylor_attention_quadratic(q, k, v, key_padding_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))


def test_normalizer_lower_bound():
    """w = ((1+s)^2 + 1)/2 >= 1/2, so a causal row i has normalizer >= (i+1)/2, whatever the logits."""
    q, k, v, _ = make_inputs(1, 1, 50, 50, 8, 1, dtype=torch.float64, seed=11)
    s = 5.0 * q @ k.transpose(-1, -2)
    w = (1 + s + s * s / 2).tril()
    assert (w.sum(-1)[0, 0] >= (torch.arange(50, dtype=torch.float64) + 1) / 2).all()


def test_initial_state_continues_a_prefix():
    q, k, v, _ = make_inputs(2, 2, 30, 30, 4, 5, dtype=torch.float64, seed=5)
    full, _ = ref.taylor_attention_chunked(q, k, v, chunk_size=7)
    _, state = ref.taylor_attention_chunked(q[:, :, :11], k[:, :, :11], v[:, :, :11], chunk_size=4)
    rest, _ = ref.taylor_attention_chunked(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], initial_state=state, chunk_size=5)
    torch.testing.assert_close(rest, full[:, :, 11:])
