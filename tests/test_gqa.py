"""Grouped-query attention (enable_gqa, SDPA's convention) and end-aligned causal attention (Lq < Lk) against
float64 references built independently of the naive module's own head repetition and masks: the parts the case
matrix (tests/test_taylor.py) does not cover -- column splits, prefill + steps, modules, compile, argument errors."""
import pytest
import torch

import linattn_cuda as la
from linattn_cuda._extension import has_kernel

from .helpers import bwd_args, fwd_args, max_rel_err, seed_for

BACKENDS = ["reference"] + (["cpu"] if has_kernel("CPU") else [])
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(params=["auto", "quadratic", "linear"])
def form(request, monkeypatch):
    """The cpu kernels' own choice of form, and each form forced (linear: chunks of 16, many even at small L)."""
    if request.param != "auto":
        monkeypatch.setenv("LINATTN_CPU_FORM", request.param)
    if request.param == "linear":
        monkeypatch.setenv("LINATTN_CPU_CHUNK", "16")
    return request.param


def gqa_inputs(b, h, hk, lq, lk, d, dv, *, dtype=torch.float64, seed=0, mask=False, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hk, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hk, lk, dv, generator=gen, dtype=torch.float64)
    m = None
    if mask:
        m = torch.rand(b, lk, generator=gen) < 0.3
        m[0, :2] = True  # the first queries of batch 0 see only padding (causal, Lq == Lk)
    q, k, v = (t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))
    return q, k, v, m


def expected(q, k, v, *, causal, key_padding_mask=None, scale=None):
    """float64 Taylor attention on heads repeated with repeat_interleave, end-aligned causal mask by index."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    w = 1 + s + s * s / 2
    lq, lk = q.shape[2], k.shape[2]
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    hidden = torch.zeros(lq, lk, dtype=torch.bool)
    if causal:
        hidden = j > i + (lk - lq)
    hidden = hidden[None, None]
    if key_padding_mask is not None:
        hidden = hidden | key_padding_mask[:, None, None, :]
    w = w.masked_fill(hidden, 0.0)
    den = w.sum(-1, keepdim=True)
    return torch.where(den > 0, (w @ v) / torch.where(den > 0, den, 1.0), 0.0)


def _compare(backend, shape, causal, mask, dtype, grads=True):
    b, h, hk, lq, lk, d, dv = shape
    q, k, v, m = gqa_inputs(b, h, hk, lq, lk, d, dv, dtype=dtype, seed=seed_for(shape, causal, mask, dtype),
                            mask=mask, requires_grad=grads)
    out = la.taylor_attention(q, k, v, causal=causal, key_padding_mask=m, enable_gqa=True, backend=backend)
    assert out.shape == (b, h, lq, dv) and out.dtype == dtype
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    want = expected(q64, k64, v64, causal=causal, key_padding_mask=m)
    assert max_rel_err(out, want) < TOL[dtype]
    if grads:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
        ref = torch.autograd.grad(want, (q64, k64, v64), g)  # dk, dv: summed over each group by autograd
        for name, a, w in zip("qkv", got, ref):
            assert a.shape == w.shape and a.dtype == dtype
            assert max_rel_err(a, w) < 10 * TOL[dtype], f"grad {name}"


@pytest.mark.skipif(not has_kernel("CPU"), reason="linattn_cuda._C is not built")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gqa_value_columns_split_across_threads(causal, form):
    """One key/value head and 4 threads: the backward's task (all query heads of the group, one column block)
    splits the value columns, and the blocks' shares of dq and dk add up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _compare("cpu", (1, 3, 1, 150, 200, 8, 70), causal, True, torch.float64)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not has_kernel("CPU"), reason="linattn_cuda._C is not built")
