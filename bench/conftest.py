"""Options of the scaling suite (bench/test_scaling.py) and the record of skipped cases.

    pytest bench/test_scaling.py --bench-device cpu --bench-preset quick --benchmark-json out.json

Every ``--bench-*`` option overrides one field of the preset (bench/presets.py). Skipped cases and their
reasons are written to ``--bench-skips-json`` so the results table can say what was not measured and why.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `pytest bench/...` from the repository root without an installed package
    sys.path.insert(0, _ROOT)

from bench.presets import PRESETS, settings  # noqa: E402

try:  # LINATTN_BENCH_FALLBACK=1 forces the stand-in (to test it where pytest-benchmark is installed)
    if os.environ.get("LINATTN_BENCH_FALLBACK") == "1":
        raise ImportError("LINATTN_BENCH_FALLBACK=1")
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:  # e.g. an offline GPU machine: a minimal stand-in below writes the same JSON fields
    HAVE_PYTEST_BENCHMARK = False

_INT_LISTS = {"lengths", "batch"}
_STR_LISTS = {"modes"}


def pytest_addoption(parser):
    g = parser.getgroup("linattn scaling suite")
    g.addoption("--bench-device", default="cpu", choices=["cpu", "cuda"], help="device to benchmark on")
    g.addoption("--bench-preset", default="quick", choices=list(PRESETS), help="sizes and budgets (bench/presets.py)")
    g.addoption("--bench-lengths", default=None, help="comma-separated sequence lengths, e.g. 256,1024,4096")
    g.addoption("--bench-batch", default=None, help="comma-separated batch sizes")
    g.addoption("--bench-heads", default=None, type=int)
    g.addoption("--bench-dim", default=None, type=int, help="q/k head dim D")
    g.addoption("--bench-vdim", default=None, type=int, help="value head dim Dv")
    g.addoption("--bench-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    g.addoption("--bench-modes", default=None, help="fwd,fwdbwd")
    g.addoption("--bench-impls", default=None, help="regular expression selecting implementations by name")
    g.addoption("--bench-min-rounds", default=None, type=int, help="rounds at least (when within the case budget)")
    g.addoption("--bench-max-rounds", default=None, type=int)
    g.addoption("--bench-threads", default=None, type=int, help="torch.set_num_threads for the run (CPU)")
    g.addoption("--bench-case-budget", default=None, type=float, help="skip a case whose one call is estimated longer (s)")
    g.addoption("--bench-total-budget", default=None, type=float, help="skip the remaining cases after this many seconds")
    g.addoption("--bench-mem-gb", default=None, type=float, help="skip a case estimated to need more memory (GiB)")
    g.addoption("--bench-skips-json", default=None, help="write skipped cases and reasons to this file")
    g.addoption("--bench-fallback-json", default=None,
                help="results file of the stand-in `benchmark` fixture used when pytest-benchmark is not installed")


def suite_settings(config) -> dict:
    cfg = settings(config.getoption("--bench-device"), config.getoption("--bench-preset"))
    for key, opt in [
        ("lengths", "--bench-lengths"), ("batch", "--bench-batch"), ("heads", "--bench-heads"), ("dim", "--bench-dim"),
        ("vdim", "--bench-vdim"), ("dtype", "--bench-dtype"), ("modes", "--bench-modes"),
        ("min_rounds", "--bench-min-rounds"), ("max_rounds", "--bench-max-rounds"), ("threads", "--bench-threads"),
        ("case_budget_s", "--bench-case-budget"),
        ("total_budget_s", "--bench-total-budget"), ("mem_gb", "--bench-mem-gb"),
    ]:
        value = config.getoption(opt)
        if value is None:
            continue
        if key in _INT_LISTS:
            value = tuple(int(x) for x in str(value).split(",") if x.strip())
        elif key in _STR_LISTS:
            value = tuple(x.strip() for x in str(value).split(",") if x.strip())
        cfg[key] = value
    cfg["impls"] = config.getoption("--bench-impls")
    return cfg


_SKIPPED: list = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        _SKIPPED.append({"nodeid": report.nodeid, "reason": reason})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--bench-skips-json", default=None)
    if path:
        with open(path, "w") as f:
            json.dump({"skipped": _SKIPPED, "settings": _jsonable(suite_settings(session.config))}, f, indent=1)
    path = session.config.getoption("--bench-fallback-json", default=None)
    if path and _FALLBACK_RESULTS:
        with open(path, "w") as f:
            json.dump({"benchmarks": _FALLBACK_RESULTS, "fallback": "bench/conftest.py stand-in"}, f, indent=1)


_FALLBACK_RESULTS: list = []


class _Stats:
    def __init__(self, data):
        self.data = data
        self.min, self.max = min(data), max(data)
        self.mean, self.median = statistics.fmean(data), statistics.median(data)
        self.stddev = statistics.stdev(data) if len(data) > 1 else 0.0
        self.rounds = len(data)

    def as_dict(self):
        return {k: getattr(self, k) for k in ("min", "max", "mean", "median", "stddev", "rounds", "data")}


class FallbackBenchmark:
    """The part of pytest-benchmark's fixture the suite uses: ``extra_info``, ``pedantic``, ``stats.stats``."""

    def __init__(self, name: str):
        self.name = name
        self.extra_info: dict = {}
        self.stats = None

    def pedantic(self, target, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0):
        kwargs = kwargs or {}
        for _ in range(warmup_rounds * iterations):
            target(*args, **kwargs)
        data, result = [], None
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iterations):
                result = target(*args, **kwargs)
            data.append((time.perf_counter() - t0) / iterations)
        stats = _Stats(data)
        self.stats = type("Metadata", (), {"stats": stats})()
        _FALLBACK_RESULTS.append({"name": self.name, "extra_info": self.extra_info, "stats": stats.as_dict()})
        return result


if not HAVE_PYTEST_BENCHMARK:

    @pytest.fixture
    def benchmark(request):
        return FallbackBenchmark(request.node.name)


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
