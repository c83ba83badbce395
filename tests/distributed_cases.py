"""Shared pieces of the distributed tests: the inputs of a case (the same on every rank and in the test process),
the call of a context-parallel function on one rank's shard, and a counter of the bytes put into collectives."""
from __future__ import annotations

import torch

from linattn_cuda.distributed import hybrid_attention_cp, taylor_attention_cp


def bounds(lengths, rank):
    start = sum(lengths[:rank])
    return start, start + lengths[rank]


def make_inputs(case: dict) -> dict:
    """Full-sequence inputs of a case, float64 unless ``case["dtype"]``: fresh random values from its seed."""
    g = torch.Generator().manual_seed(case["seed"])
    b, h, hk, d, dv = case["B"], case["H"], case.get("Hkv", case["H"]), case["D"], case["Dv"]
    tk = sum(case["lengths"])
    tq = sum(case.get("q_lengths", case["lengths"]))
    dtype = case.get("dtype", torch.float64)
    x = {
        "q": torch.randn(b, h, tq, d, generator=g, dtype=torch.float64),
        "k": torch.randn(b, hk, tk, d, generator=g, dtype=torch.float64),
        "v": torch.randn(b, hk, tk, dv, generator=g, dtype=torch.float64),
        "grad_out": torch.randn(b, h, tq, dv, generator=g, dtype=torch.float64),
        "mask": None,
        "far_weight": None,
    }
    if case.get("logit_scale"):
        x["q"] *= case["logit_scale"]
    if case.get("mask"):
        x["mask"] = torch.rand(b, tk, generator=g) < 0.3
    if case.get("far_weight"):
        x["far_weight"] = torch.rand(h, generator=g, dtype=torch.float64) + 0.5
    for name in ("q", "k", "v", "grad_out"):
        x[name] = x[name].to(dtype)
    return x


class ByteCounter:
    """Wraps torch.distributed's tensor all-gathers (every collective of linattn_cuda.distributed goes through
    one of them) and records ``(dtype, bytes put in)`` of every call."""

    def __init__(self):
        import torch.distributed as dist

        self.calls = []
        for name in ("all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def counting(out, inp, *args, **kwargs):
            self.calls.append((str(inp.dtype), inp.numel() * inp.element_size()))
            return fn(out, inp, *args, **kwargs)

        return counting

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def run_case_on_rank(case: dict, rank: int, counter: ByteCounter) -> dict:
    """This rank's shard of the case through the context-parallel function, forward and backward."""
    x = make_inputs(case)
    ks, ke = bounds(case["lengths"], rank)
    qs, qe = bounds(case.get("q_lengths", case["lengths"]), rank)
    q = x["q"][:, :, qs:qe].clone().requires_grad_()
    k = x["k"][:, :, ks:ke].clone().requires_grad_()
    v = x["v"][:, :, ks:ke].clone().requires_grad_()
    mask = None if x["mask"] is None else x["mask"][:, ks:ke].clone()
    fw = None if x["far_weight"] is None else x["far_weight"].clone().requires_grad_()
    common = dict(causal=case["causal"], key_padding_mask=mask, enable_gqa=case.get("Hkv", case["H"]) != case["H"],
                  backend=case.get("backend", "auto"))
    counter.take()
    if case["op"] == "taylor":
        out = taylor_attention_cp(q, k, v, overlap=case.get("overlap", False), **common)
    else:
        out = hybrid_attention_cp(q, k, v, window=case["window"], far_weight=fw, **common)
    forward_calls = counter.take()
    schedule = type(out.grad_fn).__name__
    (out.double() * x["grad_out"][:, :, qs:qe].double()).sum().backward()
    backward_calls = counter.take()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dfar": None if fw is None else fw.grad, "schedule": schedule, "forward_calls": forward_calls, "backward_calls": backward_calls}


def run_cases(rank: int, world_size: int, cases: list) -> dict:
    """The launcher's target: every case whose shard count is ``world_size``, by id."""
    counter = ByteCounter()
    return {c["id"]: run_case_on_rank(c, rank, counter) for c in cases if len(c["lengths"]) == world_size}
