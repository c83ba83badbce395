"""Scaling suite: time vs sequence length for every Taylor form and backend, softmax attention and peers.

Run through ``python -m bench.scaling`` (which also writes the tables and plots), or directly:

    pytest bench/test_scaling.py --bench-device cpu --bench-preset quick --benchmark-json cpu.json

Cases run shortest length first. A case is skipped, with its estimate in the reason, when it would need more
memory than the limit, when one call extrapolated from the previous length of the same curve would exceed the
per-case budget, or when the suite's total budget is spent. Outputs of the Taylor implementations are compared
with the quadratic reference at short lengths (the relative error is stored with the timing).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from bench.conftest import suite_settings
from bench.flops import form_flops, matmul_flops
from bench.impls import GIB, all_impls

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHECK_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Case:
    impl: str
    mode: Optional[str] = None
    causal: Optional[bool] = None
    batch: Optional[int] = None
    length: Optional[int] = None
    skip_reason: Optional[str] = None  # set for placeholder cases of implementations that cannot run here

    @property
    def id(self) -> str:
        if self.length is None:
            return f"{self.impl}-unavailable"
        return f"{self.mode}-{'causal' if self.causal else 'full'}-{self.impl}-B{self.batch}-L{self.length}"


def _device_problem(cfg) -> Optional[str]:
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def build_cases(cfg) -> list[Case]:
    """All cases of the suite for these settings, shortest length first (see the module docstring)."""
    problem = _device_problem(cfg)
    if problem:
        return [Case("all", skip_reason=problem)]
    device = torch.device(cfg["device"])
    pattern = re.compile(cfg["impls"]) if cfg.get("impls") else None
    impls = [i for i in all_impls() if pattern is None or pattern.search(i.name)]
    cases, runnable = [], []
    for impl in impls:
        reason = impl.unavailable_reason(device, causal=True)
        if reason:
            cases.append(Case(impl.name, skip_reason=reason))
        else:
            runnable.append(impl)
    order = {impl.name: n for n, impl in enumerate(runnable)}
    grid = [
        Case(impl.name, mode, causal, batch, length)
        for impl in runnable
        for mode in cfg["modes"]
        for causal in cfg["causal"]
        if causal or not impl.causal_only
        for batch in cfg["batch"]
        for length in cfg["lengths"]
    ]
    grid.sort(key=lambda c: (c.length, c.batch, c.mode, c.causal, order[c.impl]))
    return cases + grid


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = build_cases(suite_settings(metafunc.config))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


class SuiteState:
    def __init__(self):
        self.start = time.perf_counter()
        self.last: dict = {}  # curve key -> (length, seconds per call)
        self.failed: dict = {}  # curve key -> reason


@pytest.fixture(scope="session")
def suite(request):
    cfg = suite_settings(request.config)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    return cfg


@pytest.fixture(scope="session")
def state():
    return SuiteState()


@pytest.fixture(scope="session")
def impls_by_name():
    return {impl.name: impl for impl in all_impls()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_limit(cfg, device) -> float:
    """Bytes a single case may use: the configured limit, capped by what is free now."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] * 0.85
    else:
        free = _mem_available() * 0.6
    if cfg.get("mem_gb"):
        return min(free, cfg["mem_gb"] * GIB)
    return free


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8.0 * GIB


def _is_oom(exc: Exception) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # CPU allocator
    )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _skip_budget(cfg, state):
    elapsed = time.perf_counter() - state.start
    if elapsed > cfg["total_budget_s"]:
        pytest.skip(f"suite time budget of {cfg['total_budget_s']:.0f} s used up ({elapsed:.0f} s elapsed)")


