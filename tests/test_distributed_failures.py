"""A rank whose call is refused makes every rank of the group raise, promptly (no rank left waiting in a
collective); ranks that disagree on the call all raise the same error; the launcher stops a group whose rank
raised outside the library without waiting for a timeout."""
from __future__ import annotations

import time

import pytest
import torch

from linattn_cuda.distributed import hybrid_attention_cp, taylor_attention_cp
from linattn_cuda.distributed.launch import RankFailed, run_ranks


def _inputs(rank, length=6, d=4, dv=3):
    g = torch.Generator().manual_seed(rank)
    return (torch.randn(2, 2, length, d, generator=g), torch.randn(2, 2, length, d, generator=g),
            torch.randn(2, 2, length, dv, generator=g))


def _attempt(fn):
    """(exception type name, message, seconds) of a call expected to raise on this rank."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc) + "".join(getattr(exc, "__notes__", [])), time.perf_counter() - t0
    return None, "did not raise", time.perf_counter() - t0


def _bad_calls(rank, world_size):
    q, k, v = _inputs(rank)
    records = {}
    # rank 1's k has the wrong feature dim: refused by its own checks
    bad_k = torch.randn(2, 2, 6, 5) if rank == 1 else k
    records["bad_shape"] = _attempt(lambda: taylor_attention_cp(q, bad_k, v))
    # the ranks disagree on causal
    records["disagree_causal"] = _attempt(lambda: taylor_attention_cp(q, k, v, causal=rank == 0))
    # rank 0 passes a different batch size
    qb, kb, vb = (x[:1] for x in (q, k, v)) if rank == 0 else (q, k, v)
    records["disagree_batch"] = _attempt(lambda: taylor_attention_cp(qb, kb, vb))
    # a bad window on rank 0 only
    records["bad_window"] = _attempt(lambda: hybrid_attention_cp(q, k, v, window=0 if rank == 0 else 4))
    # overlap=True with a backend that has no op family
    records["overlap_reference"] = _attempt(lambda: taylor_attention_cp(q, k, v, overlap=True, backend="reference"))
    # a good call afterwards: the group is still in step
    out = taylor_attention_cp(q, k, v)
    records["after"] = tuple(out.shape)
    return records


@pytest.fixture(scope="module")
def records():
    return run_ranks(_bad_calls, 2, timeout=120, collective_timeout=60)


@pytest.mark.parametrize("name, own_type, text", [
    ("bad_shape", "ValueError", "k must have the feature dim D of q"),
    ("bad_window", "ValueError", "window must be a positive integer"),
    ("overlap_reference", "NotImplementedError", "overlapped schedule"),
])
def test_a_refused_rank_fails_every_rank_with_its_error(records, name, own_type, text):
    failing = 1 if name == "bad_shape" else 0
    for rank, r in enumerate(records):
        kind, message, seconds = r[name]
        if name == "overlap_reference" or rank == failing:
            assert kind == own_type, (rank, kind, message)
        else:
            assert kind == "RuntimeError" and f"rank(s) [{failing}]" in message, (rank, kind, message)
        assert text in message, (rank, message)
        assert seconds < 10, f"rank {rank} took {seconds:.1f} s to fail (a collective waited for a timeout)"


@pytest.mark.parametrize("name, field", [("disagree_causal", "causal flag"), ("disagree_batch", "batch size B")])
def test_ranks_that_disagree_all_raise_the_same_error(records, name, field):
    messages = set()
    for r in records:
        kind, message, seconds = r[name]
        assert kind == "ValueError" and field in message, message
        assert seconds < 10
        messages.add(message)
    assert len(messages) == 1


def test_the_group_stays_in_step_after_refusals(records):
    assert [r["after"] for r in records] == [(2, 2, 6, 3)] * 2


def _raise_outside_the_library(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()  # would wait for rank 1 until the collective timeout


def test_the_launcher_stops_the_group_when_a_rank_raises():
    t0 = time.perf_counter()
    with pytest.raises(RankFailed, match="boom on rank 1"):
        run_ranks(_raise_outside_the_library, 2, timeout=60, collective_timeout=60)
    assert time.perf_counter() - t0 < 30


def test_without_a_process_group_the_error_says_what_to_do():
    q, k, v = _inputs(0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        taylor_attention_cp(q, k, v)
