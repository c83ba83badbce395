"""Tests of the Triton kernels (linattn_cuda/ops/taylor/triton) against the float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
at small odd shapes. With a GPU the same tests run on CUDA, and the ``gpu``-marked ones add real sizes,
``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``. Kernel outputs are NaN-poisoned
(LINATTN_POISON_OUTPUTS=1), so an element a kernel forgets to write fails the finiteness check.

    pytest tests/test_triton.py                 # CPU: interpreter, ~minutes
    pytest tests/test_triton.py -m gpu          # GPU: real sizes only
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from linattn_cuda.ops.taylor import naive as ref
from linattn_cuda.feature_map import feature_dim

from .triton_cases import CI_CASES, GPU_CASES, PREFILL_CASES, STEP_CASES, Case, check_close, make_inputs, reference_fwd_bwd

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

triton = pytest.importorskip("triton")
if not HAS_CUDA and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

from linattn_cuda.ops.taylor.triton import chunk, common, ops, parallel, step  # noqa: E402  (after the interpreter switch)
import linattn_cuda as la  # noqa: E402
from linattn_cuda.ops.taylor.triton.backend import TritonBackend, choose_form  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("LINATTN_POISON_OUTPUTS", "1")


def run_fwd_bwd(case: Case, q, k, v, kpm, grad_out):
    """(out, dq, dk, dv) from the kernels: through the custom op and autograd, or the launchers when a
    case forces a chunk mode / size."""
    if case.fused is None and case.chunk is None and case.block_dv is None:
        qs, ks, vs = (x.detach().requires_grad_(True) for x in (q, k, v))
        out, den = torch.ops.linattn_cuda.triton_fwd(qs, ks, vs, kpm, case.causal, case.scale, case.form == "chunk")
        assert den.dtype == torch.float32
        dq, dk, dv = torch.autograd.grad(out, (qs, ks, vs), grad_out)
        return out.detach(), dq, dk, dv
    assert case.form == "chunk"
    opts = dict(chunk=case.chunk, fused=case.fused)
    out, den = chunk.chunk_fwd(q, k, v, kpm, case.causal, case.scale, block_dv=case.block_dv, **opts)
    dq, dk, dv = chunk.chunk_bwd(grad_out, q, k, v, kpm, out, den, case.causal, case.scale, **opts)
    return out, dq, dk, dv


def check_case(case: Case):
    q, k, v, kpm, grad_out = make_inputs(case, DEVICE)
    got = run_fwd_bwd(case, q, k, v, kpm, grad_out)
    want = reference_fwd_bwd(q, k, v, kpm, grad_out, case.causal, case.scale)
    lowp = [None] * 4
    if case.dtype != F32:
        lowp = reference_fwd_bwd(q, k, v, kpm, grad_out, case.causal, case.scale, lowp=True)
    problems = []  # check everything, then report every failure (forward and each gradient separately)
    for name, g, w, lp in zip(("out", "dq", "dk", "dv"), got, want, lowp):
        try:
            assert g.dtype == case.dtype, f"{case.id} {name}: dtype {g.dtype}, want {case.dtype}"
            check_close(name, g, w, lp, case_id=case.id)
            if case.mask == "fullrow":  # the last batch sees no key at all: exactly 0 and no gradient
                assert torch.count_nonzero(g[-1]) == 0, f"{case.id} {name}: the fully padded batch is not exactly 0"
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------------
# forward + backward of every kernel at small odd shapes (CPU interpreter on CI; also run on a GPU)
# ------------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("case", CI_CASES, ids=[c.id for c in CI_CASES])
def test_fwd_bwd(case):
    check_case(case)


def test_forms_agree():
    """Both forms on the same inputs (causal, masked), through the public API with backend="triton"."""
    import linattn_cuda

    case = Case(2, 2, 40, 40, 16, 24, causal=True, mask="random")
    q, k, v, kpm, _ = make_inputs(case, DEVICE)
    a, _ = ops.triton_fwd(q, k, v, kpm, True, case.scale, False)
    b, _ = ops.triton_fwd(q, k, v, kpm, True, case.scale, True)
    c = linattn_cuda.taylor_attention(q, k, v, causal=True, key_padding_mask=kpm, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_api_noncontiguous_and_grad():
    """The backend through the public API: non-contiguous (strided) inputs, gradients against the reference."""
    import linattn_cuda

    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 19, 3, 3 * 16, generator=g).to(DEVICE).requires_grad_(True)  # [B, L, H, 3 D]
    gout = torch.randn(2, 3, 19, 16, generator=g).to(DEVICE)

    def views(x):
        return [x[..., i * 16:(i + 1) * 16].transpose(1, 2) for i in range(3)]

    q, k, v = views(base)
    assert not q.is_contiguous()
    out = linattn_cuda.taylor_attention(q, k, v, causal=True, backend="triton")
    (grad,) = torch.autograd.grad(out, base, gout)
    base64 = base.detach().double().requires_grad_(True)
    want = ref.taylor_attention_quadratic(*views(base64), causal=True)
    (wgrad,) = torch.autograd.grad(want, base64, gout.double())
    check_close("out", out, want)
    check_close("dbase", grad, wgrad)


# ------------------------------------------------------------------------------------------------------
# the bfloat16 tensor-core path (MODE 1) on CPU: Triton's interpreter multiplies bfloat16 dot operands as
# raw bits (Triton 3.8), so the launchers give it float32 operands; patched here to run MODE 1 for real
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def bf16_dots(monkeypatch):
    if HAS_CUDA:
        pytest.skip("on a GPU every bfloat16 test runs this path")
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def up(x):  # bfloat16 is stored as uint16: widen to float32 exactly
        if x.dtype == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *args: create_dot(self, up(a), up(b), d, *args))

    def mode(dtype, chunked=False):
        return common.MODE_BF16 if dtype == BF16 else common.dot_mode(dtype, chunked)

    monkeypatch.setattr(parallel, "dot_mode", mode)
    monkeypatch.setattr(chunk, "dot_mode", mode)


BF16_CASES = [
    Case(2, 1, 33, 47, 16, 24, causal=False, mask="fullrow", dtype=BF16),
    Case(1, 2, 40, 40, 16, 64, causal=True, mask="random", dtype=BF16, form="chunk", fused=True, chunk=16),
    Case(2, 1, 24, 37, 5, 24, causal=False, mask="random", dtype=BF16, form="chunk", fused=False, chunk=16),
]


@pytest.mark.parametrize("case", BF16_CASES, ids=[c.id for c in BF16_CASES])
def test_bf16_tensor_core_path(bf16_dots, case):
    check_case(case)


def test_bf16_tensor_core_path_state(bf16_dots):
    """With bfloat16 operands the state update splits phi(k) = k_a k_b into hi + lo: the float32 state stays exact."""
    case = Case(1, 2, 37, 37, 16, 24, causal=True, mask="random", dtype=BF16, form="chunk", fused=True, chunk=16)
    q, k, v, kpm, _ = make_inputs(case, DEVICE)
    _, _, kv, ks = chunk.chunk_fwd(q, k, v, kpm, True, case.scale, write_state=True, chunk=16, fused=True)
    _, st = ref.taylor_attention_chunked(q.double(), k.double(), v.double(), scale=case.scale, key_padding_mask=kpm)
    check_close("kv", kv, st.kv, case_id=case.id)
    check_close("k_sum", ks, st.k_sum, case_id=case.id)


# ------------------------------------------------------------------------------------------------------
# prefill (state out, optional state in) and the decoding step
# ------------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c.id for c in PREFILL_CASES])
def test_prefill_state(case):
    """Prefill in two parts (the second from the first's state) == the float64 chunked reference, and
    the final state equals the reference state in feature_map.py's symmetric order."""
    q, k, v, kpm, _ = make_inputs(case, DEVICE)
    cut = case.lq // 2 + 1
    opts = dict(chunk=case.chunk, fused=case.fused)
    m1 = None if kpm is None else kpm[:, :cut]
    m2 = None if kpm is None else kpm[:, cut:]
    o1, _, kv1, ks1 = chunk.chunk_fwd(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], m1, True, case.scale, write_state=True, **opts)
    o2, _, kv2, ks2 = chunk.chunk_fwd(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], m2, True, case.scale,
                                      initial_state=(kv1, ks1), write_state=True, **opts)
    want, st = ref.taylor_attention_chunked(q.double(), k.double(), v.double(), scale=case.scale, key_padding_mask=kpm)
    m = feature_dim(case.d)
    assert kv2.shape == (case.b, case.h, m, case.dv) and ks2.shape == (case.b, case.h, m)
    assert kv2.dtype == torch.float32 and ks2.dtype == torch.float32
    out = torch.cat([o1, o2], dim=2)
    lowp = None
    if case.dtype != F32:
        lowp = reference_fwd_bwd(q, k, v, kpm, torch.zeros_like(out), True, case.scale, lowp=True)[0]
    check_close("out", out, want, lowp, case_id=case.id)
    check_close("kv", kv2, st.kv, case_id=case.id)
    check_close("k_sum", ks2, st.k_sum, case_id=case.id)


