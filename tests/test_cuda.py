"""The CUDA kernels (csrc/cuda) against the float64 reference: forward, backward, prefill, decode step, opcheck.

Every test is marked ``gpu`` and runs on a CUDA device when the extension has CUDA kernels. Outputs are
poisoned with NaN before each call (LINATTN_POISON_OUTPUTS=1), so an element a kernel forgets shows up.

Tolerance rule (as in flash-attention's tests): the kernel's error against float64 is at most twice the error
of a plain PyTorch implementation in the same dtype (quadratic form, no upcast), plus a small atol.

``LINATTN_TEST_EMULATE=1`` runs the same cases on the CPU through csrc/cuda/emu: the kernels and their host
code compiled for a fiber-based CUDA emulator (each CUDA thread a fiber, warp shuffles and tf32 mma.sync
emulated from the PTX fragment layouts, random thread order between barriers, shared memory poisoned with
NaN). It is slow, so the largest cases are skipped there; opcheck and autograd need the real op and are
GPU-only.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from linattn_cuda.ops.taylor import naive as ref
from linattn_cuda.feature_map import feature_dim

EMULATE = os.environ.get("LINATTN_TEST_EMULATE", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.gpu


# ------------------------------------------------------------------------------------------------ backends


def _cuda_kernels_registered() -> bool:
    if not torch.cuda.is_available():
        return False
    from linattn_cuda._extension import has_kernel

    return has_kernel("CUDA")


@dataclass
class Ops:
    device: str
    fwd: object
    bwd: object
    prefill: object
    step: object
    emulated: bool


def _build_emulator():
    from torch.utils.cpp_extension import load

    import hashlib

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    build_dir = os.environ.get("LINATTN_EMU_BUILD_DIR", os.path.join(ROOT, "build", "emu"))
    os.makedirs(build_dir, exist_ok=True)
    # torch's JIT build only notices changes of the listed source: hash every kernel file into a flag, so that
    # an edit of any header rebuilds the emulator
    digest = hashlib.sha1()
    for folder, _, files in sorted(os.walk(os.path.join(ROOT, "csrc", "cuda"))):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return load(
        name="linattn_cuda_emu",
        sources=[os.path.join(ROOT, "csrc", "cuda", "emu", "emu_module.cpp")],
        extra_cflags=["-O2", "-fno-strict-aliasing", "-DLINATTN_EMULATE", f"-I{os.path.join(cuda_home, 'include')}",
                      f"-DLINATTN_EMU_SOURCES={digest.hexdigest()[:16]}"],
        build_directory=build_dir,
    )


def _family(device, fwd, bwd, step, emulated) -> Ops:
    """The op family (csrc/ops.cpp) as the dense fwd / bwd / prefill calls these cases make."""

    def fwd_(q, k, v, mask, causal, scale):
        return fwd(q, k, v, mask, None, None, None, None, causal, scale, False)[:2]

    def bwd_(g, q, k, v, mask, out, den, causal, scale):
        return bwd(g, None, None, q, k, v, mask, None, None, None, None, out, den, causal, scale)[:3]

    def prefill_(q, k, v, mask, kv, ks, scale):
        out, _, kv1, ks1 = fwd(q, k, v, mask, None, None, kv, ks, True, scale, True)
        return out, kv1, ks1

    return Ops(device, fwd_, bwd_, prefill_, step, emulated)


@pytest.fixture(scope="module")
def ops() -> Ops:
    if EMULATE:
        emu = _build_emulator()
        return _family("cpu", emu.taylor_fwd, emu.taylor_bwd, emu.taylor_step, True)
    if not _cuda_kernels_registered():
        pytest.skip("needs a CUDA device and linattn_cuda built with CUDA kernels")
    import linattn_cuda.ops.taylor.registration  # noqa: F401  (fake kernels and autograd)

    o = torch.ops.linattn_cuda
    return _family("cuda", o.taylor_fwd, o.taylor_bwd, o.taylor_step, False)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("LINATTN_POISON_OUTPUTS", "1")
    monkeypatch.delenv("LINATTN_CUDA_FORM", raising=False)
    monkeypatch.delenv("LINATTN_CUDA_TC", raising=False)
    monkeypatch.delenv("LINATTN_CUDA_DV_SLICE", raising=False)
    monkeypatch.delenv("LINATTN_CUDA_SEGMENTS", raising=False)


# ------------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    causal: bool
    mask: str = ""  # "", "mask" (random padding) or "fullmask" (some queries see no key at all)

    @property
    def id(self) -> str:
        length = f"L{self.Lq}" if self.Lq == self.Lk else f"Lq{self.Lq}-Lk{self.Lk}"
        parts = [f"B{self.B}", f"H{self.H}", length, f"D{self.D}", f"Dv{self.Dv}"]
        if self.causal:
            parts.append("causal")
        if self.mask:
            parts.append(self.mask)
        return "-".join(parts)

    @property
    def work(self) -> int:  # a rough size for the emulator's budget
        return self.B * self.H * self.Lq * self.Lk * (self.D + self.Dv)


def C(B, H, L, D, Dv, causal=False, mask="", Lk=None):
    return Case(B, H, L, L if Lk is None else Lk, D, Dv, causal, mask)


CASES = [
    C(2, 3, 257, 16, 64, causal=True),
    C(2, 3, 257, 16, 64),
    C(1, 2, 1, 16, 16, causal=True),
    C(1, 2, 63, 24, 64, causal=True, mask="mask"),
    C(2, 2, 1000, 16, 64, causal=True, mask="mask"),
    C(1, 1, 4097, 16, 64, causal=True),
    C(1, 2, 257, 64, 256, causal=True),
    C(1, 1, 257, 128, 16),
    C(2, 1, 63, 1, 16, causal=True),
    C(1, 2, 1000, 1, 256, mask="mask"),
    C(2, 2, 63, 16, 64, mask="mask", Lk=257),
    C(1, 1, 257, 24, 16, Lk=1000),
    C(2, 2, 257, 16, 64, causal=True, mask="fullmask"),
    C(2, 1, 130, 32, 40, mask="fullmask"),
    C(1, 1, 1000, 128, 64, causal=True),
    C(1, 1, 4097, 16, 256),
    C(1, 3, 127, 5, 17, causal=True, mask="mask"),
]

def _emu_cost(case: Case, dtype, form: str = "auto") -> float:
    """Rough seconds the CPU emulator needs for one forward call (quadratic or tensor-core linear form)."""
    quad = case.B * case.H * case.Lq * case.Lk * (case.D + case.Dv) / 1.3e7
    m = feature_dim(case.D)
    lin = case.B * case.H * max(case.Lq, case.Lk) * m * (case.Dv + 8) / 4e6
    if dtype == torch.float32:
        lin *= 3.0  # 3xTF32: three mma per product
    if form == "quadratic":
        return quad
    return max(quad, lin) if form == "auto" else lin


EMU_SECONDS = 12.0


def _skip_if_too_big(case: Case, ops: Ops, dtype=torch.bfloat16, form: str = "auto", factor: float = 1.0):
    if ops.emulated and _emu_cost(case, dtype, form) * factor > EMU_SECONDS:
        pytest.skip("too large for the CPU emulator")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# atol relative to the largest reference magnitude, added to 2x the plain implementation's error.
# fp32: the tensor-core paths run 3xTF32 (tf32-rounded features, P and state as mma operands); on an H200 their
# largest errors were 6.5e-6 x max|ref| (dq) and 1.4e-5 relative on den over 4097 keys, hence 1e-5 / 5e-5.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
DEN_RTOL_FP32 = 5e-5


def make_inputs(case: Case, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.H, case.Lq, case.D, generator=g)
    k = torch.randn(case.B, case.H, case.Lk, case.D, generator=g)
    v = torch.randn(case.B, case.H, case.Lk, case.Dv, generator=g)
    mask = None
    if case.mask == "mask":
        mask = torch.rand(case.B, case.Lk, generator=g) < 0.3
    elif case.mask == "fullmask":
        mask = torch.zeros(case.B, case.Lk, dtype=torch.bool)
        mask[0, : min(case.Lk, 37)] = True  # causal queries 0..36 of batch 0 see nothing
        mask[-1, :] = True  # the last batch sees nothing at all
    to = dict(device=device, dtype=dtype)
    q, k, v = q.to(**to), k.to(**to), v.to(**to)
    return q, k, v, (None if mask is None else mask.to(device))


def reference_fwd(q, k, v, causal, scale, mask):
    """float64 output and normalizer of the exact quadratic form."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * scale
    w = 1 + s + 0.5 * s * s
    if causal:
        w = w * torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        w = w.masked_fill(mask[:, None, None, :], 0)
    den = w.sum(-1)
    out = ref.taylor_attention_quadratic(q, k, v, causal=causal, scale=scale, key_padding_mask=mask)
    return out, den