def test_scaling(case, benchmark, suite, state, impls_by_name):
    if case.skip_reason:
        pytest.skip(case.skip_reason)
    cfg = suite
    impl = impls_by_name[case.impl]
    device = torch.device(cfg["device"])
    dtype = _DTYPES[cfg["dtype"]]
    b, h, d, dv, length = case.batch, cfg["heads"], cfg["dim"], cfg["vdim"], case.length
    key = (impl.name, case.mode, case.causal, b)
    _skip_budget(cfg, state)
    if key in state.failed:
        pytest.skip(f"{state.failed[key]} (at a shorter length)")

    elem = torch.tensor([], dtype=dtype).element_size()
    io_bytes = b * h * length * (2 * d + 2 * dv) * elem * (2 if case.mode == "fwdbwd" else 1)
    mem = impl.memory_estimate(b, h, length, d, dv, case.mode, device.type) + io_bytes
    limit = memory_limit(cfg, device)
    if mem > limit:
        pytest.skip(f"estimated memory {mem / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB")
    if key in state.last:
        l0, t0 = state.last[key]
        est = t0 * (length / l0) ** impl.growth
        if est > cfg["case_budget_s"]:
            pytest.skip(
                f"estimated {est:.2f} s per call > case budget {cfg['case_budget_s']:.1f} s "
                f"({t0 * 1e3:.1f} ms at L={l0} × (L/{l0})^{impl.growth:g})"
            )

    gen = torch.Generator().manual_seed(1234 + length)
    q = torch.randn(b, h, length, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, h, length, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, h, length, dv, generator=gen).to(device=device, dtype=dtype)
    fn, args = impl.prepare(q, k, v, case.causal)
    if case.mode == "fwdbwd":
        args = tuple(a.detach().requires_grad_(True) for a in args)
    grad_out = []

    def forward():
        out = fn(*args)
        _sync(device)
        return out

    def forward_backward():
        out = fn(*args)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        torch.autograd.grad(out, args, grad_out[0])
        _sync(device)

    target = forward if case.mode == "fwd" else forward_backward
    warmups = 2 if device.type == "cuda" else 1
    oom = None
    try:
        for _ in range(warmups):
            est = _timed(target)
    except Exception as exc:
        if not _is_oom(exc):
            state.failed[key] = f"failed ({type(exc).__name__})"
            if impl.family.startswith("peer"):  # a peer's own failure is reported, not counted against this suite
                pytest.skip(f"peer raised {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
            raise
        oom = str(exc).splitlines()[0][:160]  # skip outside the handler, so the traceback's tensors are freed
    if oom is not None:
        state.failed[key] = "out of memory"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"out of memory (estimate was {mem / GIB:.1f} GiB): {oom}")

    info = dict(
        impl=impl.name, form=impl.form, family=impl.family, mode=case.mode, causal=case.causal, batch=b, heads=h,
        length=length, dim=d, vdim=dv, dtype=cfg["dtype"], device=device.type, note=impl.note,
        est_mem_gib=round(mem / GIB, 4),
    )
    fd, fdv = impl.flop_dims(d, dv) if impl.flop_dims else (d, dv)
    info["flops"] = form_flops(impl.form, length, fd, fdv, causal=case.causal, batch_heads=b * h, mode=case.mode)

    if impl.computes_taylor and case.mode == "fwd" and length <= cfg["check_max_len"]:
        from linattn_cuda.ops.taylor.naive import taylor_attention_quadratic

        with torch.no_grad():
            out = forward().float()
            ref = taylor_attention_quadratic(q.float(), k.float(), v.float(), causal=case.causal)
            err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        info["max_rel_err"] = err
        if impl.check_required:
            assert err <= _CHECK_TOL[dtype], f"{impl.name} disagrees with the quadratic reference: rel err {err:.2e}"

    # at least min_rounds while they fit in the per-case budget, more (up to max_rounds) within the round budget
    floor = max(1, min(cfg["min_rounds"], int(cfg["case_budget_s"] / max(est, 1e-9))))
    rounds = max(floor, min(cfg["max_rounds"], int(cfg["round_budget_s"] / max(est, 1e-9))))
    info["rounds"] = rounds
    benchmark.extra_info.update(info)
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    # the best round estimates the cost of the next length: one preempted round must not skip the rest of a curve
    state.last[key] = (length, min(est, stats.min) if stats is not None else est)


@pytest.mark.parametrize("size", ["half", "full"])
def test_matmul_peak(benchmark, suite, size):
    """The machine's dense matmul throughput (sgemm on CPU, the suite dtype on CUDA): the GFLOP/s ceiling.

    Two sizes (peak_n/2 and peak_n); the report takes the best round of either.
    """
    problem = _device_problem(suite)
    if problem:
        pytest.skip(problem)
    device = torch.device(suite["device"])
    dtype = torch.float32 if device.type == "cpu" else _DTYPES[suite["dtype"]]
    n = suite["peak_n"] // (2 if size == "half" else 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    bm = torch.randn(n, n, device=device, dtype=dtype)

    def target():
        torch.matmul(a, bm)
        _sync(device)

    est = min(_timed(target) for _ in range(2))
    rounds = max(5, min(30, int(1.5 / max(est, 1e-9))))
    benchmark.extra_info.update(
        impl="matmul_peak", kind="peak", n=n, dtype=str(dtype).replace("torch.", ""), device=device.type,
        flops=matmul_flops(n), rounds=rounds,
    )
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=1)

