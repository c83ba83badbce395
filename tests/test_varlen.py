"""Packed variable-length sequences beyond the case matrix (tests/test_taylor.py): long sequences, thread and
column splits, prefill + batched steps, argument errors, opcheck and torch.compile of the packed layout."""
import pytest
import torch

import linattn_cuda as la
from linattn_cuda._extension import has_kernel

from .helpers import bwd_args, fwd_args, max_rel_err, seed_for

BACKENDS = ["reference"] + (["cpu"] if has_kernel("CPU") else [])
needs_cpu = pytest.mark.skipif(not has_kernel("CPU"), reason="linattn_cuda._C is not built")
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(params=["auto", "quadratic", "linear"])
def form(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("LINATTN_CPU_FORM", request.param)
    if request.param == "linear":
        monkeypatch.setenv("LINATTN_CPU_CHUNK", "16")
    return request.param


def cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def packed(lq, lk, h, hk, d, dv, *, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lk), hk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lk), hk, dv, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v)) + (cu(lq), cu(lk))


def per_sequence(q, k, v, cq, ck, *, causal, scale=None):
    """One float64 reference taylor_attention call per sequence, [T, H, *] -> [1, H, L, *] and back."""
    outs = []
    bq, bk = cq.tolist(), ck.tolist()
    for n in range(len(bq) - 1):
        qs = q[bq[n] : bq[n + 1]].double().transpose(0, 1)[None]
        ks = k[bk[n] : bk[n + 1]].double().transpose(0, 1)[None]
        vs = v[bk[n] : bk[n + 1]].double().transpose(0, 1)[None]
        out = la.taylor_attention(qs, ks, vs, causal=causal, scale=scale, enable_gqa=True, backend="reference")
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, 0)


# Lengths per sequence (queries, keys): empty sequences, 1, odd, long; Lq != Lk (end-aligned when causal).
CASES = {
    "equal": ([5, 0, 1, 67, 300, 2], None),
    "lq<lk": ([3, 0, 1, 40, 129, 1], [10, 0, 1, 67, 300, 33]),
    "no-keys": ([4, 6, 9], [0, 7, 9]),  # non-causal only: a sequence with queries and no keys gives 0
    "long": ([1100, 13], None),
}


def _lengths(case):
    lq, lk = CASES[case]
    return lq, lk if lk is not None else lq


def _compare(backend, case, causal, hk, dtype, grads=True, h=4, d=8, dv=12):
    lq, lk = _lengths(case)
    q, k, v, cq, ck = packed(lq, lk, h, hk, d, dv, dtype=dtype, seed=seed_for(case, causal, hk, dtype),
                             requires_grad=grads)
    out = la.taylor_attention_varlen(q, k, v, cq, ck, causal=causal, enable_gqa=hk != h, backend=backend)
    assert out.shape == (sum(lq), h, dv) and out.dtype == dtype and out.is_contiguous()
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    want = per_sequence(q64, k64, v64, cq, ck, causal=causal)
    assert max_rel_err(out, want) < TOL[dtype]
    if grads:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
        ref = torch.autograd.grad(want, (q64, k64, v64), g)
        for name, a, w in zip("qkv", got, ref):
            assert a.shape == w.shape and a.dtype == dtype
            assert max_rel_err(a, w) < 10 * TOL[dtype], f"grad {name}"


@needs_cpu
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_varlen_long_sequence_cpu(causal):
    _compare("cpu", "long", causal, 2, torch.float32)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_varlen_lower_precision_cpu(dtype, causal):
    _compare("cpu", "lq<lk", causal, 2, dtype, d=16, dv=64)


