"""The nn entry point: TaylorAttention / HybridAttention with ``context_parallel`` on 2 gloo processes equal the
same module on the whole sequence in one process (outputs, input gradients, and parameter gradients summed over
ranks), to 1e-12 relative in float64: GQA, padding, causal and not, the hybrid's short convolution (its history
crosses the shard boundary), learned temperature and far weight."""
from __future__ import annotations

import pytest
import torch

from linattn_cuda.distributed import enable_context_parallel
from linattn_cuda.distributed.launch import run_ranks
from linattn_cuda.nn import HybridAttention, TaylorAttention

LENGTHS = [2, 9]  # rank 0 shorter than the hybrid's window and than the convolution's history
MODULES = {
    "taylor-gqa-causal": (TaylorAttention, dict(embed_dim=12, num_heads=4, num_kv_heads=2, feature_dim=3), True),
    "taylor-noncausal": (TaylorAttention, dict(embed_dim=12, num_heads=3, feature_dim=4), False),
    "hybrid-conv-causal": (HybridAttention, dict(embed_dim=12, num_heads=2, window=4, feature_dim=3, conv_size=4,
                                                 learn_scale=True, learn_far_weight=True), True),
    "hybrid-gqa-noncausal": (HybridAttention, dict(embed_dim=12, num_heads=4, num_kv_heads=2, window=3,
                                                   feature_dim=3, learn_far_weight=True), False),
}


def _build(name, seed=0):
    cls, kw, causal = MODULES[name]
    torch.manual_seed(seed)
    module = cls(**kw, dtype=torch.float64)
    with torch.no_grad():  # non-trivial learned temperature / far weight
        for p in module.parameters():
            if p.dim() == 1 and p.shape[0] == kw["num_heads"]:
                p.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    total = sum(LENGTHS)
    x = torch.randn(2, total, kw["embed_dim"], generator=g, dtype=torch.float64)
    mask = torch.rand(2, total, generator=g) < 0.25
    grad_out = torch.randn(2, total, kw["embed_dim"], generator=g, dtype=torch.float64)
    return module, causal, x, mask, grad_out


def _on_rank(rank, world_size):
    results = {}
    start = sum(LENGTHS[:rank])
    end = start + LENGTHS[rank]
    for name in MODULES:
        module, causal, x, mask, grad_out = _build(name)
        assert enable_context_parallel(module) == 1
        xs = x[:, start:end].clone().requires_grad_()
        out = module(xs, causal=causal, key_padding_mask=mask[:, start:end])
        (out * grad_out[:, start:end]).sum().backward()
        results[name] = {"out": out.detach(), "dx": xs.grad,
                         "params": {n: p.grad for n, p in module.named_parameters()}}
    return results


@pytest.fixture(scope="module")
def sharded():
    return run_ranks(_on_rank, 2)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(MODULES))
def test_sharded_module_equals_the_whole_sequence(sharded, name):
    module, causal, x, mask, grad_out = _build(name)
    x = x.clone().requires_grad_()
    out = module(x, causal=causal, key_padding_mask=mask)
    (out * grad_out).sum().backward()
    got_out = torch.cat([r[name]["out"] for r in sharded], dim=1)
    got_dx = torch.cat([r[name]["dx"] for r in sharded], dim=1)
    assert _rel(got_out, out.detach()) < 1e-12
    assert _rel(got_dx, x.grad) < 1e-12
    for n, p in module.named_parameters():
        got = sum(r[name]["params"][n] for r in sharded)
        assert _rel(got, p.grad) < 1e-12, n


def test_context_parallel_argument_is_checked():
    with pytest.raises(TypeError, match="context_parallel must be None, True"):
        TaylorAttention(8, 2, context_parallel="world")
    assert TaylorAttention(8, 2, context_parallel=True).context_parallel is True
    assert HybridAttention(8, 2, window=4, context_parallel=True).context_parallel is True
    assert TaylorAttention(8, 2).context_parallel is None


def test_cross_attention_is_refused():
    m = TaylorAttention(8, 2, context_parallel=True)
    with pytest.raises(ValueError, match="cross-attention"):
        m(torch.randn(1, 3, 8), torch.randn(1, 5, 8))
