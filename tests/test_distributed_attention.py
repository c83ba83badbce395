"""Context parallelism (linattn_cuda.distributed) against single-process float64 results, on 2 and 3 gloo
processes spawned by the test: every rank's shard of the output and of dq, dk, dv (and far_weight's gradient,
summed over ranks) equal to the whole-sequence result to 1e-12 relative; the bytes each rank puts into
collectives are the state (plus halo) size, whatever the shard length."""
from __future__ import annotations

import pytest
import torch

import linattn_cuda as la
from linattn_cuda.feature_map import feature_dim
from tests.distributed_cases import make_inputs, run_cases
from linattn_cuda.distributed.launch import run_ranks

try:  # the float64 definition of the hybrid (ops/hybrid/naive.py once the fused hybrid lands)
    from linattn_cuda.ops.hybrid.naive import hybrid_attention_reference
except ImportError:
    from linattn_cuda.ops.hybrid.blocked import hybrid_attention_reference

TOL = 1e-12


def _case(op, lengths, *, causal, B=2, H=3, D=5, Dv=4, seed, **kw):
    parts = [op, "causal" if causal else "noncausal", "-".join(map(str, lengths)), f"B{B}-H{H}"]
    parts += [f"{k}{v}" for k, v in sorted(kw.items()) if k not in ("dtype",)]
    if "dtype" in kw:
        parts.append(str(kw["dtype"]).replace("torch.", ""))
    return dict(id="-".join(parts), op=op, lengths=lengths, causal=causal, B=B, H=H, D=D, Dv=Dv, seed=seed, **kw)


# the same shapes at two shard lengths: the bytes communicated must not change
TAYLOR_SHORT_LONG = [_case("taylor", [n, n], causal=True, B=1, H=2, D=4, Dv=6, seed=8) for n in (8, 64)]
HYBRID_SHORT_LONG = [_case("hybrid", [n, n], causal=True, B=1, H=2, D=4, Dv=3, window=6, seed=16) for n in (8, 40)]

CASES_2 = [
    _case("taylor", [7, 12], causal=True, seed=1),
    _case("taylor", [7, 12], causal=True, seed=1, overlap=True),
    _case("taylor", [7, 12], causal=False, seed=2),
    _case("taylor", [7, 12], causal=False, seed=2, overlap=True),
    _case("taylor", [9, 4], causal=True, H=4, Hkv=2, mask=True, seed=3),
    _case("taylor", [9, 4], causal=False, H=4, Hkv=2, mask=True, seed=4, overlap=True),
    _case("taylor", [3, 16], causal=True, mask=True, seed=5),
    _case("taylor", [10, 3], causal=False, q_lengths=[6, 9], mask=True, seed=6),
    _case("taylor", [6, 5], causal=True, mask=True, seed=7, backend="reference"),
    *TAYLOR_SHORT_LONG,
    _case("hybrid", [9, 11], causal=True, H=2, D=4, Dv=3, window=4, seed=10),
    _case("hybrid", [3, 12], causal=True, H=2, D=4, Dv=3, window=8, mask=True, far_weight=True, seed=11),
    _case("hybrid", [10, 6], causal=False, H=4, Hkv=2, D=4, Dv=3, window=5, mask=True, seed=12),
    _case("hybrid", [4, 7], causal=False, H=2, D=4, Dv=3, window=9, far_weight=True, seed=13),
    _case("hybrid", [5, 6], causal=True, H=2, D=4, Dv=3, window=1, seed=14),
    _case("hybrid", [9, 10], causal=True, H=2, D=4, Dv=3, window=4, logit_scale=12.0, seed=15),
    *HYBRID_SHORT_LONG,
]
CASES_3 = [
    _case("taylor", [4, 9, 6], causal=True, H=4, Hkv=2, mask=True, seed=20),
    _case("taylor", [4, 9, 6], causal=True, H=4, Hkv=2, mask=True, seed=20, overlap=True),
    _case("taylor", [5, 0, 8], causal=False, mask=True, seed=21),
    _case("taylor", [5, 0, 8], causal=True, seed=22, overlap=True),
    _case("hybrid", [2, 3, 10], causal=True, H=2, D=4, Dv=3, window=6, mask=True, seed=23),
    _case("hybrid", [3, 2, 7], causal=False, H=4, Hkv=2, D=4, Dv=3, window=4, mask=True, far_weight=True, seed=24),
    _case("hybrid", [5, 0, 6], causal=True, H=2, D=4, Dv=3, window=3, seed=25),
    _case("hybrid", [5, 4, 6], causal=False, H=2, D=4, Dv=3, window=10**6, seed=26),
]
LOW_PRECISION = [  # checked against the single-process result's own error in that dtype
    _case("taylor", [20, 13], causal=True, H=2, D=8, Dv=8, mask=True, dtype=torch.float32, seed=30),
    _case("taylor", [20, 13], causal=True, H=2, D=8, Dv=8, mask=True, dtype=torch.float32, overlap=True, seed=30),
    _case("taylor", [20, 13], causal=False, H=2, D=8, Dv=8, dtype=torch.bfloat16, seed=31),
    _case("taylor", [20, 13], causal=False, H=2, D=8, Dv=8, dtype=torch.bfloat16, overlap=True, seed=31),
    _case("hybrid", [20, 13], causal=True, H=2, D=8, Dv=8, window=6, dtype=torch.float32, seed=32),
    _case("hybrid", [20, 13], causal=False, H=2, D=8, Dv=8, window=6, mask=True, dtype=torch.bfloat16, seed=33),
]


