"""Builds linattn_cuda and its extension linattn_cuda._C (C++ CPU kernels always, CUDA kernels when possible).

Environment switches (all optional):
  LINATTN_SKIP_CUDA=1      never compile CUDA sources (fast CPU-only builds)
  LINATTN_FORCE_CUDA=1     compile CUDA sources even when no GPU is visible (needs a toolkit + CUDA torch)
  LINATTN_CUDA_ARCHS       compute capabilities, e.g. "8.0;9.0" (default; TORCH_CUDA_ARCH_LIST also honoured)
  LINATTN_DEBUG=1          -O0 -g builds
  MAX_JOBS, CUDA_HOME      as in torch.utils.cpp_extension
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _has_cudart(root: str) -> bool:
    return any(glob.glob(os.path.join(root, sub, "libcudart.so*")) for sub in ("lib64", "lib", "targets/*/lib"))


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch guesses it.

    torch guesses the folder above the first `nvcc` on the PATH; when that `nvcc` is a wrapper script
    (e.g. /usr/local/bin/nvcc) the guess has no libcudart and linking fails. Look at the usual places too.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            os.environ["CUDA_HOME"] = root
            return


_locate_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError:  # pragma: no cover - exercised only without torch
    sys.exit(
        "linattn_cuda needs PyTorch at build time to compile its C++/CUDA kernels, and pip's build isolation "
        "hides an installed torch. Install torch first, then build without isolation:\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation -e .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("LINATTN_SKIP_CUDA"):
        return False
    has_toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    if _flag("LINATTN_FORCE_CUDA"):
        if not has_toolkit:
            sys.exit("LINATTN_FORCE_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found")
        return True
    return has_toolkit


def _extension():
    debug = _flag("LINATTN_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx += ["-fopenmp"]  # the C++ standard is left to torch (C++20 from torch 2.13 on)
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if _want_cuda() and cuda_sources:
        archs = os.environ.get("LINATTN_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        if debug:
            nvcc = ["-O0", "-g", "-G"]
        return CUDAExtension(
            "linattn_cuda._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DLINATTN_WITH_CUDA"], "nvcc": nvcc + ["-DLINATTN_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("linattn_cuda._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


class _BuildExtension(BuildExtension):
    """torch's BuildExtension, but an in-place (editable) build replaces ``linattn_cuda/_C*.so`` atomically.

    setuptools copies the new library over the old file in place (truncate, then write); a Python process
    that has the old one loaded (a training run, a test session) then crashes with SIGBUS on its next page
    fault. Writing a temporary file beside it and renaming it over the old one leaves loaded copies intact.
    """

    def copy_file(self, infile, outfile, *args, **kwargs):
        if not str(outfile).endswith((".so", ".pyd", ".dylib")) or self.dry_run:
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.tmp-{os.getpid()}"
        shutil.copyfile(infile, tmp)
        shutil.copymode(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, 1


setup(
    name="linattn_cuda",
    version="0.1.0",
    description="Exact second-order Taylor (Based-style) linear attention: C++, CUDA and Triton kernels",
    packages=find_packages(include=["linattn_cuda", "linattn_cuda.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "numpy"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "numpy"],
        # linattn_cuda.integrations.transformers (the oldest version tested: see MIN_TRANSFORMERS there)
        "transformers": ["transformers>=4.53"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
