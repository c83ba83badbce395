"""Run the scaling suite and write its results: JSON, markdown table, time and GFLOP/s plots.

    python -m bench.scaling --device cpu                  # default CPU suite, ≈5 min on 2 cores
    python -m bench.scaling --device cpu --preset full    # 256 … 16K for every form, more rounds (slow)
    python -m bench.scaling --device cuda                 # 1K … 64K, bf16, B=16, H=16 (skipped without CUDA)
    python -m bench.scaling --device cpu --preset tiny --out /tmp/x     # seconds: checks the pipeline

Writes ``<out>/<name>.json`` (pytest-benchmark's JSON plus ``linattn_machine``, ``linattn_settings``,
``linattn_skipped`` and ``linattn_analysis``), ``<name>.md``, ``<name>.png`` and ``<name>_gflops.png``;
``<name>`` defaults to ``<device>_scaling``. Options after ``--`` go to pytest unchanged.
Exit status: pytest's (0 when every case passed or was skipped with a reason).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SUITE = os.path.join(HERE, "test_scaling.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="quick", choices=["quick", "full", "tiny"])
    p.add_argument("--out", default=None,
                   help="output folder (default: a new run folder runs/bench/<device>_scaling-<date-time>; pass "
                        "bench/results to update the committed tables)")
    p.add_argument("--name", default=None, help="file stem (default <device>_scaling)")
    p.add_argument("--note", default=None, help="a line for the results header, e.g. 'contended dev run'")
    p.add_argument("--lengths", default=None, help="comma-separated lengths (overrides the preset)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--modes", default=None, help="fwd,fwdbwd")
    p.add_argument("--impls", default=None, help="regular expression selecting implementations")
    p.add_argument("--total-budget", type=float, default=None, help="seconds; remaining cases are skipped after it")
    p.add_argument("--case-budget", type=float, default=None, help="seconds per call above which a case is skipped")
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--stat", default="median", choices=["median", "min", "mean"],
                   help="statistic of each case's rounds used in tables, fits and plots (min resists contention)")
    p.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return args, extra


def pytest_args(args, raw_json: str, skips_json: str, extra: list[str]) -> list[str]:
    from bench.conftest import HAVE_PYTEST_BENCHMARK

    cmd = [SUITE, "-q", "-p", "no:cacheprovider", "--rootdir", ROOT]
    if HAVE_PYTEST_BENCHMARK:
        cmd += ["--benchmark-json", raw_json, "--benchmark-columns", "min,median,rounds", "--benchmark-sort", "fullname"]
    else:  # the suite's stand-in fixture writes the same fields
        print("pytest-benchmark is not installed: timing with the stand-in fixture of bench/conftest.py")
        cmd += ["-p", "no:benchmark", "--bench-fallback-json", raw_json]
    cmd += ["--bench-device", args.device, "--bench-preset", args.preset, "--bench-skips-json", skips_json]
    for opt, value in [
        ("--bench-lengths", args.lengths), ("--bench-batch", args.batch), ("--bench-heads", args.heads),
        ("--bench-dtype", args.dtype), ("--bench-modes", args.modes), ("--bench-impls", args.impls),
        ("--bench-total-budget", args.total_budget), ("--bench-case-budget", args.case_budget),
        ("--bench-mem-gb", args.mem_gb), ("--bench-threads", args.threads),
    ]:
        if value is not None:
            cmd += [opt, str(value)]
    return cmd + list(extra)


def merge(raw_json: str, skips_json: str, out_json: str, device: str, note, runtime_s: float, stat="median") -> dict:
    from bench.machine import machine_info

    data = {"benchmarks": []}
    if os.path.exists(raw_json) and os.path.getsize(raw_json) > 0:  # pytest-benchmark writes nothing when all skip
        with open(raw_json) as f:
            data = json.load(f)
    skips = {"skipped": [], "settings": {}}
    if os.path.exists(skips_json):
        with open(skips_json) as f:
            skips = json.load(f)
    machine = machine_info(device)
    if note:
        machine["note"] = note
    data["linattn_machine"] = machine
    data["linattn_settings"] = dict(skips.get("settings", {}), stat=stat)
    data["linattn_skipped"] = skips.get("skipped", [])
    data["linattn_runtime_s"] = round(runtime_s, 1)
    with open(out_json, "w") as f:
        json.dump(data, f, indent=1)
    return data


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pytest

    from bench import report

    if args.out is None:  # a run folder of its own: the committed tables change only when asked (--out bench/results)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join(os.path.dirname(HERE), "runs", "bench", f"{args.device}_scaling-{stamp}")
    os.makedirs(args.out, exist_ok=True)
    name = args.name or f"{args.device}_scaling"
    out_json = os.path.join(args.out, name + ".json")
    with tempfile.TemporaryDirectory() as tmp:
        raw_json, skips_json = os.path.join(tmp, "raw.json"), os.path.join(tmp, "skips.json")
        start = time.perf_counter()
        rc = pytest.main(pytest_args(args, raw_json, skips_json, extra))
        runtime = time.perf_counter() - start
        data = merge(raw_json, skips_json, out_json, args.device, args.note, runtime, args.stat)
    if args.no_plots:
        analysis = report.analyse(data)
        report.write_markdown(data, analysis, os.path.join(args.out, name + ".md"),
                              f"Scaling of Taylor attention on {args.device.upper()}")
        paths = [out_json, os.path.join(args.out, name + ".md")]
    else:
        paths = [out_json] + report.write_report(out_json)
    analysis = report.load(out_json).get("linattn_analysis") or report.analyse(data)
    print(f"\nscaling suite: {len(report.result_rows(data))} cases timed, {len(data['linattn_skipped'])} skipped, "
          f"{runtime:.0f} s (pytest exit {int(rc)})")
    for t in analysis.get("targets", []):
        print(f"  [{t['verdict']}] {t['target']}: {t['measured']}")
    for path in paths:
        print(f"  wrote {os.path.relpath(path)}")
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