@needs_cpu
def test_varlen_threads_and_column_split(form):
    """One sequence with one key/value head on 4 threads: the value columns are split between tasks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for causal in (False, True):
            _compare("cpu", "lq<lk", causal, 1, torch.float64, h=2, dv=70)
    finally:
        torch.set_num_threads(threads)


@needs_cpu
def test_varlen_gradcheck(monkeypatch):
    for form_name in ("quadratic", "linear"):
        monkeypatch.setenv("LINATTN_CPU_FORM", form_name)
        monkeypatch.setenv("LINATTN_CPU_CHUNK", "3")
        q, k, v, cq, ck = packed([3, 0, 5], [4, 2, 7], 2, 1, 3, 2, requires_grad=True)
        for causal in (False, True):
            def fn(q, k, v):
                return la.taylor_attention_varlen(q, k, v, cq, ck, causal=causal, enable_gqa=True, backend="cpu")

            assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_non_contiguous_inputs(backend):
    q, k, v, cq, ck = packed([7, 20], [9, 31], 3, 3, 4, 6, seed=4)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # [H, T, D] storage
    vt = torch.stack([v, -v], -1)[..., 0]
    assert not qt.is_contiguous() and not vt.is_contiguous()
    out = la.taylor_attention_varlen(qt, k, vt, cq, ck, causal=True, backend=backend)
    assert max_rel_err(out, per_sequence(q, k, v, cq, ck, causal=True)) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hk", [3, 1], ids=["mha", "gqa"])
def test_prefill_varlen_then_batched_steps(backend, hk):
    """Prompts of different lengths prefilled at once: per-sequence states equal to each prompt's own prefill,
    and decoding the batch with taylor_attention_step continues each sequence's causal attention."""
    h, d, dv, steps = 3, 8, 10, 4
    lengths = [5, 1, 33, 0, 70]
    n = len(lengths)
    total = [x + steps for x in lengths]
    q, k, v, _, _ = packed(total, total, h, hk, d, dv, seed=seed_for("prefill-varlen", hk))
    bounds = cu(total).tolist()
    take = lambda x, a, b: torch.cat([x[bounds[i] + a(i) : bounds[i] + b(i)] for i in range(n)])  # noqa: E731
    prompt = [take(x, lambda i: 0, lambda i: lengths[i]) for x in (q, k, v)]
    gqa = hk != h
    with torch.no_grad():
        out, state = la.taylor_attention_prefill_varlen(*prompt, cu(lengths), enable_gqa=gqa, backend=backend)
    m = la.feature_dim(d)
    assert out.shape == (sum(lengths), h, dv)
    assert state.kv.shape == (n, hk, m, dv) and state.k_sum.shape == (n, hk, m)
    assert max_rel_err(out, per_sequence(*prompt, cu(lengths), cu(lengths), causal=True)) < 1e-10
    for i, length in enumerate(lengths):  # each prompt alone
        s = slice(bounds[i], bounds[i] + length)
        qs, ks, vs = (x[s].transpose(0, 1)[None] for x in (q, k, v))
        _, alone = la.taylor_attention_prefill(qs, ks, vs, enable_gqa=gqa, backend="reference")
        assert max_rel_err(state.kv[i], alone.kv[0]) < 1e-10 and max_rel_err(state.k_sum[i], alone.k_sum[0]) < 1e-10
    full = per_sequence(q, k, v, cu(total), cu(total), causal=True)
    for t in range(steps):
        at = torch.tensor([bounds[i] + lengths[i] + t for i in range(n)])
        o, state = la.taylor_attention_step(q[at], k[at], v[at], state, enable_gqa=gqa, backend=backend)
        assert max_rel_err(o, full[at]) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_varlen_from_initial_states_and_cached_keys(backend):
    """Chunked prefill of packed sequences: the second chunk from the first chunk's per-sequence states equals
    one prefill; and a chunk given with more keys than queries (end-aligned) equals it too."""
    lengths_a, lengths_b = [4, 0, 17, 1], [6, 3, 0, 30]
    h, hk, d, dv = 4, 2, 5, 7
    total = [a + b for a, b in zip(lengths_a, lengths_b)]
    q, k, v, c, _ = packed(total, total, h, hk, d, dv, seed=31)
    bounds = c.tolist()
    pick = lambda x, lo, hi: torch.cat([x[bounds[i] + lo[i] : bounds[i] + hi[i]] for i in range(4)])  # noqa: E731
    zero, split, end = [0] * 4, lengths_a, total
    with torch.no_grad():
        full_out, full_state = la.taylor_attention_prefill_varlen(q, k, v, c, enable_gqa=True, backend=backend)
        a_out, a_state = la.taylor_attention_prefill_varlen(*(pick(x, zero, split) for x in (q, k, v)), cu(lengths_a),
                                                            enable_gqa=True, backend=backend)
        b_out, b_state = la.taylor_attention_prefill_varlen(*(pick(x, split, end) for x in (q, k, v)), cu(lengths_b),
                                                            initial_state=a_state, enable_gqa=True, backend=backend)
        # the same second chunk with the whole keys (cache + new): end-aligned causal, no initial state
        c_out, c_state = la.taylor_attention_prefill_varlen(pick(q, split, end), k, v, cu(lengths_b), c,
                                                            enable_gqa=True, backend=backend)
    assert max_rel_err(b_out, pick(full_out, split, end)) < 1e-10
    assert max_rel_err(a_out, pick(full_out, zero, split)) < 1e-10
    assert max_rel_err(c_out, pick(full_out, split, end)) < 1e-10
    for st in (b_state, c_state):
        assert max_rel_err(st.kv, full_state.kv) < 1e-10 and max_rel_err(st.k_sum, full_state.k_sum) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_empty_inputs(backend):
    q, k, v, cq, ck = packed([0, 0], [0, 0], 2, 2, 4, 3, requires_grad=True)
    out = la.taylor_attention_varlen(q, k, v, cq, ck, backend=backend)
    assert out.shape == (0, 2, 3)
    q, k, v, cq, ck = packed([3, 2], [0, 0], 2, 2, 4, 3, requires_grad=True)
    out = la.taylor_attention_varlen(q, k, v, cq, ck, backend=backend)
    assert torch.equal(out, torch.zeros(5, 2, 3, dtype=torch.float64))
    out.sum().backward()
    assert q.grad is not None
    with torch.no_grad():
        out, st = la.taylor_attention_prefill_varlen(*packed([0, 0, 0], [0, 0, 0], 2, 1, 4, 3)[:4], enable_gqa=True,
                                                     backend=backend)
    assert out.shape == (0, 2, 3) and st.kv.shape == (3, 1, 15, 3) and not st.kv.any()