def plain_attention(q, k, v, causal, scale, mask):
    """The plain PyTorch implementation in the inputs' dtype (no upcast): the yardstick of the tolerance rule."""
    s = (q @ k.transpose(-1, -2)) * scale
    w = 1 + s + 0.5 * s * s
    if causal:
        vis = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        w = w.masked_fill(~vis, 0)
    if mask is not None:
        w = w.masked_fill(mask[:, None, None, :], 0)
    den = w.sum(-1, keepdim=True)
    ok = den != 0
    return torch.where(ok, (w @ v) / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))


def assert_close_rule(name, got, expected64, plain, dtype):
    """|got - ref| <= 2 |plain - ref| + atol * max|ref| (elementwise maxima), and no NaN."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's output (an unwritten element?)"
    exp = expected64.double()
    err = (got.double() - exp).abs().max().item() if got.numel() else 0.0
    plain_err = (plain.double() - exp).abs().max().item() if plain.numel() else 0.0
    scale = exp.abs().max().item() if exp.numel() else 0.0
    if not math.isfinite(plain_err):  # the plain implementation overflowed: fall back to a fixed bound
        plain_err = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5) * max(scale, 1.0)
    tol = 2.0 * plain_err + ATOL[dtype] * max(scale, 1.0)
    assert err <= tol, f"{name}: max error {err:.3e} > tol {tol:.3e} (plain {dtype} error {plain_err:.3e}, |ref| {scale:.3e})"


def _set_form(monkeypatch, form: str, dv_slice: Optional[int] = None):
    """auto | quadratic | linear (tensor cores where supported) | quadratic-simt | linear-simt (CUDA cores)."""
    if form.endswith("-simt"):
        monkeypatch.setenv("LINATTN_CUDA_TC", "0")
        form = form[: -len("-simt")]
    if form != "auto":
        monkeypatch.setenv("LINATTN_CUDA_FORM", form)
    if dv_slice is not None:
        monkeypatch.setenv("LINATTN_CUDA_DV_SLICE", str(dv_slice))


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("form", ["auto", "quadratic", "linear", "quadratic-simt", "linear-simt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward(ops, monkeypatch, case, dtype, form):
    _skip_if_too_big(case, ops, dtype, form.replace("-simt", ""), factor=3.0 if form.endswith("-simt") else 1.0)
    _set_form(monkeypatch, form)
    q, k, v, mask = make_inputs(case, dtype, ops.device)
    scale = case.D**-0.5
    out, den = ops.fwd(q, k, v, mask, case.causal, scale)
    assert out.dtype == dtype and out.shape == (case.B, case.H, case.Lq, case.Dv)
    assert den.dtype == torch.float32 and den.shape == (case.B, case.H, case.Lq)
    out64, den64 = reference_fwd(q, k, v, case.causal, scale, mask)
    plain = plain_attention(q, k, v, case.causal, scale, mask)
    assert_close_rule("out", out, out64, plain, dtype)
    assert not torch.isnan(den).any(), "den: NaN (an unwritten element?)"
    rtol = DEN_RTOL_FP32 if dtype == torch.float32 else 2e-3  # den sees exact inputs; only the kernel's rounding
    torch.testing.assert_close(den.double(), den64, rtol=rtol, atol=1e-6)
    if mask is not None and case.mask == "fullmask":
        nothing = den64 == 0
        assert nothing.any()
        assert (out[nothing] == 0).all() and (den[nothing] == 0).all(), "a query that sees no key must give 0"


@pytest.mark.parametrize("dv_slice", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(
    "case",
    [C(2, 2, 200, 16, 96, causal=True, mask="mask"), C(1, 3, 150, 16, 250, causal=True), C(1, 2, 190, 9, 64)],
    ids=lambda c: c.id,
)
def test_forward_dv_slices(ops, monkeypatch, case, dtype, dv_slice):
    """The tensor-core kernel with 32 and 64 value columns per block (partial last slices included)."""
    _set_form(monkeypatch, "linear", dv_slice)
    q, k, v, mask = make_inputs(case, dtype, ops.device, seed=1)
    scale = 0.3
    out, den = ops.fwd(q, k, v, mask, case.causal, scale)
    out64, den64 = reference_fwd(q, k, v, case.causal, scale, mask)
    assert_close_rule("out", out, out64, plain_attention(q, k, v, case.causal, scale, mask), dtype)
    torch.testing.assert_close(den.double(), den64, rtol=DEN_RTOL_FP32 if dtype == torch.float32 else 2e-3, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("form", ["quadratic", "linear"])
def test_forward_float64(ops, monkeypatch, causal, form):
    _set_form(monkeypatch, form)
    case = C(2, 2, 97, 7, 33, causal=causal, mask="mask")
    q, k, v, mask = make_inputs(case, torch.float64, ops.device)
    out, den = ops.fwd(q, k, v, mask, causal, 0.4)
    out64, den64 = reference_fwd(q, k, v, causal, 0.4, mask)
    assert den.dtype == torch.float64
    torch.testing.assert_close(out, out64, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(den, den64, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["quadratic", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_forward_noncontiguous(ops, monkeypatch, dtype, form):
    """[B, L, H, D] memory viewed as [B, H, L, D], a non-contiguous mask, a large scale."""
    _set_form(monkeypatch, form)
    B, H, L, D, Dv = 2, 3, 100, 16, 48
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, L, H, D, generator=g).to(ops.device, dtype).transpose(1, 2)
    k = torch.randn(B, L, H, D, generator=g).to(ops.device, dtype).transpose(1, 2)
    v = torch.randn(B, L, H, 2 * Dv, generator=g).to(ops.device, dtype).transpose(1, 2)[..., ::2]
    mask = (torch.rand(L, B, generator=g) < 0.2).to(ops.device).t()
    assert not q.is_contiguous() and not v.is_contiguous() and not mask.is_contiguous()
    for causal in (False, True):
        out, _ = ops.fwd(q, k, v, mask, causal, 1.0)
        out64, _ = reference_fwd(q, k, v, causal, 1.0, mask)
        assert_close_rule("out", out, out64, plain_attention(q, k, v, causal, 1.0, mask), dtype)


def test_forward_empty(ops):
    dev = ops.device
    q = torch.randn(1, 2, 5, 4, device=dev)
    k0 = torch.randn(1, 2, 0, 4, device=dev)
    v0 = torch.randn(1, 2, 0, 3, device=dev)
    out, den = ops.fwd(q, k0, v0, None, False, 0.5)
    assert out.shape == (1, 2, 5, 3) and (out == 0).all() and (den == 0).all()
    q0 = torch.randn(0, 2, 5, 4, device=dev)
    out, den = ops.fwd(q0, q0, torch.randn(0, 2, 5, 3, device=dev), None, True, 0.5)
    assert out.shape == (0, 2, 5, 3) and den.shape == (0, 2, 5)


# ------------------------------------------------------------------------------------------------ backward


BWD_CASES = [c for c in CASES if c.Lq * c.Lk <= 1_100_000] + [C(1, 1, 4097, 16, 64, causal=True, mask="mask")]


def reference_grads(q, k, v, causal, scale, mask, dout):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = ref.taylor_attention_quadratic(q64, k64, v64, causal=causal, scale=scale, key_padding_mask=mask)
    return torch.autograd.grad(out, (q64, k64, v64), dout.double())


def plain_grads(q, k, v, causal, scale, mask, dout):
    qp, kp, vp = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = plain_attention(qp, kp, vp, causal, scale, mask)
    return torch.autograd.grad(out, (qp, kp, vp), dout)


def _check_backward(ops, case, dtype, scale=None, seed=0):
    q, k, v, mask = make_inputs(case, dtype, ops.device, seed=seed)
    scale = case.D**-0.5 if scale is None else scale
    out, den = ops.fwd(q, k, v, mask, case.causal, scale)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(ops.device, dtype)
    dq, dk, dv = ops.bwd(dout, q, k, v, mask, out, den, case.causal, scale)
    expected = reference_grads(q, k, v, case.causal, scale, mask, dout)
    plain = plain_grads(q, k, v, case.causal, scale, mask, dout)
    for name, got, exp, pl in zip(("dq", "dk", "dv"), (dq, dk, dv), expected, plain):
        assert got.dtype == dtype and got.shape == exp.shape
        assert_close_rule(name, got, exp, pl, dtype)
    if mask is not None:
        masked = mask[:, None, :].expand(case.B, case.H, case.Lk)
        assert (dk[masked] == 0).all() and (dv[masked] == 0).all(), "masked keys must get zero gradients"


@pytest.mark.parametrize("form", ["quadratic", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: c.id)
def test_backward(ops, monkeypatch, case, dtype, form):
    """The backward of both forms (the linear one: tensor-core chunked kernels for D <= 32)."""
    _skip_if_too_big(case, ops, dtype, form, factor=3.0)
    _set_form(monkeypatch, form)
    _check_backward(ops, case, dtype)


@pytest.mark.parametrize("dv_slice", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(
    "case",
    [C(2, 2, 200, 16, 96, causal=True, mask="mask"), C(1, 2, 150, 16, 250, causal=True, mask="fullmask"),
     C(1, 2, 90, 9, 64, mask="mask", Lk=130), C(2, 1, 100, 24, 72, causal=True, mask="mask")],
    ids=lambda c: c.id,
)
def test_backward_dv_slices(ops, monkeypatch, case, dtype, dv_slice):
    """The chunked backward with 32 and 64 value columns per block: dq and dk summed over slices."""
    _set_form(monkeypatch, "linear", dv_slice)
    _check_backward(ops, case, dtype, scale=0.3, seed=1)


def test_backward_float64(ops):
    case = C(2, 2, 70, 6, 20, causal=True, mask="fullmask")
    q, k, v, mask = make_inputs(case, torch.float64, ops.device)
    out, den = ops.fwd(q, k, v, mask, True, 0.7)
    dout = torch.randn_like(out)
    got = ops.bwd(dout, q, k, v, mask, out, den, True, 0.7)
    for g_, e in zip(got, reference_grads(q, k, v, True, 0.7, mask, dout)):
        torch.testing.assert_close(g_, e, rtol=1e-9, atol=1e-11)


def test_backward_noncontiguous_grad(ops):
    """grad_out as autograd often delivers it: expanded (stride 0)."""
    case = C(1, 2, 50, 8, 16, causal=True)
    q, k, v, _ = make_inputs(case, torch.float32, ops.device)
    out, den = ops.fwd(q, k, v, None, True, 0.5)
    dout = torch.ones(1, 1, 1, 1, device=ops.device).expand_as(out)
    got = ops.bwd(dout, q, k, v, None, out, den, True, 0.5)
    for g_, e in zip(got, reference_grads(q, k, v, True, 0.5, None, dout)):
        torch.testing.assert_close(g_.double(), e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ segments


SEG_CASES = [C(1, 2, 300, 16, 40, causal=True, mask="mask"), C(1, 1, 257, 24, 64, causal=True, mask="fullmask"),
             C(2, 1, 520, 5, 17, causal=True), C(1, 2, 300, 16, 40, mask="mask"),
             C(1, 1, 130, 24, 24, mask="fullmask", Lk=330), C(1, 1, 330, 7, 70, Lk=130)]


@pytest.mark.parametrize("segments", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", SEG_CASES, ids=lambda c: c.id)
def test_segments(ops, monkeypatch, case, dtype, segments):
    """The chunked kernels split in sequence segments (parallelism beyond batch * heads): forward, backward,
    and (causal) prefill from a state, whose final state comes from the segments' states."""
    _set_form(monkeypatch, "linear")
    monkeypatch.setenv("LINATTN_CUDA_SEGMENTS", str(segments))
    q, k, v, mask = make_inputs(case, dtype, ops.device, seed=6)
    scale = case.D**-0.5
    out, den = ops.fwd(q, k, v, mask, case.causal, scale)
    out64, den64 = reference_fwd(q, k, v, case.causal, scale, mask)
    assert_close_rule("out", out, out64, plain_attention(q, k, v, case.causal, scale, mask), dtype)
    torch.testing.assert_close(den.double(), den64, rtol=DEN_RTOL_FP32 if dtype == torch.float32 else 2e-3, atol=1e-6)
    _check_backward(ops, case, dtype, scale=scale, seed=6)
    if not case.causal:
        return
    state = _random_state(case.B, case.H, case.D, case.Dv, torch.float32, ops.device)
    outp, kv, ks = ops.prefill(q, k, v, mask, state[0], state[1], scale)
    outp64, st64 = ref.taylor_attention_chunked(q.double(), k.double(), v.double(), scale=scale,
                                                key_padding_mask=mask,
                                                initial_state=ref.TaylorState(state[0].double(), state[1].double()))
    assert_close_rule("prefill out", outp, outp64, outp64.to(dtype), dtype)
    _state_close((kv, ks), st64, dtype)