@pytest.mark.parametrize("block_m,block_dv,num_warps", [(16, 16, 1), (32, 64, 2), (256, 16, 4)])
def test_step_block_sizes(block_m, block_dv, num_warps):
    """The decode step with non-default block sizes (several value blocks; a partial last row block) ==
    the reference step."""
    g = torch.Generator().manual_seed(block_m * 100 + block_dv)
    b, h, d, dv = 2, 2, 16, 40
    m = feature_dim(d)
    q, k, v = (torch.randn(b, h, n, generator=g).to(DEVICE) for n in (d, d, dv))
    pk, pv = torch.randn(b, h, 5, d, generator=g).double(), torch.randn(b, h, 5, dv, generator=g).double()
    _, st = ref.taylor_attention_chunked(pk, pk, pv, scale=d**-0.5)
    out, kv, ks = step.step_fwd(q, k, v, st.kv.float().to(DEVICE), st.k_sum.float().to(DEVICE), d**-0.5,
                                block_m=block_m, block_dv=block_dv, num_warps=num_warps)
    want, wst = ref.taylor_attention_step_reference(q.double(), k.double(), v.double(), st, scale=d**-0.5)
    assert kv.shape == (b, h, m, dv)
    check_close("kv", kv, wst.kv)
    check_close("k_sum", ks, wst.k_sum)
    check_close("out", out, want)


