"""Every backend on the one case list (tests/cases.py): forward, final state and gradients (q, k, v and the initial
state) against the float64 definition, in every dtype the backend takes, dense and packed layouts.

Backends come from what this build has: ``reference``, ``cpu`` (its forms forced one by one as well), ``triton``
under the interpreter (small cases: it is slow) and ``cuda`` on a GPU. A case a backend cannot serve must be refused
by an explicit call with the reason (NotImplementedError) and is reported as skipped with that reason: the support
matrix's open cells show in the test summary.
"""
from __future__ import annotations

import os

import pytest
import torch

import linattn_cuda as la
from linattn_cuda.ops import dispatch
from linattn_cuda.ops.problem import LIMITS, attention_problem, varlen_problem

from .cases import CASES, FLOOR, Case, expected, head_dim_cases, make_inputs, plain_low_precision, rel_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
INTERPRETED_MAX_SIZE = 3_000_000  # Triton under the interpreter: cases up to this many pair x head x dim units


def _backends():
    """(id, backend name, device, env) for every backend this build can run here."""
    out = []
    for name in dispatch.available_backends("cpu"):
        if name == "cpu":
            out += [("cpu", "cpu", "cpu", {}), ("cpu-quadratic", "cpu", "cpu", {"LINATTN_CPU_FORM": "quadratic"}),
                    ("cpu-linear16", "cpu", "cpu", {"LINATTN_CPU_FORM": "linear", "LINATTN_CPU_CHUNK": "16"})]
        else:
            out.append((name, name, "cpu", {}))
    if torch.cuda.is_available():
        out += [(f"{n}-gpu", n, "cuda", {}) for n in dispatch.available_backends("cuda") if n != "reference"]
    return out


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS, ids=[b[0] for b in BACKENDS])
def backend(request, monkeypatch):
    ident, name, device, env = request.param
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ident, name, torch.device(device)


def _problem(case: Case, x, device):
    if case.packed:
        return varlen_problem(x.q, x.k, x.v, x.cu_q, x.cu_k, causal=case.causal, enable_gqa=True,
                              initial_state=x.state, return_state=case.state_out)
    return attention_problem(x.q, x.k, x.v, causal=case.causal, key_padding_mask=x.mask, enable_gqa=True,
                             initial_state=x.state, return_state=case.state_out)


def _call(case: Case, x, name):
    kw = dict(causal=case.causal, enable_gqa=True, initial_state=x.state, return_state=case.state_out, backend=name)
    if case.packed:
        r = la.taylor_attention_varlen(x.q, x.k, x.v, x.cu_q, x.cu_k, **kw)
    else:
        r = la.taylor_attention(x.q, x.k, x.v, key_padding_mask=x.mask, **kw)
    return r if case.state_out else (r, None)


def _to_device(x, device):
    def mv(t):
        return None if t is None else t.to(device)

    state = None if x.state is None else la.TaylorState(mv(x.state.kv), mv(x.state.k_sum))
    return type(x)(mv(x.q), mv(x.k), mv(x.v), mv(x.mask), mv(x.cu_q), mv(x.cu_k), state)


def _skip_unless_served(case, x, ident, name, device):
    """Skip (with the reason) a case the backend cannot serve, after checking that an explicit call refuses it."""
    if name == "triton" and device.type == "cpu" and case.size > INTERPRETED_MAX_SIZE:
        pytest.skip("too large for Triton's interpreter")
    p = _problem(case, x, device)
    reason = dispatch.get_backend(name).cannot_serve(p)
    if reason is not None:
        with pytest.raises((NotImplementedError, ValueError, TypeError)):
            _call(case, x, name)
        pytest.skip(f"{ident} cannot serve it: {reason}")