def test_gqa_end_aligned_gradcheck(monkeypatch):
    for form_name in ("quadratic", "linear"):
        monkeypatch.setenv("LINATTN_CPU_FORM", form_name)
        monkeypatch.setenv("LINATTN_CPU_CHUNK", "3")
        q, k, v, m = gqa_inputs(1, 4, 2, 5, 9, 3, 2, seed=5, mask=True, requires_grad=True)
        for causal in (False, True):
            def fn(q, k, v):
                return la.taylor_attention(q, k, v, causal=causal, key_padding_mask=m, enable_gqa=True, backend="cpu")

            assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_aligned_causal_is_the_tail_of_full_causal(backend):
    """A chunk of new queries against the cached keys plus its own = the last rows of the full causal attention."""
    q, k, v, _ = gqa_inputs(2, 4, 2, 90, 90, 8, 10, seed=11)
    full = la.taylor_attention(q, k, v, causal=True, enable_gqa=True, backend=backend)
    for lq in (1, 7, 64, 89):
        tail = la.taylor_attention(q[:, :, -lq:], k, v, causal=True, enable_gqa=True, backend=backend)
        assert max_rel_err(tail, full[:, :, -lq:]) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gqa_prefill_then_steps(backend, dtype):
    """The state has the key/value heads (H / Hkv times smaller); prefill + steps == causal attention; a second
    prefill from the first one's state (chunked prefill) == one prefill."""
    b, h, hk, length, n, d, dv = 2, 6, 2, 41, 5, 8, 12
    q, k, v, _ = gqa_inputs(b, h, hk, length + n, length + n, d, dv, dtype=dtype, seed=seed_for("gqa-decode", dtype))
    full = expected(q, k, v, causal=True)
    out, state = la.taylor_attention_prefill(q[:, :, :length], k[:, :, :length], v[:, :, :length], enable_gqa=True,
                                             backend=backend)
    assert state.kv.shape == (b, hk, la.feature_dim(d), dv) and state.k_sum.shape == (b, hk, la.feature_dim(d))
    outs = [out]
    for t in range(length, length + n):
        o, state = la.taylor_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, enable_gqa=True, backend=backend)
        assert o.shape == (b, h, dv)
        outs.append(o.unsqueeze(2))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert max_rel_err(torch.cat(outs, 2), full) < tol
    first, mid = la.taylor_attention_prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20], enable_gqa=True, backend=backend)
    second, end = la.taylor_attention_prefill(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], initial_state=mid,
                                              enable_gqa=True, backend=backend)
    assert max_rel_err(torch.cat([first, second], 2), full) < tol
    _, one = la.taylor_attention_prefill(q, k, v, enable_gqa=True, backend="reference")
    assert max_rel_err(end.kv, one.kv) < tol and max_rel_err(end.k_sum, one.k_sum) < tol
    assert max_rel_err(state.kv, one.kv) < tol


@pytest.mark.skipif(not has_kernel("CPU"), reason="linattn_cuda._C is not built")
def test_gqa_prefill_queries_shorter_than_keys_cpu():
    """Causal prefill with Lq < Lk: the first keys are a prefix seen by every query, and enter the state."""
    q, k, v, m = gqa_inputs(2, 4, 2, 30, 75, 8, 12, seed=21, mask=True)
    with torch.no_grad():
        out, st = la.taylor_attention_prefill(q, k, v, key_padding_mask=m, enable_gqa=True, backend="cpu")
        ref_out, ref_st = la.taylor_attention_prefill(q, k, v, key_padding_mask=m, enable_gqa=True, backend="reference")
    assert max_rel_err(out, expected(q, k, v, causal=True, key_padding_mask=m)) < 1e-10
    assert max_rel_err(out, ref_out) < 1e-10
    assert max_rel_err(st.kv, ref_st.kv) < 1e-10 and max_rel_err(st.k_sum, ref_st.k_sum) < 1e-10


def test_head_mismatch_without_enable_gqa_is_an_error():
    q, k, v, _ = gqa_inputs(2, 4, 2, 5, 5, 4, 3)
    with pytest.raises(ValueError, match=r"k must have the batch and head sizes of q \(2, 4\).*enable_gqa=True"):
        la.taylor_attention(q, k, v)
    with pytest.raises(ValueError, match=r"multiple of the key/value heads of k \(3\)"):
        la.taylor_attention(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1), enable_gqa=True)
    with pytest.raises(ValueError, match=r"v must have the batch and head sizes of k \(2, 2\)"):
        la.taylor_attention(q, k, v[:, :1], enable_gqa=True)
    state = la.empty_state(2, 4, 4, 3)  # query heads: wrong for a GQA state
    with pytest.raises(ValueError, match=r"state.kv must have shape \[2, 2, 15, 3\]"):
        la.taylor_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, enable_gqa=True)
    with pytest.raises(ValueError, match=r"state.kv must have shape \[2, 2, 15, 3\]"):
        la.taylor_attention_prefill(q, k, v, initial_state=state, enable_gqa=True)
    with pytest.raises(ValueError, match=r"k must have the batch and head sizes of q \(2, 4\).*enable_gqa=True"):
        la.taylor_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], la.empty_state(2, 2, 4, 3))


