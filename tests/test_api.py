"""Public API: argument errors, empty inputs, backend selection, torch.compile."""
import pytest
import torch

import linattn_cuda as la
from linattn_cuda._extension import has_kernel

from .helpers import make_inputs, max_rel_err, reference_out

CPU_BACKENDS = ["reference"] + (["cpu"] if has_kernel("CPU") else [])


def _qkv(b=2, h=3, lq=5, lk=5, d=4, dv=6, **kw):
    return make_inputs(b, h, lq, lk, d, dv, seed=123, **kw)[:3]


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have shape \[B, H, Lq, D\]"),
        (lambda q, k, v: (q, k[..., 0], v), ValueError, r"k must have shape \[B, H, Lk, D\]"),
        (lambda q, k, v: (q, k, v[0]), ValueError, r"v must have shape \[B, H, Lk, Dv\]"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k must have the batch and head sizes of q"),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, "v must have the batch and head sizes of q"),
        (lambda q, k, v: (q, k[..., :3], v), ValueError, "k must have the feature dim D of q"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "v must have the length Lk of k"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k must have the same dtype as q"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "q must be a floating-point tensor"),
        (lambda q, k, v: (q, k, v.to(torch.int32)), TypeError, "v must be a floating-point tensor"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v must be on the same device as q"),
    ],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_name_the_argument(mutate, exc, pattern, backend):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=pattern):
        la.taylor_attention(q, k, v, backend=backend)


def test_causal_needs_no_more_queries_than_keys():
    q, k, v = _qkv(lq=6, lk=4)
    with pytest.raises(ValueError, match=r"causal attention needs Lq <= Lk \(end-aligned"):
        la.taylor_attention(q, k, v, causal=True)


@pytest.mark.parametrize(
    "mask,exc,pattern",
    [
        (torch.zeros(2, 4, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \[B, Lk\] = \[2, 5\]"),
        (torch.zeros(2, 5), TypeError, "key_padding_mask must have dtype torch.bool"),
        (torch.zeros(2, 5, dtype=torch.bool, device="meta"), ValueError, "key_padding_mask must be on the same device"),
        ([[True] * 5] * 2, TypeError, "key_padding_mask must be a bool tensor"),
    ],
)
def test_bad_mask(mask, exc, pattern):
    q, k, v = _qkv()
    with pytest.raises(exc, match=pattern):
        la.taylor_attention(q, k, v, key_padding_mask=mask)


def test_head_dim_limits_of_fused_backends():
    if not has_kernel("CPU"):
        pytest.skip("extension not built")
    q, k, v = _qkv(d=257)
    with pytest.raises(NotImplementedError, match="D <= 256, got D = 257"):
        la.taylor_attention(q, k, v, backend="cpu")
    q, k, v = _qkv(dv=257)
    with pytest.raises(NotImplementedError, match="Dv <= 256, got Dv = 257"):
        la.taylor_attention(q, k, v, backend="cpu")
    out = la.taylor_attention(*_qkv(d=257), backend="reference")  # the reference has no limit
    assert out.shape == (2, 3, 5, 6)
    with pytest.warns(RuntimeWarning, match="D <= 256, got D = 300.*pure-PyTorch reference"):
        out = la.taylor_attention(*_qkv(d=300))  # auto on CPU: the reference, said once
    assert out.shape == (2, 3, 5, 6)


def test_bad_scale():
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        la.taylor_attention(*_qkv(), scale=float("nan"))
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        la.taylor_attention(*_qkv(), scale=0.0)


def test_unknown_and_unavailable_backends_list_what_is_available():
    with pytest.raises(ValueError, match=r"unknown backend 'magic'.*known backends"):
        la.taylor_attention(*_qkv(), backend="magic")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available for cpu tensors.*available: \["):
        la.taylor_attention(*_qkv(), backend="cuda")
    assert "reference" in la.available_backends("cpu")
    assert set(la.backend_names()) >= {"reference", "cpu", "triton", "cuda"}


def test_auto_picks_the_fused_cpu_kernels_when_built():
    from linattn_cuda.ops.dispatch import choose_backend
    from linattn_cuda.ops.problem import attention_problem

    q, k, v = _qkv()
    assert choose_backend(attention_problem(q, k, v, causal=False)) == ("cpu" if has_kernel("CPU") else "reference")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shape", [(0, 2, 5, 5), (2, 0, 5, 5), (2, 2, 0, 0), (2, 2, 0, 7), (2, 2, 3, 0)], ids=lambda s: "x".join(map(str, s))
)
def test_empty_sequences_return_empty_or_zero_outputs(shape, backend):
    b, h, lq, lk = shape
    q, k, v, _ = make_inputs(b, h, lq, lk, 4, 3, seed=1, requires_grad=True)
    out = la.taylor_attention(q, k, v, causal=lq == lk, backend=backend)
    assert out.shape == (b, h, lq, 3)
    assert torch.equal(out, torch.zeros_like(out))  # no key at all: defined as 0
    out.sum().backward()  # and autograd still works
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inputs_do_not_crash(backend):
    q, k, v = _qkv()
    q[0, 0, 0, 0] = float("nan")
    v[1, 1, 2, 3] = float("inf")
    out = la.taylor_attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (2, 3, 5, 6)


def test_step_accepts_4d_tokens_and_checks_state():
    q, k, v = _qkv(lq=1, lk=1)
    state = la.empty_state(2, 3, 4, 6)
    out, new = la.taylor_attention_step(q, k, v, state)
    assert out.shape == (2, 3, 1, 6)
    assert max_rel_err(out, reference_out(q, k, v, causal=True)) < 1e-5
    with pytest.raises(ValueError, match=r"state.kv must have shape \[2, 3, 15, 6\]"):
        la.taylor_attention_step(q, k, v, la.empty_state(2, 3, 5, 6))
    with pytest.raises(TypeError, match="state must be a TaylorState"):
        la.taylor_attention_step(q, k, v, None)
    with pytest.raises(TypeError, match="state.kv must be float32 or float64"):
        la.taylor_attention_step(q, k, v, la.TaylorState(new.kv.half(), new.k_sum.half()))
    with pytest.raises(ValueError, match=r"k must have shape \[B, H, 1, \*\]"):
        la.taylor_attention_step(q, k.expand(-1, -1, 2, -1), v, state)


def test_prefill_is_differentiable_with_its_state():
    q, k, v, _ = make_inputs(1, 2, 20, 20, 4, 5, dtype=torch.float64, seed=3, requires_grad=True)
    out, state = la.taylor_attention_prefill(q, k, v)
    (out.sum() + state.kv.sum() + state.k_sum.sum()).backward()
    assert q.grad is not None and k.grad is not None
    assert state.kv.requires_grad


class _TinyAttention(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.backend = backend

    def forward(self, x, mask):
        q = self.proj(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
        out = la.taylor_attention(q, q, q, causal=True, key_padding_mask=mask, backend=self.backend)
        return out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = _TinyAttention(backend)
    x = torch.randn(2, 33, 8)
    mask = torch.zeros(2, 33, dtype=torch.bool)
    mask[1, -5:] = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if backend == "reference" else "inductor")
    eager_out = model(x, mask)
    out = compiled(x, mask)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # the backward graph compiles too
    assert model.proj.weight.grad is not None


def _padded_keys_case(backend, device, causal):
    """Outputs, gradients and prefill states with padded keys holding finite values, then NaN (k) and inf (v):
    a padded key must add nothing whatever it holds (the gradients of the other positions included)."""
    b, h, L, d, dv = 2, 2, 37, 8, 12
    q, k, v, m = make_inputs(b, h, L, L, d, dv, seed=21, mask="random", device=device)
    m[0, 4:20] = True  # a run of padding across block / chunk boundaries
    m[0, 0] = False
    pad = m[:, None, :, None]
    runs = []
    for kk, vv in ((k, v), (k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")))):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, kk, vv))
        out = la.taylor_attention(qq, kk, vv, causal=causal, key_padding_mask=m, backend=backend)
        grads = torch.autograd.grad(out, (qq, kk, vv), torch.ones_like(out))
        extra = ()
        if causal:
            with torch.no_grad():
                p_out, st = la.taylor_attention_prefill(qq, kk, vv, key_padding_mask=m, backend=backend)
            extra = (p_out, st.kv, st.k_sum)
        runs.append((out, *grads, *extra))
    keep = ~pad
    names = ["out", "dq", "dk", "dv", "prefill out", "kv", "k_sum"]
    for name, good, bad in zip(names, *runs):
        if name in ("dk", "dv"):  # the padded keys' own gradients: 0 (or, in the finite run, whatever)
            good, bad = torch.where(keep, good, 0.0), torch.where(keep, bad, 0.0)
        assert torch.isfinite(bad).all(), f"{backend}: {name} has non-finite values"
        torch.testing.assert_close(bad, good, msg=lambda s: f"{backend} {name}: {s}")  # GPU atomics may reorder sums


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_padded_keys_may_hold_nan_and_inf(backend, causal):
    if backend not in la.available_backends("cpu"):  # triton: under TRITON_INTERPRET=1 (tests/conftest.py)
        pytest.skip(f"backend {backend!r} is not available on CPU")
    _padded_keys_case(backend, "cpu", causal)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_padded_keys_may_hold_nan_and_inf_gpu(backend, causal):
    if backend not in la.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on CUDA")
    _padded_keys_case(backend, "cuda", causal)