@pytest.fixture(scope="module")
def results():
    """Every case's per-rank results: one group of 2 and one of 3 processes run all of them."""
    two = run_ranks(run_cases, 2, CASES_2 + LOW_PRECISION)
    three = run_ranks(run_cases, 3, CASES_3)
    return {c["id"]: [r[c["id"]] for r in (two if len(c["lengths"]) == 2 else three)]
            for c in CASES_2 + CASES_3 + LOW_PRECISION}


def _reference(case, dtype=torch.float64, backend="reference"):
    """The whole sequence in one process: output and gradients (float64 definitions unless ``dtype``)."""
    x = make_inputs(case)
    q, k, v = (x[n].to(dtype).clone().requires_grad_() for n in ("q", "k", "v"))
    fw = None if x["far_weight"] is None else x["far_weight"].clone().requires_grad_()
    gqa = case.get("Hkv", case["H"]) != case["H"]
    if case["op"] == "taylor":
        out = la.taylor_attention(q, k, v, causal=case["causal"], key_padding_mask=x["mask"], enable_gqa=gqa,
                                  backend=backend)
    elif dtype == torch.float64:
        out = hybrid_attention_reference(q, k, v, window=case["window"], causal=case["causal"],
                                         key_padding_mask=x["mask"], far_weight=fw)
    else:
        out = la.hybrid_attention(q, k, v, window=case["window"], causal=case["causal"], key_padding_mask=x["mask"],
                                  far_weight=fw, enable_gqa=gqa)
    (out.double() * x["grad_out"].double()).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dfar": None if fw is None else fw.grad}


def _gathered(per_rank, key):
    if key == "dfar":
        return sum(r[key] for r in per_rank)
    return torch.cat([r[key] for r in per_rank], dim=2)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("case", CASES_2 + CASES_3, ids=lambda c: c["id"])
def test_shards_equal_the_whole_sequence(results, case):
    ref = _reference(case)
    for key in ("out", "dq", "dk", "dv", "dfar"):
        if ref[key] is None:
            continue
        got = _gathered(results[case["id"]], key)
        assert got.shape == ref[key].shape, key
        assert _rel(got, ref[key]) <= TOL, f"{key}: relative error {_rel(got, ref[key]):.2e}"


