#!/usr/bin/env bash
# Install the CPU peers of the scaling benchmark into the current Python environment (torch already installed).
#
#   bash bench/install_peers.sh                        # pytorch-fast-transformers 0.4.0 (CPU build) + fla-core
#   PEERS_WHEEL_DIR=.whl bash bench/install_peers.sh   # also collect wheels in .whl/ (carried to the GPU machine)
#   SKIP_FLA=1 ...                                      # fast-transformers only
#
# pytorch-fast-transformers 0.4.0 ships only an sdist. Its setup.py probes `nvcc` on PATH and then tries to
# compile CUDA kernels for compute_50, which current toolkits reject; with nvcc hidden it builds the CPU
# extensions only, which work with torch 2.14 (SPEC section 2). Build isolation must be off (setup.py imports
# torch). Nothing of the peers is committed to this repository.
set -euo pipefail

FT_VERSION="${FT_VERSION:-0.4.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"

# PATH without any directory that holds an nvcc, and no CUDA_HOME: fast-transformers builds CPU kernels only.
NO_NVCC_PATH="$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -n "$d" ] && [ ! -x "$d/nvcc" ] && echo "$d"; done | paste -sd: -)"

echo "== pytorch-fast-transformers $FT_VERSION (CPU build, nvcc hidden)"
"$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    "pytorch-fast-transformers==$FT_VERSION" -d "$WORK"
env -u CUDA_HOME -u CUDA_PATH PATH="$NO_NVCC_PATH" MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK"/pytorch-fast-transformers-*.tar.gz
"$PY" -m pip install -q --no-deps "$WORK"/wheels/pytorch_fast_transformers-*.whl
if [ -n "${PEERS_WHEEL_DIR:-}" ]; then mkdir -p "$PEERS_WHEEL_DIR" && cp "$WORK"/wheels/*.whl "$PEERS_WHEEL_DIR"/; fi
"$PY" - <<'PY'
import torch
from fast_transformers.causal_product import causal_dot_product
q = torch.randn(1, 1, 4, 3); v = torch.randn(1, 1, 4, 2)
out = causal_dot_product(q, q, v)
ref = torch.einsum("bhij,bhjd->bhid", torch.tril(q @ q.transpose(-1, -2)), v)
assert torch.allclose(out, ref, atol=1e-5), "fast_transformers causal_dot_product disagrees with its definition"
print("fast_transformers.causal_product CPU kernel: OK")
PY

if [ "${SKIP_FLA:-0}" != "1" ]; then
  # fla.ops.based lives in fla-core (pure Python + Triton; needs only einops). On CPU its kernels run only under
  # TRITON_INTERPRET=1 (parallel_based works there; fused_chunk_based does not), so the CPU suite skips it.
  echo "== fla-core ${FLA_VERSION:-0.6.0} (flash-linear-attention's kernels)"
  "$PY" -m pip install -q "fla-core==${FLA_VERSION:-0.6.0}" || echo "fla-core not installed (optional peer)"
  if [ -n "${PEERS_WHEEL_DIR:-}" ]; then  # pure-Python wheels to carry to an offline GPU machine
    "$PY" -m pip download -q --no-deps -d "$PEERS_WHEEL_DIR" "fla-core==${FLA_VERSION:-0.6.0}" einops
  fi
fi
if [ -n "${PEERS_WHEEL_DIR:-}" ]; then
  echo "wheels in $PEERS_WHEEL_DIR (the fast-transformers one is CPU-only and tied to this Python version):"
  ls -1 "$PEERS_WHEEL_DIR"
fi
