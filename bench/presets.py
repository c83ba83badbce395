"""Suite settings per device and preset; command-line options of the suite override single fields.

Presets:
  quick (default)  CPU: 256 … 16K, ≈5 minutes on 2 cores (quadratic forms beyond the per-case budget skip)
                   CUDA: 1K … 64K, bf16, B=16, H=16, within the GPU check's few minutes
  full             CPU: 256 … 16K with more rounds and a larger per-case budget (all forms where memory allows)
                   CUDA: 1K … 64K at B = 1 and 16
  tiny             L = 64, one round: exercises every code path in seconds (CI, dry runs)
"""
from __future__ import annotations

import copy

BASE = {
    "cpu": dict(
        device="cpu", dtype="float32", batch=(1,), heads=4, dim=16, vdim=64,
        lengths=(256, 512, 1024, 2048, 4096, 8192, 16384), modes=("fwd", "fwdbwd"), causal=(False, True),
        min_rounds=3, max_rounds=5, round_budget_s=1.0, case_budget_s=2.0, total_budget_s=270.0, mem_gb=6.0,
        peak_n=2048, check_max_len=1024, threads=None,
    ),
    "cuda": dict(
        device="cuda", dtype="bfloat16", batch=(16,), heads=16, dim=16, vdim=64,
        lengths=(1024, 2048, 4096, 8192, 16384, 32768, 65536), modes=("fwd", "fwdbwd"), causal=(False, True),
        min_rounds=3, max_rounds=10, round_budget_s=0.3, case_budget_s=1.5, total_budget_s=200.0, mem_gb=None,
        peak_n=8192, check_max_len=2048, threads=None,
    ),
}

OVERRIDES = {
    "quick": {},
    "full": {
        "cpu": dict(min_rounds=5, max_rounds=10, round_budget_s=3.0, case_budget_s=30.0, total_budget_s=3600.0),
        "cuda": dict(batch=(1, 16), round_budget_s=1.0, case_budget_s=5.0, total_budget_s=1200.0),
    },
    "tiny": {
        "cpu": dict(lengths=(64,), batch=(1,), heads=2, min_rounds=1, max_rounds=1, round_budget_s=0.0, case_budget_s=30.0,
                    total_budget_s=120.0, peak_n=128),
        "cuda": dict(lengths=(64,), batch=(1,), heads=2, min_rounds=1, max_rounds=1, round_budget_s=0.0, case_budget_s=60.0,
                     total_budget_s=120.0, peak_n=256),
    },
}

PRESETS = tuple(OVERRIDES)


def settings(device: str, preset: str = "quick") -> dict:
    if device not in BASE:
        raise ValueError(f"device must be one of {sorted(BASE)}, got {device!r}")
    if preset not in OVERRIDES:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    cfg = copy.deepcopy(BASE[device])
    cfg.update(OVERRIDES[preset].get(device, {}))
    cfg["preset"] = preset
    return cfg