@pytest.mark.parametrize("d,dv,dtype", STEP_CASES)
def test_step(d, dv, dtype):
    """One fused decoding step == the reference step, from a random float32 state."""
    g = torch.Generator().manual_seed(d * 1000 + dv)
    b, h, m = 2, 3, feature_dim(d)
    q, k = (torch.randn(b, h, d, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    v = torch.randn(b, h, dv, generator=g).to(dtype).to(DEVICE)
    # a state of a real prefix (k_sum must keep the normalizer positive)
    pk, pv = torch.randn(b, h, 7, d, generator=g).double(), torch.randn(b, h, 7, dv, generator=g).double()
    _, st = ref.taylor_attention_chunked(pk, pk, pv, scale=d**-0.5)
    state = ref.TaylorState(st.kv.float().to(DEVICE), st.k_sum.float().to(DEVICE))
    out, kv, ks = step.step_fwd(q, k, v, state.kv, state.k_sum, d**-0.5)
    want, wst = ref.taylor_attention_step_reference(q.double(), k.double(), v.double(),
                                                    ref.TaylorState(state.kv.double(), state.k_sum.double()), scale=d**-0.5)
    assert out.dtype == dtype and kv.dtype == torch.float32
    check_close("kv", kv, wst.kv)
    check_close("k_sum", ks, wst.k_sum)
    if dtype == F32:
        check_close("out", out, want)
    else:
        torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)


def test_prefill_then_steps_equals_causal():
    """taylor_attention_prefill over L tokens, then n taylor_attention_step calls == causal attention over L+n."""
    import linattn_cuda

    case = Case(2, 2, 21, 21, 16, 24, causal=True, form="chunk")
    n = 3
    q, k, v, _, _ = make_inputs(case, DEVICE, extra_len=n)
    full = linattn_cuda.taylor_attention(q, k, v, causal=True, backend="triton")
    L = case.lq
    out, state = linattn_cuda.taylor_attention_prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], backend="triton")
    outs = [out]
    for t in range(L, L + n):
        o, state = linattn_cuda.taylor_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, backend="triton")
        outs.append(o.unsqueeze(2))
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)
    want = ref.taylor_attention_quadratic(q.double(), k.double(), v.double(), causal=True)
    check_close("out", full, want)


