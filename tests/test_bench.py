"""Tests of the benchmark tooling (bench/): fits, crossovers, FLOP counts, tables and plots, the runner, Q1, GPU check.

Everything runs on synthetic benchmark JSON except two short real runs: the scaling runner at L=64 with one
round (the README's main-job command, exercised end to end) and the GPU check script's CPU dry run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import flops, report  # noqa: E402
from bench.fitting import fit_exponent, find_crossover  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("exponent", [1.0, 1.37, 2.0])
def test_fit_exponent_recovers_known_power_law(exponent):
    lengths = [2**n for n in range(8, 15)]
    noise = [1.03, 0.98, 1.01, 0.99, 1.02, 0.97, 1.0]  # ±3 % multiplicative, deterministic
    times = [2e-9 * l**exponent * e for l, e in zip(lengths, noise)]
    fit = fit_exponent(lengths, times)
    assert fit is not None and fit.n == len(lengths)
    assert abs(fit.exponent - exponent) < 0.02
    assert fit.r2 > 0.99
    assert fit.predict(4096) == pytest.approx(2e-9 * 4096**exponent, rel=0.05)


def test_fit_exponent_range_and_bad_points():
    lengths = [256, 512, 1024, 2048, 4096]
    times = [1.0, 1.0, 1024.0, 2048.0, 4096.0]  # flat (overhead) below 1024, linear above
    fit = fit_exponent(lengths, times, lo=1024)
    assert fit.exponent == pytest.approx(1.0) and (fit.lo, fit.hi) == (1024, 4096)
    assert fit_exponent(lengths, times, lo=4096) is None  # one point
    assert fit_exponent(lengths, times, lo=1024, min_points=4) is None
    fit = fit_exponent([1, 2, 4, 8], [1.0, None, float("nan"), 64.0])  # skipped/failed points dropped
    assert fit.n == 2 and fit.exponent == pytest.approx(2.0)


def test_crossover_interpolated_on_power_laws():
    lengths = [2**n for n in range(6, 13)]
    quad = [l**2 for l in lengths]
    lin = [300 * l for l in lengths]  # equal at L = 300
    c = find_crossover(lengths, quad, lengths, lin)
    assert c.kind == "interpolated" and (c.below, c.above) == (256, 512)
    assert c.length == pytest.approx(300, rel=1e-9)  # log-log interpolation is exact for power laws
    assert "300" in c.describe()


def test_crossover_kinds():
    ls = [256, 512, 1024, 2048]
    assert find_crossover(ls, [10, 10, 10, 10], ls, [1, 1, 1, 1]).kind == "below_range"
    assert find_crossover(ls, [10, 10, 10, 10], ls, [1, 1, 1, 1]).length == 256
    assert find_crossover(ls, [1, 1, 1, 1], ls, [10, 10, 10, 10]).kind == "none"
    assert find_crossover(ls, [1, 1, 1, 1], [4096], [1]).kind == "no_data"
    # faster at 256, slower at 512 and 1024, faster from 2048 on: the crossover is the last one
    c = find_crossover(ls, [2, 2, 2, 2], ls, [1, 4, 4, 1])
    assert c.kind == "interpolated" and (c.below, c.above) == (1024, 2048)
    assert 1024 < c.length < 2048
    # only common lengths count; a skipped (None) point is ignored
    c = find_crossover(ls + [4096], [1, 2, 4, 8, 16], ls, [3, 3, 3, None])
    assert c.kind == "interpolated" and (c.below, c.above) == (512, 1024)


# ---------------------------------------------------------------------------------------------------- FLOPs


def test_flop_formulas_by_hand():
    # quadratic / softmax: 2·Lq·Lk·(D+Dv); causal half; ×B·H; fwd+bwd ×3
    assert flops.quadratic_flops(1024, 1024, 16, 64, causal=False) == 2 * 1024 * 1024 * 80 == 167_772_160
    assert flops.quadratic_flops(1024, 1024, 16, 64, causal=True) == 83_886_080
    assert flops.softmax_flops(1024, 1024, 16, 64, causal=False, batch_heads=4, mode="fwdbwd") == 167_772_160 * 4 * 3
    assert flops.quadratic_flops(100, 300, 8, 8, causal=False) == 2 * 100 * 300 * 16
    # linear: 4·L·M·Dv, M = 153 for D = 16; causal chunked adds 2·L·C·(D+Dv), C = 64
    assert flops.linear_flops(1024, 16, 64, causal=False) == 4 * 1024 * 153 * 64 == 40_108_032
    assert flops.linear_flops(1024, 16, 64, causal=True) == 40_108_032 + 2 * 1024 * 64 * 80 == 50_593_792
    assert flops.linear_flops(32, 16, 64, causal=True) == 4 * 32 * 153 * 64 + 2 * 32 * 32 * 80  # chunk capped at L
    assert flops.form_flops("linear_unnormalized", 1024, 16, 64, causal=True) == 40_108_032
    assert flops.form_flops("auto", 128, 16, 64, causal=False) == flops.quadratic_flops(128, 128, 16, 64, causal=False)
    assert flops.form_flops("auto", 4096, 16, 64, causal=False) == flops.linear_flops(4096, 16, 64, causal=False)
    assert flops.matmul_flops(2048) == 2 * 2048**3
    with pytest.raises(ValueError):
        flops.form_flops("cubic", 1, 1, 1, causal=False)
    with pytest.raises(ValueError):
        flops.quadratic_flops(1, 1, 1, 1, causal=False, mode="bwd")


def test_flop_crossover_matches_spec():
    # SPEC §1: about L ≈ 250 non-causal and ≈ 620 causal (C = 64) for D = 16, Dv = 64
    assert flops.flop_crossover(16, 64, causal=False) == pytest.approx(39168 / 160)
    assert abs(flops.flop_crossover(16, 64, causal=False) - 250) < 10
    assert abs(flops.flop_crossover(16, 64, causal=True) - 620) < 10
    for causal in (False, True):
        l = flops.flop_crossover(16, 64, causal=causal)
        assert flops.quadratic_flops(l, l, 16, 64, causal=causal) == pytest.approx(
            flops.linear_flops(l, 16, 64, causal=causal, chunk=64))


def test_feature_dim_matches_library():
    from linattn_cuda import feature_dim

    for d in (1, 4, 16, 64):
        for terms in (1, 2, 3, 4):
            for sym in (True, False):
                assert flops.feature_dim(d, sym, terms) == feature_dim(d, sym, terms)
    assert (feature_dim(16), feature_dim(16, False), feature_dim(64)) == (153, 273, 2145)


# ---------------------------------------------------------------------------------------------------- tables, plots


def _bench(impl, family, form, mode, causal, length, t, **extra):
    info = dict(impl=impl, family=family, form=form, mode=mode, causal=causal, batch=1, heads=4, length=length,
                dim=16, vdim=64, dtype="float32", device="cpu", note=f"{impl} note", rounds=3)
    info["flops"] = flops.form_flops(form, length, 16, 64, causal=causal, batch_heads=4, mode=mode)
    info.update(extra)
    return {"name": f"test_scaling[{mode}-{impl}-L{length}]", "extra_info": info,
            "stats": {"min": t * 0.95, "median": t, "mean": t, "rounds": 3}}


def fake_results(device="cpu") -> dict:
    lengths = [256, 512, 1024, 2048, 4096, 8192, 16384]
    benches = []
    for mode in ("fwd", "fwdbwd"):
        f = 1.0 if mode == "fwd" else 3.0
        for causal in (False, True):
            for l in lengths:
                if l <= 4096:
                    benches.append(_bench("taylor_ref_quadratic", "taylor-quadratic", "quadratic", mode, causal, l, f * 1e-8 * l * l))
                    benches.append(_bench("softmax_sdpa", "softmax", "softmax", mode, causal, l, f * 2e-8 * l * l))
                benches.append(_bench("taylor_ref_featuremap", "taylor-linear", "linear", mode, causal, l, f * 5e-6 * l,
                                      **({"max_rel_err": 1e-6} if l <= 1024 and mode == "fwd" else {})))
                benches.append(_bench("taylor_cpu", "taylor-fused", "auto", mode, causal, l, f * 1e-6 * l + 2e-3))
    benches.append({"name": "test_matmul_peak", "extra_info": {"impl": "matmul_peak", "kind": "peak", "n": 2048,
                                                               "dtype": "float32", "flops": flops.matmul_flops(2048)},
                    "stats": {"min": 0.05, "median": 0.06, "rounds": 10}})
    return {
        "benchmarks": benches,
        "linattn_machine": {"date": "2026-01-01T00:00:00", "cpu": "Fake CPU 9000", "cpu_count": 2, "torch_threads": 2,
                            "python": "3.11", "torch": "2.14.1", "triton": "3.8.0", "device": device,
                            "backends": ["reference", "cpu"], "peers": {}, "note": "synthetic"},
        "linattn_settings": {"device": device, "batch": [1], "heads": 4, "dim": 16, "vdim": 64, "dtype": "float32",
                             "preset": "quick", "max_rounds": 3},
        "linattn_skipped": [
            {"nodeid": "bench/test_scaling.py::test_scaling[fwd-full-taylor_ref_quadratic-B1-L8192]",
             "reason": "estimated memory 12.5 GiB > limit 6.0 GiB"},
            {"nodeid": "bench/test_scaling.py::test_scaling[fwd-full-taylor_ref_quadratic-B1-L16384]",
             "reason": "estimated memory 50.0 GiB > limit 6.0 GiB"},
            {"nodeid": "bench/test_scaling.py::test_scaling[taylor_cuda-unavailable]",
             "reason": "the 'cuda' backend takes cuda tensors"},
        ],
    }


def test_analyse_fake_results():
    a = report.analyse(fake_results())
    fits = {(f["impl"], f["mode"], f["causal"]): f for f in a["fits"]}
    assert fits[("taylor_ref_quadratic", "fwd", False)]["exponent"] == pytest.approx(2.0, abs=1e-6)
    assert fits[("softmax_sdpa", "fwdbwd", True)]["exponent"] == pytest.approx(2.0, abs=1e-6)
    assert fits[("taylor_ref_featuremap", "fwd", True)]["exponent"] == pytest.approx(1.0, abs=1e-6)
    assert fits[("taylor_ref_featuremap", "fwd", True)]["target_exponent"] == pytest.approx(1.0, abs=1e-6)
    assert fits[("taylor_ref_quadratic", "fwd", False)]["target_exponent"] is None  # 2K and 4K only
    cross = {(c["a"], c["b"], c["mode"], c["causal"]): c for c in a["crossovers"]}
    c = cross[("taylor_ref_quadratic", "taylor_ref_featuremap", "fwd", False)]
    assert c["kind"] == "interpolated" and c["length"] == pytest.approx(500, rel=1e-9)  # 1e-8 L² = 5e-6 L
    assert cross[("softmax_sdpa", "taylor_cpu", "fwd", False)]["kind"] == "interpolated"
    assert a["peak"]["gflops"] == pytest.approx(2 * 2048**3 / 0.05 / 1e9)
    verdicts = {t["verdict"] for t in a["targets"]}
    assert verdicts == {"pass"}, a["targets"]


def test_targets_fail_when_linear_path_scales_badly():
    data = fake_results()
    for b in data["benchmarks"]:
        if b["extra_info"].get("impl") == "taylor_cpu":
            b["stats"]["median"] = 1e-9 * b["extra_info"]["length"] ** 1.5
    fails = [t for t in report.analyse(data)["targets"] if t["verdict"] == "FAIL"]
    assert fails and all("taylor_cpu" in t["target"] for t in fails)
    assert report.analyse(fake_results(device="cuda"))["targets"] == []  # the exponent target is a CPU target


def test_write_report_from_fake_json(tmp_path):
    path = tmp_path / "cpu_scaling.json"
    path.write_text(json.dumps(fake_results()))
    written = report.write_report(str(path))
    assert [Path(p).name for p in written] == ["cpu_scaling.md", "cpu_scaling.png", "cpu_scaling_gflops.png"]
    md = (tmp_path / "cpu_scaling.md").read_text()
    for needle in ["Fake CPU 9000", "2 logical cores", "torch 2.14.1", "Triton 3.8.0", "2026-01-01", "synthetic",
                   "## Targets", "| taylor_ref_quadratic | 2.00 (1K–4K)", "≈500 (between 256 and 512)",
                   "≈245", "## Not measured", "estimated memory", "taylor_cuda", "GFLOP/s",
                   "forward+backward = 3 × forward", "| taylor_cpu |"]:
        assert needle in md, needle
    for png in ("cpu_scaling.png", "cpu_scaling_gflops.png"):
        blob = (tmp_path / png).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 10_000
    stored = json.loads(path.read_text())
    assert "linattn_analysis" in stored and stored["linattn_analysis"]["targets"]


def test_report_statistic_switch(tmp_path):
    data = fake_results()
    rows = report.result_rows(data)
    assert all(r["time_s"] == r["median_s"] for r in rows)
    data["linattn_settings"]["stat"] = "min"
    assert all(r["time_s"] == r["min_s"] for r in report.result_rows(data))
    data["linattn_settings"]["stat"] = "p99"
    with pytest.raises(ValueError):
        report.result_rows(data)


# ---------------------------------------------------------------------------------------------------- real runs


def _run(cmd, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_runner_tiny_real_run(tmp_path):
    """The main-job command at L=64, one round: suite, JSON, markdown and plots."""
    proc = _run([sys.executable, "-m", "bench.scaling", "--device", "cpu", "--preset", "tiny", "--out", str(tmp_path),
                 "--impls", "^(taylor_|softmax_sdpa$)", "--note", "CI tiny run"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "cpu_scaling.json").read_text())
    rows = report.result_rows(data)
    impls = {r["impl"] for r in rows}
    assert {"taylor_ref_quadratic", "taylor_ref_featuremap", "softmax_sdpa"} <= impls
    assert {(r["mode"], r["causal"]) for r in rows} == {("fwd", False), ("fwd", True), ("fwdbwd", False), ("fwdbwd", True)}
    assert all(r["length"] == 64 and r["time_s"] > 0 and r["flops"] > 0 for r in rows)
    checked = [r for r in rows if "max_rel_err" in r]
    assert checked and all(r["max_rel_err"] < 1e-3 for r in checked)
    assert report.peak(data)["gflops"] > 0
    assert data["linattn_machine"]["note"] == "CI tiny run" and data["linattn_settings"]["preset"] == "tiny"
    md = (tmp_path / "cpu_scaling.md").read_text()
    assert "CI tiny run" in md and "taylor_ref_featuremap" in md
    assert (tmp_path / "cpu_scaling.png").read_bytes().startswith(PNG_MAGIC)


def test_runner_without_pytest_benchmark(tmp_path):
    """The stand-in timer (for machines without pytest-benchmark) writes the fields the report reads."""
    proc = _run([sys.executable, "-m", "bench.scaling", "--device", "cpu", "--preset", "tiny", "--out", str(tmp_path),
                 "--impls", "^taylor_ref_featuremap$", "--no-plots"], env_extra={"LINATTN_BENCH_FALLBACK": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stand-in" in proc.stdout
    data = json.loads((tmp_path / "cpu_scaling.json").read_text())
    rows = report.result_rows(data)
    assert len(rows) == 4 and all(r["time_s"] > 0 and r["measured_rounds"] >= 1 for r in rows)
    assert report.peak(data)["gflops"] > 0


def test_skip_with_estimate_instead_of_crash(tmp_path):
    """A case over the memory limit is skipped with its estimate in the reason, and recorded."""
    proc = _run([sys.executable, "-m", "bench.scaling", "--device", "cpu", "--preset", "tiny", "--out", str(tmp_path),
                 "--impls", "^taylor_ref_quadratic$", "--modes", "fwd", "--lengths", "64,300000", "--no-plots"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "cpu_scaling.json").read_text())
    assert {r["length"] for r in report.result_rows(data)} == {64}
    reasons = [s["reason"] for s in data["linattn_skipped"] if "L300000" in s["nodeid"]]
    assert len(reasons) == 2 and all("estimated memory" in r and "GiB" in r for r in reasons)


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env_extra = {"OUT": str(out), "GPU_CHECK_SCALING_ARGS": "--impls ^taylor_ref_quadratic$ --modes fwd",
                 "GPU_CHECK_BUDGET_S": "300"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env=dict(os.environ, **env_extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.split("GPU check summary")[-1]
    for stage in ("card", "build", "peers", "gpu-tests", "triton", "scaling"):
        assert stage in summary
    assert "scaling    ok" in summary, summary
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 2 for p in files)
    assert {"summary.md", "gpu_check.log", "cuda_scaling.json", "cuda_scaling.md"} <= {p.name for p in files}
    assert "Dry run" in (out / "summary.md").read_text()


# ---------------------------------------------------------------------------------------------------- Q1


def test_q1_taylor_vs_softmax_error_grows_with_scale():
    from bench.q1_analysis import taylor_vs_softmax

    rows = taylor_vs_softmax([0.01, 0.1, 1.0, 10.0], length=32, dim=8, seeds=(0,))
    errs = [r["rel_err"] for r in rows]
    tvs = [r["tv_mean"] for r in rows]
    assert errs == sorted(errs) and tvs == sorted(tvs)
    assert errs[0] < 1e-5 and tvs[0] < 1e-6  # third order in the logit scale
    assert errs[1] / errs[0] == pytest.approx(1000, rel=0.05)  # × α³ per decade
    assert 0 <= max(r["tv_max"] for r in rows) <= 1


def test_q1_main_writes_tables(tmp_path):
    from bench import q1_analysis

    bench_json = tmp_path / "cpu_scaling.json"
    bench_json.write_text(json.dumps(fake_results()))
    out = tmp_path / "q1"
    assert q1_analysis.main(["--bench-json", str(bench_json), "--out", str(out), "--length", "32", "--points", "4"]) == 0
    md = (out / "q1_analysis.md").read_text()
    assert "| 16 | 1 / 1 | 17 / 17 | 153 / 273 |" in md
    assert "| cpu_scaling.json | cpu | softmax_sdpa | fwd | False | 1 | 2.00 |" in md
    assert "| cpu_scaling.json | cpu | taylor_ref_featuremap | fwd | True | 1 | 1.00 |" in md
    for png in ("q1_feature_dim.png", "q1_error_vs_scale.png", "q1_exponents.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    stored = json.loads((out / "q1_analysis.json").read_text())
    assert math.isclose(stored["error_vs_scale"][0]["alpha"], 0.01)


# ---------------------------------------------------------------------------------------------------- hybrid


def test_hybrid_scaling_runs_and_writes_tables(tmp_path):
    from bench import hybrid_scaling

    out = tmp_path / "hybrid"
    hybrid_scaling.main(["--lengths", "64,128", "--repeats", "1", "--heads", "1", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert {"hybrid_cpu (W=64)", "taylor_cpu", "softmax_sdpa"} <= impls
    assert all(r["ms"] > 0 for r in data["rows"]) and len(data["rows"]) == 2 * 3 * 2
    md = out.with_suffix(".md").read_text()
    assert "| hybrid_cpu (W=64) |" in md and "exponent" in md and "CPU:" in md
