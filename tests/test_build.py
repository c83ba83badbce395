"""The extension build (runs on CPU): with CUDA kernels every op has one; without, a clear error says so."""
from __future__ import annotations

import os

import pytest
import torch

from linattn_cuda import _extension

pytestmark = pytest.mark.skipif(
    not _extension.extension_loaded(), reason=f"linattn_cuda._C is not built ({_extension.EXTENSION_ERROR})"
)


def _built_with_cuda() -> bool:
    return _extension.has_kernel("CUDA", "taylor_fwd")


def test_every_op_has_a_schema():
    for op in _extension.OPS:
        assert hasattr(torch.ops.linattn_cuda, op), op


def test_cuda_kernels_all_or_nothing():
    registered = {op: _extension.has_kernel("CUDA", op) for op in _extension.OPS}
    assert all(registered.values()) or not any(registered.values()), registered


@pytest.mark.skipif(not _built_with_cuda(), reason="built without CUDA kernels")
def test_cuda_build_registers_every_op():
    for op in _extension.OPS:
        assert _extension.has_kernel("CUDA", op), f"linattn_cuda::{op} has no CUDA kernel"
    _extension.require_cuda_kernels()  # must not raise


@pytest.mark.skipif(_built_with_cuda(), reason="built with CUDA kernels")
def test_cpu_only_build_says_not_compiled_with_cuda():
    with pytest.raises(RuntimeError, match="not compiled with CUDA support"):
        _extension.require_cuda_kernels()
    from linattn_cuda.ops.taylor.cpp import ExtensionBackend

    reason = ExtensionBackend("cuda").unavailable_reason("cuda")
    assert reason is not None and "not compiled with CUDA support" in reason


@pytest.mark.skipif(
    torch.version.cuda is None or os.environ.get("LINATTN_SKIP_CUDA", "0") not in ("", "0")
    or os.environ.get("LINATTN_EXPECT_CUDA_BUILD", "0") in ("", "0"),
    reason="set LINATTN_EXPECT_CUDA_BUILD=1 where the build must include the CUDA kernels",
)
def test_expected_cuda_build():
    """On machines that build with a CUDA toolkit (CI sets LINATTN_EXPECT_CUDA_BUILD=1), the kernels are there."""
    assert _built_with_cuda(), "linattn_cuda._C was built without its CUDA kernels (was CUDA_HOME found?)"