# ------------------------------------------------------------------------------------------------ prefill, step


PREFILL_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _state_close(got, exp, dtype):
    kv, ks = got
    kv_e, ks_e = exp
    assert not torch.isnan(kv).any() and not torch.isnan(ks).any()
    rtol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 3e-3)
    for g_, e in ((kv, kv_e), (ks, ks_e)):
        scale = e.abs().max().item()
        err = (g_.double() - e.double()).abs().max().item()
        assert err <= rtol * max(scale, 1.0), f"state error {err:.3e} vs |state| {scale:.3e}"


def _random_state(B, H, D, Dv, dtype, device, n=20, seed=5):
    """The state of a random prefix of n tokens (float64 reference)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, n, Dv, generator=g, dtype=torch.float64)
    _, st = ref.taylor_attention_chunked(k, k, v, scale=D**-0.5)
    return st.kv.to(device, dtype), st.k_sum.to(device, dtype)


@pytest.mark.parametrize("form", ["auto", "quadratic", "quadratic-simt"])
@pytest.mark.parametrize("dtype", PREFILL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(
    "case",
    [C(2, 2, 130, 16, 64, causal=True, mask="mask"), C(1, 2, 1, 24, 16, causal=True), C(1, 1, 257, 64, 32, causal=True),
     C(2, 1, 70, 3, 200, causal=True, mask="fullmask")],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "from_state"])
def test_prefill(ops, monkeypatch, case, dtype, form, with_state):
    _set_form(monkeypatch, form)
    q, k, v, mask = make_inputs(case, dtype, ops.device, seed=2)
    scale = case.D**-0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = _random_state(case.B, case.H, case.D, case.Dv, acc, ops.device) if with_state else (None, None)
    out, kv, ks = ops.prefill(q, k, v, mask, state[0], state[1], scale)
    M = feature_dim(case.D)
    assert out.dtype == dtype and kv.shape == (case.B, case.H, M, case.Dv) and ks.shape == (case.B, case.H, M)
    assert kv.dtype == acc and ks.dtype == acc
    init = None if not with_state else ref.TaylorState(state[0].double(), state[1].double())
    out64, st64 = ref.taylor_attention_chunked(q.double(), k.double(), v.double(), scale=scale, key_padding_mask=mask,
                                               initial_state=init)
    if with_state:
        plain = out64.to(dtype)  # no plain quadratic form with a state: rounding the exact result is the yardstick
    else:
        plain = plain_attention(q, k, v, True, scale, mask)
    assert_close_rule("out", out, out64, plain, dtype)
    _state_close((kv, ks), st64, dtype)


def test_prefill_state_dtype(ops):
    """A float64 state with float32 inputs comes back as float64 (as the fake kernel says)."""
    case = C(1, 2, 40, 4, 8, causal=True)
    q, k, v, _ = make_inputs(case, torch.float32, ops.device)
    kv0, ks0 = _random_state(1, 2, 4, 8, torch.float64, ops.device)
    out, kv, ks = ops.prefill(q, k, v, None, kv0, ks0, 0.5)
    assert kv.dtype == torch.float64 and ks.dtype == torch.float64
    out64, st64 = ref.taylor_attention_chunked(q.double(), k.double(), v.double(), scale=0.5,
                                               initial_state=ref.TaylorState(kv0, ks0))
    torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=1e-5)
    _state_close((kv, ks), st64, torch.float32)


@pytest.mark.parametrize("dtype", PREFILL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("D,Dv", [(16, 64), (24, 16), (64, 32), (1, 256)], ids=lambda x: str(x))
def test_step_matches_reference(ops, dtype, D, Dv):
    B, H = 2, 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kv0, ks0 = _random_state(B, H, D, Dv, acc, ops.device)
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(B, H, D, generator=g).to(ops.device, dtype) for _ in range(2))
    v = torch.randn(B, H, Dv, generator=g).to(ops.device, dtype)
    out, kv, ks = ops.step(q, k, v, kv0, ks0, D**-0.5)
    out64, st = ref.taylor_attention_step_reference(q.double(), k.double(), v.double(),
                                                    ref.TaylorState(kv0.double(), ks0.double()), scale=D**-0.5)
    assert out.dtype == dtype and kv.dtype == acc
    assert_close_rule("out", out, out64, out64.to(dtype), dtype)
    _state_close((kv, ks), st, dtype)
    assert kv.data_ptr() != kv0.data_ptr(), "the step must return a new state"


@pytest.mark.parametrize("BH", [5, 70000], ids=lambda n: f"BH{n}")
def test_step_grid_over_many_heads(ops, BH):
    """The step's grid is flat over (batch*head, row block): more than 65535 batch*heads work (the grid's y
    dimension would stop there). D = 16 (M = 153: 5 row blocks), Dv = 3."""
    if ops.emulated and BH > 100:
        pytest.skip("too large for the CPU emulator")
    D, Dv = 16, 3
    kv0, ks0 = _random_state(1, BH, D, Dv, torch.float32, ops.device, n=2)  # a 2-token prefix: small in float64
    g = torch.Generator().manual_seed(12)
    q, k = (torch.randn(1, BH, D, generator=g).to(ops.device) for _ in range(2))
    v = torch.randn(1, BH, Dv, generator=g).to(ops.device)
    out, kv, ks = ops.step(q, k, v, kv0, ks0, D**-0.5)
    out64, st = ref.taylor_attention_step_reference(q.double(), k.double(), v.double(),
                                                    ref.TaylorState(kv0.double(), ks0.double()), scale=D**-0.5)
    assert_close_rule("out", out, out64, out64.float(), torch.float32)
    _state_close((kv, ks), st, torch.float32)


@pytest.mark.parametrize("dtype", PREFILL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("D,Dv", [(16, 64), (5, 40), (32, 16)], ids=lambda x: str(x))
def test_prefill_then_steps_equals_causal(ops, dtype, D, Dv):
    """prefill over L tokens, then n decode steps == causal attention over L + n tokens (and its state)."""
    B, H, L, n = 2, 2, 77, 5
    case = C(B, H, L + n, D, Dv, causal=True)
    q, k, v, _ = make_inputs(case, dtype, ops.device, seed=4)
    scale = D**-0.5
    out_p, kv, ks = ops.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], None, None, None, scale)
    outs = [out_p]
    for t in range(L, L + n):
        o, kv, ks = ops.step(q[:, :, t], k[:, :, t], v[:, :, t], kv, ks, scale)
        outs.append(o.unsqueeze(2))
    out = torch.cat(outs, dim=2)
    out64, st64 = ref.taylor_attention_chunked(q.double(), k.double(), v.double(), scale=scale)
    assert_close_rule("out", out, out64, plain_attention(q, k, v, True, scale, None), dtype)
    _state_close((kv, ks), st64, dtype)


def test_step_equals_one_token_prefill(ops):
    B, H, D, Dv = 2, 2, 16, 64
    kv0, ks0 = _random_state(B, H, D, Dv, torch.float32, ops.device)
    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(B, H, D, generator=g).to(ops.device) for _ in range(2))
    v = torch.randn(B, H, Dv, generator=g).to(ops.device)
    o1, kv1, ks1 = ops.step(q, k, v, kv0, ks0, 0.25)
    o2, kv2, ks2 = ops.prefill(q[:, :, None], k[:, :, None], v[:, :, None], None, kv0, ks0, 0.25)
    torch.testing.assert_close(o1, o2[:, :, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kv1, kv2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ks1, ks2, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ argument checks


def test_argument_checks(ops):
    """Bad arguments to the ops raise errors naming the argument. On CUDA the checks run in a child process:
    on an H200 (torch 2.11) the first call below crashed the whole pytest process with SIGSEGV (open bug), and a
    crash must fail this test, not end the session."""
    if ops.emulated or os.environ.get("LINATTN_ARGCHECK_CHILD") == "1":
        _argument_checks(ops)
        return
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_argument_checks"],
        env={**os.environ, "LINATTN_ARGCHECK_CHILD": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, f"exit code {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def _argument_checks(ops):
    dev = ops.device
    q = torch.randn(1, 2, 8, 4, device=dev)
    v = torch.randn(1, 2, 8, 3, device=dev)
    with pytest.raises(RuntimeError, match=r"q must have shape \[B, H, Lq, D\]"):
        ops.fwd(q[0], q, v, None, False, 0.5)
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        ops.fwd(q, q.double(), v, None, False, 0.5)
    with pytest.raises(RuntimeError, match="D <= 128"):
        big = torch.randn(1, 1, 2, 129, device=dev)
        ops.fwd(big, big, torch.randn(1, 1, 2, 3, device=dev), None, False, 0.5)
    with pytest.raises(RuntimeError, match="Dv <= 256"):
        ops.fwd(q, q, torch.randn(1, 2, 8, 257, device=dev), None, False, 0.5)
    with pytest.raises(RuntimeError, match="causal attention needs Lq == Lk"):
        ops.fwd(q[:, :, :4], q, v, None, True, 0.5)
    with pytest.raises(RuntimeError, match="key_padding_mask must have dtype torch.bool"):
        ops.fwd(q, q, v, torch.zeros(1, 8, device=dev), False, 0.5)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \[B, Lk\]"):
        ops.fwd(q, q, v, torch.zeros(1, 7, dtype=torch.bool, device=dev), False, 0.5)
    with pytest.raises(RuntimeError, match="scale must be a finite positive number"):
        ops.fwd(q, q, v, None, False, float("nan"))
    with pytest.raises(RuntimeError, match="kv and k_sum must be given together"):
        ops.prefill(q, q, v, None, torch.zeros(1, 2, 15, 3, device=dev), None, 0.5)
    with pytest.raises(RuntimeError, match=r"kv must have shape \[B, H, M, Dv\]"):
        ops.prefill(q, q, v, None, torch.zeros(1, 2, 14, 3, device=dev), torch.zeros(1, 2, 14, device=dev), 0.5)
    with pytest.raises(RuntimeError, match="kv must be float32 or float64"):
        ops.step(q[:, :, 0], q[:, :, 0], v[:, :, 0], torch.zeros(1, 2, 15, 3, device=dev, dtype=torch.half),
                 torch.zeros(1, 2, 15, device=dev, dtype=torch.half), 0.5)
    with pytest.raises(RuntimeError, match="den must be"):
        ops.bwd(v, q, q, v, None, v, torch.zeros(1, 2, 8, device=dev, dtype=torch.float64), False, 0.5)
    if not ops.emulated:
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            ops.fwd(q.cpu(), q, v, None, False, 0.5)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("form", ["quadratic", "linear", "linear-seg3", "quadratic-simt", "linear-simt"])
def test_padded_keys_may_hold_nan_and_inf(ops, monkeypatch, form, causal):
    """Padded keys load as 0 in every kernel: NaN in their k and inf in their v change nothing (outputs,
    normalizer, the gradients of the other positions, the prefill state)."""
    if form.endswith("-seg3"):
        monkeypatch.setenv("LINATTN_CUDA_SEGMENTS", "3")
        form = form[: -len("-seg3")]
    _set_form(monkeypatch, form)
    case = C(2, 2, 150, 16, 24, causal=causal, mask="mask")
    q, k, v, mask = make_inputs(case, torch.bfloat16, ops.device, seed=5)
    mask[0, 10:90] = True  # a run of padding across blocks and chunks
    pad = mask[:, None, :, None]
    g = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=torch.Generator().manual_seed(6)).to(q)
    scale = case.D**-0.5
    runs = []
    for kk, vv in ((k, v), (k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")))):
        out, den = ops.fwd(q, kk, vv, mask, causal, scale)
        dq, dk, dv = ops.bwd(g, q, kk, vv, mask, out, den, causal, scale)
        res = [out, den, dq, torch.where(pad, 0.0, dk), torch.where(pad, 0.0, dv)]
        if causal:
            res += list(ops.prefill(q, kk, vv, mask, None, None, scale))
        runs.append(res)
    for name, good, bad in zip(["out", "den", "dq", "dk", "dv", "prefill out", "kv", "k_sum"], *runs):
        assert torch.isfinite(bad).all(), f"{name}: non-finite values"
        # the dtype's default tolerance, not bit equality: on a GPU the backward's shared-memory atomics may sum
        # in another order from one call to the next
        torch.testing.assert_close(bad, good, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------ GPU-only


def _gpu_only(ops):
    if ops.emulated:
        pytest.skip("needs the registered CUDA op")


OPCHECK_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_opcheck(ops, dtype, causal):
    _gpu_only(ops)
    case = C(2, 2, 70, 16, 24, causal=causal, mask="mask")
    q, k, v, mask = make_inputs(case, dtype, "cuda")
    o = torch.ops.linattn_cuda
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(o.taylor_fwd.default, (qg, kg, vg, mask, causal, 0.25))
    out, den = o.taylor_fwd(q, k, v, mask, causal, 0.25)
    torch.library.opcheck(o.taylor_bwd.default, (torch.randn_like(out), q, k, v, mask, out, den, causal, 0.25))
    if causal:
        kv0, ks0 = _random_state(2, 2, 16, 24, torch.float32, "cuda")
        torch.library.opcheck(o.taylor_prefill.default, (q, k, v, mask, kv0, ks0, 0.25))
        torch.library.opcheck(o.taylor_prefill.default, (q, k, v, None, None, None, 0.25))
        torch.library.opcheck(o.taylor_step.default, (q[:, :, 0], k[:, :, 0], v[:, :, 0], kv0, ks0, 0.25))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_autograd_through_public_api(ops, causal):
    """taylor_attention(backend="cuda") is differentiable and matches the float64 reference."""
    _gpu_only(ops)
    from linattn_cuda import taylor_attention

    case = C(2, 2, 150, 16, 32, causal=causal, mask="mask")
    q, k, v, mask = make_inputs(case, torch.float32, "cuda")
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = taylor_attention(qg, kg, vg, causal=causal, key_padding_mask=mask, backend="cuda")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    for g_, e in zip(grads, reference_grads(q, k, v, causal, 0.25, mask, dout)):
        torch.testing.assert_close(g_.double(), e, rtol=1e-4, atol=2e-5)


def test_current_stream_and_device_guard(ops):
    """Kernels run on the caller's current stream (results consistent when consumed on that stream)."""
    _gpu_only(ops)
    case = C(1, 2, 300, 16, 64, causal=True)
    q, k, v, _ = make_inputs(case, torch.bfloat16, "cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out, _ = torch.ops.linattn_cuda.taylor_fwd(q, k, v, None, True, 0.25)
        copy = out.clone()
    s.synchronize()
    out64, _ = reference_fwd(q, k, v, True, 0.25, None)
    assert_close_rule("out", copy, out64, plain_attention(q, k, v, True, 0.25, None), torch.bfloat16)
