"""``import linattn_cuda`` alone registers the fake (meta) and autograd kernels of the C++ ops, so that a direct
``torch.ops.linattn_cuda.*`` call is differentiable and compilable before any backend has been resolved.
Each case runs in a fresh interpreter (a backend resolved by another test would register them anyway)."""
import subprocess
import sys
import textwrap

import pytest

from linattn_cuda._extension import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("CPU"), reason="linattn_cuda._C has no CPU kernels")


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_direct_op_call_is_differentiable_in_a_fresh_process():
    _run("""
        import sys, torch, linattn_cuda
        assert "linattn_cuda.ops.taylor.cpp" not in sys.modules  # no backend resolved yet
        q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = torch.ops.linattn_cuda.taylor_fwd(q, k, v, None, None, None, None, None, True, 0.5, False)[0]
        out.sum().backward()
        ref = linattn_cuda.ops.taylor.naive.taylor_attention_quadratic(q, k, v, causal=True, scale=0.5)
        grads = torch.autograd.grad(ref.sum(), (q, k, v))
        for g, r in zip((q.grad, k.grad, v.grad), grads):
            torch.testing.assert_close(g, r)
        """)


def test_direct_op_call_compiles_in_a_fresh_process():
    _run("""
        import torch, linattn_cuda
        def f(q, k, v):
            return torch.ops.linattn_cuda.taylor_fwd(q, k, v, None, None, None, None, None, False, 0.5, False)[0] * 2
        q, k, v = (torch.randn(2, 2, 7, 4, requires_grad=True) for _ in range(3))
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        torch.testing.assert_close(out, f(q, k, v))
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
        """)