# ------------------------------------------------------------------------------------------------------
# small units: form rule, availability, poisoning hook, dtype errors
# ------------------------------------------------------------------------------------------------------
def test_choose_form_rule():
    assert choose_form(8192, 8192, 16, 64, True) == "chunk"
    assert choose_form(512, 512, 16, 64, True) == "parallel"
    assert choose_form(8192, 8192, 64, 64, True) == "parallel"  # D > 16: M explodes
    assert choose_form(4096, 4096, 16, 64, False) == "chunk"
    assert choose_form(100000, 8, 16, 64, False) == "parallel"  # effective length ~16


def test_unavailable_reason():
    backend = TritonBackend()
    assert backend.unavailable_reason(DEVICE) is None
    assert "cuda" in backend.unavailable_reason("meta")


def test_poison_hook(monkeypatch):
    monkeypatch.setenv("LINATTN_POISON_OUTPUTS", "1")
    assert torch.isnan(common.new_output((3,), torch.float32, "cpu")).all()
    monkeypatch.setenv("LINATTN_POISON_OUTPUTS", "0")
    assert common.new_output((3,), torch.float32, "cpu").shape == (3,)


def test_float64_is_refused():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="the triton kernels take float16, bfloat16, float32 inputs, got float64"):
        la.taylor_attention(q, q, q, causal=True, backend="triton")