def _bad(q, k, v, cq, ck, **kw):
    return la.taylor_attention_varlen(q, k, v, cq, ck, **kw)


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda q, k, v, cq, ck: (q, k, v, cq.long(), ck), TypeError, "cu_seqlens_q must have dtype torch.int32"),
        (lambda q, k, v, cq, ck: (q, k, v, cq, ck.float()), TypeError, "cu_seqlens_k must have dtype torch.int32"),
        (lambda q, k, v, cq, ck: (q, k, v, cq.to("meta"), ck), ValueError, "cu_seqlens_q must be on the same device"),
        (lambda q, k, v, cq, ck: (q, k, v, [0, 3, 8], ck), TypeError, "cu_seqlens_q must be an int32 tensor"),
        (lambda q, k, v, cq, ck: (q, k, v, cq[None], ck), ValueError, r"cu_seqlens_q must have shape \[N \+ 1\]"),
        (lambda q, k, v, cq, ck: (q, k, v, cq + 1, ck), ValueError, "cu_seqlens_q must start at 0, got 1"),
        (lambda q, k, v, cq, ck: (q, k, v, torch.tensor([0, 6, 3, 8], dtype=torch.int32),
                                  torch.tensor([0, 4, 7, 11], dtype=torch.int32)), ValueError,
         "cu_seqlens_q must be non-decreasing, got 6 then 3 at index 2"),
        (lambda q, k, v, cq, ck: (q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), ck[:3]), ValueError,
         r"cu_seqlens_q must end at the number of tokens \(8\), got 7"),
        (lambda q, k, v, cq, ck: (q, k, v, cq, torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError,
         r"cu_seqlens_k must end at the number of tokens \(11\), got 9"),
        (lambda q, k, v, cq, ck: (q, k, v, cq, ck[:2]), ValueError, "cu_seqlens_k must have the length of cu_seqlens_q"),
        (lambda q, k, v, cq, ck: (q[None], k, v, cq, ck), ValueError, r"q must have shape \[Tq, H, D\]"),
        (lambda q, k, v, cq, ck: (q, k[:, :1], v[:, :1], cq, ck), ValueError, "k must have the head count of q"),
        (lambda q, k, v, cq, ck: (q, k, v[:5], cq, ck), ValueError, r"v must have the token count Tk of k \(11\)"),
        (lambda q, k, v, cq, ck: (q, k, v.float(), cq, ck), TypeError, "v must have the same dtype as q"),
    ],
)
def test_bad_varlen_arguments_name_the_argument(mutate, exc, pattern):
    q, k, v, cq, ck = packed([3, 5], [4, 7], 2, 2, 4, 3)
    with pytest.raises(exc, match=pattern):
        _bad(*mutate(q, k, v, cq, ck))


