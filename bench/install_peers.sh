#!/usr/bin/env bash
# Install the peers of the scaling benchmark into the current Python environment (torch already installed).
#
#   bash bench/install_peers.sh                        # pytorch-fast-transformers 0.4.0 (CPU build) + fla-core
#   PEERS_WHEEL_DIR=.whl bash bench/install_peers.sh   # also put pure-Python wheels (fla-core, einops,
#                                                      # pytest-benchmark, py-cpuinfo) in .whl/ for bench/gpu_check.sh
#                                                      # on an offline GPU machine
#   SKIP_FLA=1 / SKIP_FT=1                             # leave one of them out; FORCE=1 rebuilds fast-transformers
#
# pytorch-fast-transformers 0.4.0 ships only an sdist whose setup.py imports torch (so: no build isolation) and
# compiles CUDA kernels for compute_50 whenever `nvcc` is on PATH, which current toolkits reject. With nvcc hidden
# it builds its CPU extensions only; those work with torch 2.14 (SPEC section 2). The build compiles 7 C++
# extensions serially: about 4 CPU-minutes. Its wheel is CPU-only and tied to this Python version, so it is not
# carried to the GPU machine. Nothing of the peers is committed to this repository.
set -euo pipefail

FT_VERSION="${FT_VERSION:-0.4.0}"
FLA_VERSION="${FLA_VERSION:-0.6.0}"
PY="${PYTHON:-python3}"

if [ "${SKIP_FT:-0}" != "1" ]; then
  if [ "${FORCE:-0}" != "1" ] && "$PY" - "$FT_VERSION" <<'PY' 2>/dev/null
import sys, importlib.metadata as m
import fast_transformers.causal_product  # noqa: F401  (the compiled CPU kernel imports)
sys.exit(0 if m.version("pytorch-fast-transformers") == sys.argv[1] else 1)
PY
  then
    echo "== pytorch-fast-transformers $FT_VERSION already installed (FORCE=1 rebuilds)"
  else
    echo "== pytorch-fast-transformers $FT_VERSION (CPU build, nvcc hidden)"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    # PATH without any directory holding an nvcc, and no CUDA_HOME: setup.py then builds the CPU kernels only
    NO_NVCC_PATH="$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -n "$d" ] && [ ! -x "$d/nvcc" ] && echo "$d"; done | paste -sd: -)"
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "pytorch-fast-transformers==$FT_VERSION" -d "$WORK"
    env -u CUDA_HOME -u CUDA_PATH PATH="$NO_NVCC_PATH" MAX_JOBS="${MAX_JOBS:-2}" \
        "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK"/pytorch-fast-transformers-*.tar.gz
    "$PY" -m pip install -q --no-deps "$WORK"/wheels/pytorch_fast_transformers-*.whl
  fi
  "$PY" - <<'PY'
import torch
from fast_transformers.causal_product import causal_dot_product
q, v = torch.randn(1, 1, 4, 3), torch.randn(1, 1, 4, 2)
ref = torch.einsum("bhij,bhjd->bhid", torch.tril(q @ q.transpose(-1, -2)), v)
assert torch.allclose(causal_dot_product(q, q, v), ref, atol=1e-5), "causal_dot_product disagrees with its definition"
print("fast_transformers.causal_product CPU kernel: OK")
PY
fi

if [ "${SKIP_FLA:-0}" != "1" ]; then
  # fla.ops.based lives in fla-core (pure Python + Triton; needs only einops). On CPU its kernels run only under
  # TRITON_INTERPRET=1 (parallel_based works there in fp32; fused_chunk_based does not), so the CPU suite skips it.
  echo "== fla-core $FLA_VERSION (flash-linear-attention's kernels)"
  "$PY" -m pip install -q "fla-core==$FLA_VERSION" || echo "fla-core not installed (optional peer)"
  if [ -n "${PEERS_WHEEL_DIR:-}" ]; then
    mkdir -p "$PEERS_WHEEL_DIR"
    # fla-core and einops; pytest-benchmark and py-cpuinfo in case the GPU machine lacks them (without them the
    # suite falls back to a stand-in timer of bench/conftest.py)
    "$PY" -m pip download -q --no-deps -d "$PEERS_WHEEL_DIR" "fla-core==$FLA_VERSION" einops pytest-benchmark py-cpuinfo
    echo "wheels for the GPU machine in $PEERS_WHEEL_DIR:"; ls -1 "$PEERS_WHEEL_DIR"
  fi
fi