# ------------------------------------------------------------------------------------------------------
# GPU compilation without a GPU: every launch of the CI set compiled for sm_90 (Triton + ptxas)
# ------------------------------------------------------------------------------------------------------
def _has_nvidia_toolchain() -> bool:
    base = os.path.dirname(triton.__file__)
    return os.path.exists(os.path.join(base, "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled by the other tests")
@pytest.mark.skipif(not _has_nvidia_toolchain(), reason="triton without its NVIDIA toolchain")
@pytest.mark.parametrize("float_type", ["fp32", "fp64"], ids=["launcher-floats", "inductor-floats"])
def test_kernels_compile_for_sm90(float_type):
    """Every launch compiles for sm_90, also with float scalars typed fp64 as torch.compile passes them (found on
    an H200: a loop-carried fp32 accumulator became fp64 and the compiled graph failed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LINATTN_COMPILE_CHECK_FLOAT"] = float_type
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    res = subprocess.run([sys.executable, script, "--arch", "90"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]


# ------------------------------------------------------------------------------------------------------
# GPU only: real sizes, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------------



@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_gpu_fwd_bwd(case):
    check_case(case)


@gpu
@pytest.mark.gpu
def test_gpu_prefill_steps_bf16():
    import linattn_cuda

    case = Case(1, 8, 3000, 3000, 16, 64, causal=True, dtype=BF16, form="chunk")
    n = 4
    q, k, v, _, _ = make_inputs(case, "cuda", extra_len=n)
    L = case.lq
    out, state = linattn_cuda.taylor_attention_prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], backend="triton")
    outs = [out]
    for t in range(L, L + n):
        o, state = linattn_cuda.taylor_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, backend="triton")
        outs.append(o.unsqueeze(2))
    got = torch.cat(outs, dim=2)
    want = ref.taylor_attention_quadratic(q.double(), k.double(), v.double(), causal=True)
    lowp = reference_fwd_bwd(q, k, v, None, torch.zeros_like(got), True, case.scale, lowp=True)[0]
    check_close("out", got, want, lowp, case_id=case.id)
    _, st = ref.taylor_attention_chunked(q.double(), k.double(), v.double(), scale=case.scale)
    check_close("kv", state.kv, st.kv, case_id=case.id)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("chunked", [False, True], ids=["parallel", "chunk"])
def test_gpu_opcheck(chunked):
    q, k, v, kpm, _ = make_inputs(Case(2, 2, 70, 70, 16, 32, causal=True, mask="random", dtype=BF16), "cuda")
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    torch.library.opcheck(torch.ops.linattn_cuda.triton_fwd, (q, k, v, kpm, True, 0.25, chunked))
    qd, kd, vd = (x.detach() for x in (q, k, v))
    if chunked:
        m = feature_dim(16)
        kv = torch.randn(2, 2, m, 32, device="cuda")
        ks = torch.rand(2, 2, m, device="cuda") + 1
        torch.library.opcheck(torch.ops.linattn_cuda.triton_prefill, (qd, kd, vd, kpm, kv, ks, 0.25))
        torch.library.opcheck(torch.ops.linattn_cuda.triton_step, (qd[:, :, 0], kd[:, :, 0], vd[:, :, 0], kv, ks, 0.25))


def _compile_and_compare(f, case):
    compiled = torch.compile(f, fullgraph=True)
    q, k, v, _, _ = make_inputs(case, "cuda")
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q2, k2, v2 = (x.detach().requires_grad_(True) for x in (q, k, v))
    want = f(q2, k2, v2)
    wgrads = torch.autograd.grad(want, (q2, k2, v2))
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
    for got, exp in zip(grads, wgrads):
        torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_gpu_torch_compile_ops_fullgraph():
    """The custom ops under torch.compile(fullgraph=True): no graph break, same values and gradients."""

    def f(q, k, v):
        a = torch.ops.linattn_cuda.triton_fwd(q, k, v, None, True, 0.25, False)[0]
        b = torch.ops.linattn_cuda.triton_fwd(q, k, v, None, True, 0.25, True)[0]
        return (a.float() * b.float()).sum()

    _compile_and_compare(f, Case(2, 2, 300, 300, 16, 64, causal=True, dtype=BF16))


@gpu
@pytest.mark.gpu
def test_gpu_torch_compile_api_fullgraph():
    """taylor_attention(backend="triton") under torch.compile(fullgraph=True) (argument checks included)."""
    import linattn_cuda

    def f(q, k, v):
        return linattn_cuda.taylor_attention(q, k, v, causal=True, backend="triton").float().square().sum()

    _compile_and_compare(f, Case(2, 2, 300, 300, 16, 64, causal=True, dtype=BF16))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_chunk_padded_keys_may_hold_nan_and_inf(causal, fused):
    """The chunked kernels load a padded key as 0: NaN / inf there change nothing (outputs, the gradients of the
    other positions, the exported state)."""
    case = Case(2, 2, 45, 45, 16, 24, causal=causal, mask="random", form="chunk", fused=fused, chunk=16)
    q, k, v, kpm, grad_out = make_inputs(case, DEVICE)
    kpm[0, 3:25] = True
    pad = kpm[:, None, :, None]
    runs = []
    for kk, vv in ((k, v), (k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")))):
        got = list(run_fwd_bwd(case, q, kk, vv, kpm, grad_out))
        got[2], got[3] = torch.where(pad, 0.0, got[2]), torch.where(pad, 0.0, got[3])
        if causal:
            got += list(chunk.chunk_fwd(q, kk, vv, kpm, True, case.scale, write_state=True, chunk=16, fused=fused)[2:])
        runs.append(got)
    for name, good, bad in zip(("out", "dq", "dk", "dv", "kv", "k_sum"), *runs):
        assert torch.isfinite(bad).all(), f"{name} has non-finite values"
        torch.testing.assert_close(bad, good, msg=lambda s: f"{name}: {s}")  # GPU atomics may reorder sums
