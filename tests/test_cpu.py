"""The fused C++ CPU kernels (backend="cpu") against the float64 reference."""
import os

import pytest
import torch

import linattn_cuda as la
from linattn_cuda._extension import has_kernel

from .helpers import fwd_args, bwd_args, make_inputs, max_rel_err, reference_grads, reference_out, seed_for

pytestmark = pytest.mark.skipif(not has_kernel("CPU"), reason="linattn_cuda._C is not built")

# (B, H, Lq, Lk, D, Dv): odd lengths, cross-attention, D in {1, 16, 24, 64}, Dv != D.
SHAPES = [
    (2, 3, 1, 1, 16, 64),
    (2, 2, 63, 63, 16, 24),
    (1, 2, 257, 257, 24, 40),
    (2, 1, 257, 257, 1, 3),
    (1, 2, 63, 63, 64, 17),
    (2, 2, 300, 300, 5, 7),
]
CROSS_SHAPES = [(2, 2, 17, 63, 16, 8), (1, 2, 257, 40, 24, 33), (2, 1, 40, 1000, 4, 8)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(params=["auto", "quadratic", "linear"])
def form(request, monkeypatch):
    """Run each case with the kernel's own choice of form and with each form forced."""
    if request.param != "auto":
        monkeypatch.setenv("LINATTN_CPU_FORM", request.param)
    if request.param == "linear":
        monkeypatch.setenv("LINATTN_CPU_CHUNK", "16")  # many chunks even at small L
    return request.param


def _check(shape, causal, mask, dtype, grads=True):
    b, h, lq, lk, d, dv = shape
    q, k, v, m = make_inputs(b, h, lq, lk, d, dv, dtype=dtype, seed=seed_for(shape, causal, mask, dtype, os.environ.get("LINATTN_CPU_FORM")), mask=mask, requires_grad=grads)
    out = la.taylor_attention(q, k, v, causal=causal, key_padding_mask=m, backend="cpu")
    assert out.dtype == dtype and out.shape == (b, h, lq, dv)
    ref = reference_out(q, k, v, causal=causal, key_padding_mask=m)
    assert max_rel_err(out, ref) < TOL[dtype]
    if grads:
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        want = reference_grads(q, k, v, g, causal=causal, key_padding_mask=m)
        for name, a, w in zip("qkv", got, want):
            assert a.dtype == dtype
            assert max_rel_err(a, w) < 10 * TOL[dtype], f"grad {name}"


@pytest.mark.parametrize("mask", [None, "full-row"], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-Lq{}-Lk{}-D{}-Dv{}".format(*s))
def test_cpu_matches_reference_fp64(shape, causal, mask, form):
    _check(shape, causal, mask, torch.float64)


@pytest.mark.parametrize("mask", [None, "full-row"], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=lambda s: "B{}-H{}-Lq{}-Lk{}-D{}-Dv{}".format(*s))
def test_cpu_cross_attention(shape, mask, form):
    _check(shape, False, mask, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_cpu_lower_precision(dtype, causal, form):
    _check((2, 2, 130, 130, 16, 64), causal, "random", dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_cpu_value_columns_split_across_threads(causal, form):
    """With fewer heads than threads the forward and the backward split the value columns between tasks (the
    backward sums the blocks' shares of dq and dk)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _check((1, 1, 300, 300, 16, 70), causal, "random", torch.float64)
    finally:
        torch.set_num_threads(threads)


def test_cpu_long_causal_sequence_uses_chunks():
    _check((1, 2, 1100, 1100, 16, 64), True, "random", torch.float32)


def test_cpu_non_contiguous_inputs():
    q, k, v, m = make_inputs(2, 5, 70, 70, 16, 32, dtype=torch.float64, seed=9, mask="random")
    # [B, L, H, D] storage viewed as [B, H, L, D], and a strided value slice
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = torch.stack([v, -v], dim=-1)[..., 0]  # every other element of a wider buffer
    assert not qt.is_contiguous() and not vt.is_contiguous()
    for causal in (False, True):
        out = la.taylor_attention(qt, kt, vt, causal=causal, key_padding_mask=m, backend="cpu")
        assert max_rel_err(out, reference_out(q, k, v, causal=causal, key_padding_mask=m)) < 1e-10


def test_cpu_gradcheck():
    q, k, v, m = make_inputs(1, 2, 9, 9, 3, 4, dtype=torch.float64, seed=1, mask="random", requires_grad=True)
    for causal in (False, True):
        fn = lambda q, k, v: la.taylor_attention(q, k, v, causal=causal, key_padding_mask=m, backend="cpu")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_cpu_gradcheck_chunked(monkeypatch):
    monkeypatch.setenv("LINATTN_CPU_FORM", "linear")
    monkeypatch.setenv("LINATTN_CPU_CHUNK", "4")
    q, k, v, m = make_inputs(2, 1, 11, 11, 2, 3, dtype=torch.float64, seed=2, mask="random", requires_grad=True)
    for causal in (False, True):
        fn = lambda q, k, v: la.taylor_attention(q, k, v, causal=causal, key_padding_mask=m, backend="cpu")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_prefill_then_steps_equal_causal_attention(dtype):
    b, h, length, n, d, dv = 2, 3, 37, 6, 16, 24
    q, k, v, _ = make_inputs(b, h, length + n, length + n, d, dv, dtype=dtype, seed=seed_for("decode", dtype))
    full = la.taylor_attention(q, k, v, causal=True, backend="cpu")
    out, state = la.taylor_attention_prefill(q[:, :, :length], k[:, :, :length], v[:, :, :length], backend="cpu")
    assert state.kv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    outs = [out]
    for t in range(length, length + n):
        o, state = la.taylor_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, backend="cpu")
        outs.append(o.unsqueeze(2))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert max_rel_err(torch.cat(outs, 2), full) < tol
    _, ref_state = la.taylor_attention_prefill(q, k, v, backend="reference")
    assert max_rel_err(state.kv, ref_state.kv) < tol and max_rel_err(state.k_sum, ref_state.k_sum) < tol


@pytest.mark.parametrize("threads", [None, 4], ids=["default-threads", "4-threads"])
@pytest.mark.parametrize("shape", [(2, 2, 16), (1, 1, 70)], ids=["B2-H2-Dv16", "B1-H1-Dv70"])
def test_cpu_prefill_from_initial_state_with_mask(shape, threads):
    """Two prefills (state out, then state in) == one; with fewer heads than threads the value columns are split
    across tasks (B1-H1-Dv70 on 4 threads: 4 blocks, each with its own slice of the state)."""
    b, h, dv = shape
    q, k, v, m = make_inputs(b, h, 300, 300, 8, dv, dtype=torch.float64, seed=4, mask="random")
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ref_out, ref_state = la.taylor_attention_prefill(q, k, v, key_padding_mask=m, backend="reference")
        first, state = la.taylor_attention_prefill(q[:, :, :130], k[:, :, :130], v[:, :, :130], key_padding_mask=m[:, :130], backend="cpu")
        rest, state = la.taylor_attention_prefill(q[:, :, 130:], k[:, :, 130:], v[:, :, 130:], key_padding_mask=m[:, 130:], initial_state=state, backend="cpu")
    finally:
        torch.set_num_threads(saved)
    assert max_rel_err(torch.cat([first, rest], 2), ref_out) < 1e-10
    assert max_rel_err(state.kv, ref_state.kv) < 1e-10
    assert max_rel_err(state.k_sum, ref_state.k_sum) < 1e-10


def test_cpu_step_does_not_modify_the_old_state():
    q, k, v, _ = make_inputs(2, 2, 1, 1, 4, 5, seed=8)
    state = la.empty_state(2, 2, 4, 5)
    state = la.TaylorState(torch.rand_like(state.kv), torch.rand_like(state.k_sum))
    before = [t.clone() for t in state]
    la.taylor_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, state))


def test_cpu_opcheck():
    """Schema, fake kernels, autograd registration and AOT dispatch of the op family, every mode."""
    q, k, v, m = make_inputs(2, 2, 19, 19, 4, 6, seed=12, mask="random", requires_grad=True)
    ops = torch.ops.linattn_cuda
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    _, _, kv, ks = ops.taylor_fwd(*fwd_args(qd, kd, vd, m, True, return_state=True))
    for causal in (False, True):
        for state, ret in (((None, None), False), ((kv, ks), True)):
            s0 = tuple(x.clone().requires_grad_() for x in state) if state[0] is not None else state
            args = fwd_args(q, k, v, m, causal, kv0=s0[0], k_sum0=s0[1], return_state=ret)
            torch.library.opcheck(ops.taylor_fwd, args)
            out, den, kv1, ks1 = ops.taylor_fwd(*args)
            g = torch.randn_like(out)
            gs = (torch.randn_like(kv1), torch.randn_like(ks1)) if ret else (None, None)
            torch.library.opcheck(ops.taylor_bwd, bwd_args(g, qd, kd, vd, out.detach(), den, m, causal, kv0=state[0],
                                                           k_sum0=state[1], grad_kv=gs[0], grad_k_sum=gs[1]))
    torch.library.opcheck(ops.taylor_step, (qd[:, :, 0], kd[:, :, 0], vd[:, :, 0], kv, ks, 0.5))


def test_cpu_nan_and_inf_inputs_do_not_crash():
    q, k, v, _ = make_inputs(1, 2, 40, 40, 8, 8, seed=13)
    q[0, 0, 3, 1] = float("nan")
    k[0, 1, 5, 0] = float("inf")
    for causal in (False, True):
        out = la.taylor_attention(q, k, v, causal=causal, backend="cpu")
        assert out.shape == (1, 2, 40, 8)
        assert torch.isfinite(out[0, 0, :3]).all()  # rows before the NaN query are untouched (causal or not)


def test_cpu_direct_op_call_checks_arguments():
    q, k, v, _ = make_inputs(1, 1, 5, 5, 4, 4, seed=14)
    fwd = torch.ops.linattn_cuda.taylor_fwd
    with pytest.raises(RuntimeError, match="causal attention needs Lq <= Lk"):
        fwd(*fwd_args(q, k[:, :, :3], v[:, :, :3], None, True))
    with pytest.raises(RuntimeError, match="key_padding_mask must have shape"):
        fwd(*fwd_args(q, k, v, torch.zeros(1, 4, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="scale must be a finite positive number, got -0.5"):
        fwd(*fwd_args(q, k, v, scale=-0.5))
    with pytest.raises(RuntimeError, match="kv0 must have shape"):
        fwd(*fwd_args(q, k, v, kv0=torch.zeros(1, 1, 14, 3), k_sum0=torch.zeros(1, 1, 15)))
    with pytest.raises(RuntimeError, match="cu_seqlens_q and cu_seqlens_k must be given together"):
        fwd(*fwd_args(q[0], k[0], v[0], cu_q=torch.tensor([0, 1], dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="LINATTN_CPU_FORM"):
        os.environ["LINATTN_CPU_FORM"] = "bogus"
        try:
            fwd(*fwd_args(q, k, v))
        finally:
            del os.environ["LINATTN_CPU_FORM"]


def test_cpu_opcheck_on_strided_inputs():
    """Fake and real kernels agree on output layouts also for non-contiguous inputs (torch.compile relies on it)."""
    q, k, v, m = make_inputs(2, 3, 21, 21, 4, 6, seed=15, mask="random")
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    vt = torch.stack([v, -v], dim=-1)[..., 0]
    ops = torch.ops.linattn_cuda
    out, den, _, _ = ops.taylor_fwd(*fwd_args(qt, k, vt, m, True))
    g = torch.randn_like(out)
    torch.library.opcheck(ops.taylor_fwd, fwd_args(qt.requires_grad_(), k, vt, m, True))
    torch.library.opcheck(ops.taylor_bwd, bwd_args(g, qt.detach(), k, vt, out, den, m, True))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_cpu_padded_keys_values_never_leak(causal, form):
    """Whatever padded keys hold (here NaN and inf in k and v), the output and the gradients of the other
    positions are those of the same inputs with finite values there: padding removes a key exactly."""
    b, h, L, d, dv = 2, 2, 70, 8, 20
    q, k, v, m = make_inputs(b, h, L, L, d, dv, dtype=torch.float64, seed=seed_for("leak", causal, form),
                             mask="full-row")
    m[0, 5:40] = True  # a run of padded keys across chunk boundaries (chunks of 16 under the linear form)
    m[0, 0] = False
    bad_k, bad_v = k.detach().clone(), v.detach().clone()
    pad = m[:, None, :, None].expand(b, h, L, 1)
    bad_k = bad_k.masked_fill(pad.expand(-1, -1, -1, d), float("nan"))
    bad_v = bad_v.masked_fill(pad.expand(-1, -1, -1, dv), float("inf"))
    outs, grads = [], []
    g = torch.randn(b, h, L, dv, dtype=torch.float64)
    for kk, vv in ((k.detach(), v.detach()), (bad_k, bad_v)):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q.detach(), kk, vv))
        out = la.taylor_attention(qq, kk, vv, causal=causal, key_padding_mask=m, backend="cpu")
        outs.append(out)
        grads.append(torch.autograd.grad(out, (qq, kk, vv), g))
    keep = ~m[:, None, :, None]
    visible = outs[0].isfinite()  # causal: queries before the first unpadded key see nothing (0)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    assert visible.all()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-12)  # dq
    for i in (1, 2):  # dk, dv of the unpadded keys
        torch.testing.assert_close(torch.where(keep, grads[1][i], 0.0), torch.where(keep, grads[0][i], 0.0),
                                   rtol=1e-9, atol=1e-12)
