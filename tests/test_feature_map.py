import math

import pytest
import torch

from linattn_cuda import feature_dim, taylor_feature_map


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "full"])
@pytest.mark.parametrize("d", [1, 2, 16, 24, 64])
def test_feature_map_reproduces_the_taylor_kernel(d, symmetric):
    gen = torch.Generator().manual_seed(d * 7 + symmetric)
    q = torch.randn(5, 3, d, generator=gen, dtype=torch.float64)
    k = torch.randn(5, 4, d, generator=gen, dtype=torch.float64)
    scale = 0.37
    s = scale * q @ k.transpose(-1, -2)
    w = taylor_feature_map(q, scale, symmetric) @ taylor_feature_map(k, scale, symmetric).transpose(-1, -2)
    torch.testing.assert_close(w, 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)


def test_feature_map_default_scale_is_inverse_sqrt_d():
    x = torch.randn(7, 16, dtype=torch.float64)
    y = torch.randn(9, 16, dtype=torch.float64)
    s = x @ y.T / 4.0
    w = taylor_feature_map(x) @ taylor_feature_map(y).T
    torch.testing.assert_close(w, 1 + s + s * s / 2)


@pytest.mark.parametrize("d,sym,full", [(1, 3, 3), (16, 153, 273), (64, 2145, 4161)])
def test_feature_dim(d, sym, full):
    assert feature_dim(d) == sym == 1 + d + d * (d + 1) // 2
    assert feature_dim(d, symmetric=False) == full == 1 + d + d * d
    assert taylor_feature_map(torch.randn(2, d)).shape[-1] == sym
    assert taylor_feature_map(torch.randn(2, d), symmetric=False).shape[-1] == full


def test_feature_dim_higher_orders():
    # K terms: symmetric C(D + K - 1, K - 1), full sum_{n<K} D^n
    assert feature_dim(16, terms=4) == math.comb(19, 3)
    assert feature_dim(16, symmetric=False, terms=4) == 1 + 16 + 256 + 4096
    assert feature_dim(5, terms=1) == 1


def test_the_seed_reports_elementwise_map_is_wrong():
    """[1, x, x^2/sqrt2] (M = 2D+1) does not give 1 + s + s^2/2: the cross terms are missing."""
    q, k = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    wrong = lambda x: torch.cat([torch.ones(4, 1, dtype=x.dtype), x, x * x / 2**0.5], -1)  # noqa: E731
    s = q @ k.T
    assert not torch.allclose(wrong(q) @ wrong(k).T, 1 + s + s * s / 2)


def test_feature_map_rejects_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        taylor_feature_map(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale"):
        taylor_feature_map(torch.randn(3, 4), scale=-1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        taylor_feature_map([1.0, 2.0])
