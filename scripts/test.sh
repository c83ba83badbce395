#!/usr/bin/env bash
# The project's test command (README "Tests"): every test that runs without a GPU, with a short summary.
# GPU tests (marked `gpu`) skip themselves without a CUDA device. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests -q -ra --durations=15 "$@"