def test_varlen_causal_needs_lq_le_lk_in_every_sequence():
    q, k, v, cq, ck = packed([3, 5], [4, 2], 2, 2, 4, 3)
    with pytest.raises(ValueError, match=r"causal attention needs Lq <= Lk.*got q length 5 and k length 2 in sequence 1"):
        la.taylor_attention_varlen(q, k, v, cq, ck, causal=True)
    with pytest.raises(ValueError, match="in sequence 1"):
        la.taylor_attention_prefill_varlen(q, k, v, cq, ck)


def test_varlen_more_than_2_to_the_31_tokens():
    q = torch.empty(2**31, 1, 4, device="meta")
    c = torch.zeros(2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"cu_seqlens_q: at most 2\^31 - 1 tokens"):
        la.taylor_attention_varlen(q, q, q, c)


def test_varlen_bad_initial_state():
    q, k, v, cq, ck = packed([3, 5], [3, 5], 2, 1, 4, 3)
    with pytest.raises(ValueError, match=r"state.kv must have shape \[2, 1, 15, 3\]"):
        la.taylor_attention_prefill_varlen(q, k, v, cq, initial_state=la.empty_state(2, 2, 4, 3), enable_gqa=True)


@needs_cpu
def test_varlen_direct_op_calls_check_cu_seqlens():
    q, k, v, cq, ck = packed([3, 5], [4, 7], 2, 2, 4, 3)
    fwd = torch.ops.linattn_cuda.taylor_fwd

    def call(cu_q, cu_k, causal=False):
        return fwd(*fwd_args(q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k))

    with pytest.raises(RuntimeError, match="cu_seqlens_q must be an int32 tensor"):
        call(cq.long(), ck)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must start at 0"):
        call(cq, ck + 1)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        call(torch.tensor([0, 6, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 7, 11], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must end at the number of tokens \(8\)"):
        call(torch.tensor([0, 3, 7], dtype=torch.int32), ck)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must have the length of cu_seqlens_q"):
        call(cq, torch.tensor([0, 11], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="causal attention needs Lq <= Lk .* sequence 0 has 3 queries and 1 keys"):
        call(cq, torch.tensor([0, 1, 11], dtype=torch.int32), causal=True)
    with pytest.raises(RuntimeError, match="key_padding_mask is for dense"):
        fwd(*fwd_args(q, k, v, torch.zeros(2, 11, dtype=torch.bool), cu_q=cq, cu_k=ck))


@needs_cpu
def test_varlen_opcheck():
    q, k, v, cq, ck = packed([3, 0, 9, 1], [5, 2, 9, 4], 4, 2, 4, 6, seed=12, requires_grad=True)
    ops = torch.ops.linattn_cuda
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    for causal in (False, True):
        args = fwd_args(q, k, v, None, causal, cu_q=cq, cu_k=ck)
        torch.library.opcheck(ops.taylor_fwd, args)
        out, den, _, _ = ops.taylor_fwd(*args)
        assert den.shape == (13, 4)
        g = torch.randn_like(out)
        torch.library.opcheck(ops.taylor_bwd, bwd_args(g, qd, kd, vd, out.detach(), den, None, causal, cu_q=cq, cu_k=ck))
    _, _, kv, ks = ops.taylor_fwd(*fwd_args(qd, kd, vd, None, True, cu_q=cq, cu_k=ck, return_state=True))
    assert kv.shape == (4, 2, 15, 6)
    torch.library.opcheck(ops.taylor_fwd, fwd_args(qd, kd, vd, None, True, cu_q=cq, cu_k=ck, kv0=kv, k_sum0=ks,
                                                   return_state=True))


class _PackedBlock(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)
        self.backend = backend

    def forward(self, x, cu_seqlens):
        q, k, v = self.proj(x).view(x.shape[0], 3, 4, 2).unbind(1)  # [T, 4, 2] each: H = 4, D = 2
        out = la.taylor_attention_varlen(q, k[:, :2], v[:, :2], cu_seqlens, causal=True, enable_gqa=True,
                                         backend=self.backend)
        return out.reshape(x.shape[0], -1)


@needs_cpu
def test_varlen_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = _PackedBlock("cpu")
    x, c = torch.randn(40, 8), cu([7, 0, 30, 3])
    compiled = torch.compile(model, fullgraph=True)
    eager = model(x, c)
    out = compiled(x, c)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.proj.weight.grad is not None