@pytest.mark.parametrize("case", LOW_PRECISION, ids=lambda c: c["id"])
def test_low_precision_as_accurate_as_one_process(results, case):
    """In float32 / bfloat16 the sharded result is within 3x the single-process result's own error (against
    float64) plus a few units of the dtype's rounding."""
    ref = _reference(case)
    single = _reference(case, dtype=case["dtype"], backend="auto")
    eps = torch.finfo(case["dtype"]).eps
    for key in ("out", "dq", "dk", "dv"):
        got = _gathered(results[case["id"]], key)
        assert got.dtype == case["dtype"]
        err, base = _rel(got, ref[key]), _rel(single[key], ref[key])
        assert err <= 3 * base + 4 * eps, f"{key}: sharded {err:.2e}, one process {base:.2e}"


def _expected_bytes(case) -> tuple[int, int]:
    """(forward, backward) bytes of the payload all-gather: the state, plus for the hybrid the halo pieces (the
    last W - 1 keys and values; padding flags forward only; both ends when non-causal), each padded to 8 bytes."""
    b, hk, d, dv = case["B"], case.get("Hkv", case["H"]), case["D"], case["Dv"]
    dtype = case.get("dtype", torch.float64)
    el = 8 if dtype == torch.float64 else 4  # the state: float32 (float64 for float64 inputs)
    io = torch.empty((), dtype=dtype).element_size()  # the halo's keys and values: the input dtype
    pad = lambda n: n + (-n) % 8  # noqa: E731
    m = feature_dim(d)
    state = pad(b * hk * m * dv * el) + pad(b * hk * m * el)
    if case["op"] == "taylor":
        return state, state
    rows = min(case["window"], sum(case["lengths"])) - 1  # a window beyond the sequence is the sequence
    sides = 1 if case["causal"] else 2
    halo = pad(b * hk * rows * d * io) + pad(b * hk * rows * dv * io)
    return state + sides * (halo + pad(b * rows)), state + sides * halo


@pytest.mark.parametrize("case", CASES_2 + CASES_3 + LOW_PRECISION, ids=lambda c: c["id"])
def test_collective_bytes_are_the_state_plus_halo(results, case):
    """Forward: one fixed-size check (a few int64 per rank) and one all-gather of the state (+ halo); backward: one
    all-gather of their gradients. Nothing else, on every rank."""
    fwd, bwd = _expected_bytes(case)
    for rank, r in enumerate(results[case["id"]]):
        check, payload = r["forward_calls"]
        assert check[0] == "torch.int64" and check[1] <= 16 * 8, (rank, check)
        assert payload == ("torch.uint8", fwd), (rank, payload, fwd)
        assert r["backward_calls"] == [("torch.uint8", bwd)], (rank, r["backward_calls"], bwd)


@pytest.mark.parametrize("pair", [TAYLOR_SHORT_LONG, HYBRID_SHORT_LONG], ids=["taylor", "hybrid"])
def test_collective_bytes_do_not_grow_with_the_shard(results, pair):
    """The same shape at shard lengths 8 and 64 (Taylor) / 8 and 40 (hybrid): the same bytes on every rank."""
    a, b = pair
    for ra, rb in zip(results[a["id"]], results[b["id"]]):
        assert ra["forward_calls"] == rb["forward_calls"]
        assert ra["backward_calls"] == rb["backward_calls"]


@pytest.mark.parametrize("case", [c for c in CASES_2 + CASES_3 + LOW_PRECISION if c["op"] == "taylor"],
                         ids=lambda c: c["id"])
def test_the_schedule_asked_for_ran(results, case):
    """overlap=True runs the overlapped schedule (its own autograd node), the default the fused one."""
    overlapped = case.get("overlap", False)
    for r in results[case["id"]]:
        assert (r["schedule"] == "_OverlappedTaylorCPBackward") == overlapped, r["schedule"]