@pytest.mark.skipif(not has_kernel("CPU"), reason="linattn_cuda._C is not built")
def test_gqa_direct_op_calls():
    """opcheck (schema, fake kernels, autograd) on GQA and Lq < Lk shapes; the C++ checks name the problem."""
    q, k, v, m = gqa_inputs(2, 4, 2, 11, 19, 4, 6, seed=12, mask=True, requires_grad=True)
    ops = torch.ops.linattn_cuda
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    for causal in (False, True):
        torch.library.opcheck(ops.taylor_fwd, fwd_args(q, k, v, m, causal))
        out, den, _, _ = ops.taylor_fwd(*fwd_args(q, k, v, m, causal))
        g = torch.randn_like(out)
        torch.library.opcheck(ops.taylor_bwd, bwd_args(g, qd, kd, vd, out.detach(), den, m, causal))
    _, _, kv, ks = ops.taylor_fwd(*fwd_args(qd, kd, vd, m, True, return_state=True))
    assert kv.shape[1] == 2
    torch.library.opcheck(ops.taylor_fwd, fwd_args(qd, kd, vd, None, True, kv0=kv, k_sum0=ks, return_state=True))
    torch.library.opcheck(ops.taylor_step, (qd[:, :, 0], kd[:, :, 0], vd[:, :, 0], kv, ks, 0.5))
    with pytest.raises(RuntimeError, match=r"query heads of q \(4\) must be a multiple of the key/value heads of k \(3\)"):
        ops.taylor_fwd(*fwd_args(qd, kd[:, :1].expand(-1, 3, -1, -1), vd[:, :1].expand(-1, 3, -1, -1)))
    with pytest.raises(RuntimeError, match=r"causal attention needs Lq <= Lk"):
        ops.taylor_fwd(*fwd_args(qd, kd[:, :, :5], vd[:, :, :5], None, True))
    with pytest.raises(RuntimeError, match=r"kv0 must have shape \[N, Hkv, M, Dv\] = \[2, 2, 15, 6\]"):
        ops.taylor_step(qd[:, :, 0], kd[:, :, 0], vd[:, :, 0], kv.repeat(1, 2, 1, 1), ks, 0.5)


class _GqaBlock(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.q = torch.nn.Linear(8, 16)
        self.kv = torch.nn.Linear(8, 16)
        self.backend = backend

    def forward(self, x, cache):
        b, length, _ = x.shape
        q = self.q(x).view(b, length, 4, 4).transpose(1, 2)
        k, v = self.kv(torch.cat([cache, x], 1)).view(b, -1, 2, 8).transpose(1, 2).chunk(2, dim=-1)
        out = la.taylor_attention(q, k.contiguous(), v.contiguous(), causal=True, enable_gqa=True, backend=self.backend)
        return out.transpose(1, 2).reshape(b, length, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_end_aligned_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = _GqaBlock(backend)
    x, cache = torch.randn(2, 9, 8), torch.randn(2, 14, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if backend == "reference" else "inductor")
    eager = model(x, cache)
    out = compiled(x, cache)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.kv.weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_taylor_attention_module_with_num_kv_heads(backend):
    """nn.TaylorAttention(num_kv_heads=...): forward == the same module math on repeated key/value heads; the
    decoding cache has Hkv heads and its steps reproduce the causal forward; cross-attention caches too."""
    torch.manual_seed(0)
    attn = la.nn.TaylorAttention(24, 6, num_kv_heads=2, feature_dim=5, backend=backend).double()
    assert attn.key.out_features == 2 * 5 and attn.value.out_features == 2 * 4
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    q = attn._heads(attn.query(x))
    k, v = attn._heads(attn.key(x), 2), attn._heads(attn.value(x), 2)
    for causal in (False, True):
        want = attn.out(attn._merge(expected(q, k, v, causal=causal, scale=attn.scale)))
        assert max_rel_err(attn(x, causal=causal), want) < 1e-10
    cache = attn.init_cache(batch_size=2)
    assert cache.state.kv.shape == (2, 2, la.feature_dim(5), 4)
    outs = []
    for t in range(x.shape[1]):
        o, cache = attn.step(x[:, t : t + 1], cache)
        outs.append(o)
    assert max_rel_err(torch.cat(outs, 1), attn(x, causal=True)) < 1e-10
    ctx = torch.randn(2, 9, 24, dtype=torch.float64)
    cross = attn.init_cache(context=ctx)
    o, _ = attn.step(x[:, :1], cross)
    assert max_rel_err(o, attn(x[:, :1], ctx)) < 1e-10
    with pytest.raises(ValueError, match=r"num_kv_heads \(4\) must be a positive divisor of num_heads \(6\)"):
        la.nn.TaylorAttention(24, 6, num_kv_heads=4)