def _check_dtype_limits(name, dtype):
    if dtype not in LIMITS[name].dtypes:
        pytest.skip(f"{name} does not take {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward(backend, case, dtype):
    ident, name, device = backend
    _check_dtype_limits(name, dtype)
    if name == "triton" and device.type == "cpu" and dtype == torch.float16:
        pytest.skip("interpreter: float16 covered by float32 and bfloat16")
    x64 = make_inputs(case)
    x = _to_device(x64.to(dtype), device)
    _skip_unless_served(case, x, ident, name, device)
    out, state = _call(case, x, name)
    ref, ref_state = expected(case, x64.to(dtype).to(torch.float64))  # the ground truth of the rounded inputs
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    tol = FLOOR[dtype] if dtype == torch.float64 else 2 * rel_err(plain_low_precision(case, x64.to(dtype)), ref) + FLOOR[dtype]
    assert err <= tol, f"{ident} {case.id} {dtype}: error {err:.3g} > tolerance {tol:.3g}"
    if case.state_out:
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        assert state.kv.dtype == sdt and state.kv.shape == ref_state.kv.shape
        state_tol = 1e-11 if dtype == torch.float64 else 2e-5
        assert rel_err(state.kv, ref_state.kv) <= state_tol
        assert rel_err(state.k_sum, ref_state.k_sum) <= state_tol
    else:
        assert state is None


def _loss_grads(case, x, out, state, seed=1):
    """Gradients of a random linear function of the outputs (and the final state) w.r.t. q, k, v (and the initial
    state)."""
    gen = torch.Generator().manual_seed(seed)
    terms = [(out, torch.randn(out.shape, generator=gen, dtype=torch.float64))]
    if case.state_out:
        terms += [(state.kv, torch.randn(state.kv.shape, generator=gen, dtype=torch.float64)),
                  (state.k_sum, torch.randn(state.k_sum.shape, generator=gen, dtype=torch.float64))]
    loss = sum((t.double() * g.to(t.device)).sum() for t, g in terms)
    return torch.autograd.grad(loss, x.tensors(), allow_unused=True)


GRAD_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradients(backend, case, dtype):
    ident, name, device = backend
    _check_dtype_limits(name, dtype)
    if name == "triton" and device.type == "cpu" and dtype == torch.float64:
        pytest.skip("triton takes no float64")
    x64 = make_inputs(case)
    x = _to_device(x64.to(dtype, requires_grad=True), device)
    _skip_unless_served(case, x, ident, name, device)
    got = _loss_grads(case, x, *_call(case, x, name))
    xr = x64.to(dtype).to(torch.float64, requires_grad=True)  # the ground truth of the rounded inputs
    want = _loss_grads(case, xr, *expected(case, xr))
    if dtype != torch.float64:
        xp = x64.to(dtype, requires_grad=True)
        plain = _loss_grads(case, xp, plain_low_precision(case, xp), None) if not case.state_out else None
    names = ["dq", "dk", "dv", "dkv0", "dk_sum0"]
    for gname, g, w, i in zip(names, got, want, range(5)):
        if w is None:
            assert g is None or g.abs().max() == 0, f"{gname} should be zero"
            continue
        assert g is not None, f"{ident}: no gradient for {gname}"
        err = rel_err(g, w)
        if dtype == torch.float64:
            tol = 1e-9
        elif plain is not None and i < 3 and plain[i] is not None:
            tol = 2 * rel_err(plain[i], w) + FLOOR[dtype]
        else:  # state gradients (and the state-out cases): float32 accumulation of low-precision inputs
            tol = 3e-5 if dtype == torch.float32 else 2e-2
        assert err <= tol, f"{ident} {case.id} {dtype} {gname}: error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("case", head_dim_cases(), ids=lambda c: c.id)
def test_large_head_dims(backend, case):
    """Head dims of real models (128, Gemma's 256): served by some path (the support matrix says which)."""
    ident, name, device = backend
    x64 = make_inputs(case)
    x = _to_device(x64.to(torch.float32, requires_grad=True), device)
    _skip_unless_served(case, x, ident, name, device)
    out, _ = _call(case, x, name)
    ref, _ = expected(case, x64)
    assert rel_err(out, ref) <= 2 * rel_err(plain_low_precision(case, x64.to(torch.float32)), ref) + 1e-5
    got = _loss_grads(case, x, out, None)
    xr = x64.to(torch.float64, requires_grad=True)
    want = _loss_grads(case, xr, expected(case, xr)[0], None)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-4


def test_auto_serves_large_head_dims_on_cpu():
    """D = 256 (Gemma) runs through auto on CPU tensors without an error."""
    case = head_dim_cases()[1]
    x = make_inputs(case).to(torch.float32)
    out = la.taylor_attention(x.q, x.k, x.v, causal=True)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(os.environ.get("LINATTN_TEST_SLOW") != "1", reason="set LINATTN_TEST_SLOW=1")
def test_gradcheck_every_case_cpu():
    """Numerical gradients (float64) through every case's op, states included (slow: opt-in)."""
    if "cpu" not in dispatch.available_backends("cpu"):
        pytest.skip("no cpu kernels")
    for case in CASES:
        if case.size > 50_000:
            continue
        x = make_inputs(case).to(torch.float64, requires_grad=True)

        def f(*ts):
            y = type(x)(*ts[:3], x.mask, x.cu_q, x.cu_k, la.TaylorState(*ts[3:]) if x.state is not None else None)
            out, st = _call(case, y, "cpu")
            return (out,) + ((st.kv, st.k_sum) if st is not None else ())

        assert torch.autograd.gradcheck(f, tuple(x.tensors()), eps=1e-6, atol=1e-6), case.id
