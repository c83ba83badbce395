"""Loading the compiled extension ``linattn_cuda._C`` (C++ CPU kernels, CUDA kernels when built)."""
from __future__ import annotations

import torch

REBUILD_HINT = (
    "Build it from the repository root with torch already installed: "
    "`pip install --no-build-isolation -e .` (see README, 'Install')."
)

try:  # importing the module runs the TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

OPS = ("taylor_fwd", "taylor_bwd", "taylor_step")

# Which ops have kernels for which dispatch key, read once after the import above registered them
# (a plain dict, so that backend selection stays traceable by torch.compile).
_KERNELS = {
    (key, op): EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"linattn_cuda::{op}", key)
    for key in ("CPU", "CUDA")
    for op in OPS
}


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


def has_kernel(dispatch_key: str, op: str = "taylor_fwd") -> bool:
    """Whether ``linattn_cuda::op`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return _KERNELS.get((dispatch_key, op), False)


def require_extension() -> None:
    if not extension_loaded():
        raise RuntimeError(f"linattn_cuda._C could not be imported ({EXTENSION_ERROR}). {REBUILD_HINT}")


def require_cuda_kernels() -> None:
    require_extension()
    if not has_kernel("CUDA"):
        raise RuntimeError(
            "linattn_cuda was not compiled with CUDA support. Rebuild on a machine with a CUDA toolkit and a "
            "CUDA build of torch (set CUDA_HOME; LINATTN_FORCE_CUDA=1 forces the CUDA build): "
            "`pip install --no-build-isolation -e .`"
        )
