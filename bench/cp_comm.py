"""Context parallelism: bytes communicated per rank and layer against ring attention, the overlap of the state
all-gather with the local compute, and weak scaling (linattn_cuda.distributed).

    python -m bench.cp_comm all --out bench/results          # everything below, cp_comm.{json,md}
    python -m bench.cp_comm bytes | overlap | weak | nccl    # one part, printed

* ``bytes`` (measured, gloo): every rank runs ``taylor_attention_cp`` / ``hybrid_attention_cp`` forward and backward,
  and a ring attention (softmax, causal: every rank's keys and values passed around the ring with point-to-point
  sends, online-softmax merge; checked against SDPA on the whole sequence), with torch.distributed's all-gather
  and send wrapped to count the bytes each rank puts in. Ring attention's backward (keys/values and their
  gradients around the ring again: twice the forward's bytes) is computed, not run.
* ``nccl`` (computed): the same formulas at the Based shape (B 16, H 16, D 16, Dv 64, bf16 inputs, float32 state)
  on 8..64 GPUs. "Sent per rank" counts a ring all-gather (NCCL's algorithm for large messages): each rank sends
  P - 1 pieces. The time column is bytes / an assumed 50 GB/s per GPU (400 Gb/s InfiniBand NDR), not a measurement.
* ``overlap`` (measured, 2 processes): forward + backward time of the fused and the overlapped schedules, the local
  attention alone (one process, the shard's length, no communication) and the state all-gathers alone.
* ``weak`` (measured): forward + backward time at a fixed shard length on 1, 2 and 4 processes.

Every process runs one thread. Timings are medians over interleaved rounds on a shared machine: compare columns
of one table only, never across machines.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from linattn_cuda.distributed.launch import run_ranks
from linattn_cuda.feature_map import feature_dim

BASED = dict(B=16, H=16, D=16, Dv=64)


# ------------------------------------------------------------------------------------------------- formulas


def state_bytes(b, hkv, d, dv, state_el=4) -> int:
    """One rank's Taylor state: kv [B, Hkv, M, Dv] and k_sum [B, Hkv, M]."""
    return b * hkv * feature_dim(d) * (dv + 1) * state_el


def halo_bytes(b, hkv, d, dv, window, el=2, flags=True) -> int:
    """The last W - 1 keys and values (and, forward, their padding flags) of one rank."""
    return (window - 1) * (b * hkv * (d + dv) * el + (b if flags else 0))


def ring_bytes(b, hkv, d, dv, shard, ranks, el=2) -> int:
    """Ring attention forward: the shard's keys and values sent P - 1 times."""
    return (ranks - 1) * b * hkv * shard * (d + dv) * el


# ------------------------------------------------------------------------------------------------- ring attention


def ring_attention(q, k, v, group=None):
    """Causal softmax attention over a sequence sharded in equal contiguous shards: each rank's keys and values go
    around the ring (P - 1 point-to-point sends), merged with an online softmax. Forward only."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    scale = q.shape[-1] ** -0.5
    kv = torch.cat([k, v], dim=-1).contiguous()
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    for step in range(world):
        src = (rank - step) % world
        ops = []
        if step < world - 1:
            nxt = torch.empty_like(kv)
            ops = [dist.isend(kv, (rank + 1) % world, group), dist.irecv(nxt, (rank - 1) % world, group)]
        if src <= rank:
            kc, vc = kv[..., : k.shape[-1]], kv[..., k.shape[-1]:]
            s = scale * q @ kc.transpose(-1, -2)
            if src == rank:
                s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
            block_lse = torch.logsumexp(s, dim=-1)
            new = torch.logaddexp(lse, block_lse)
            out = out * torch.exp(lse - new).unsqueeze(-1) + (torch.softmax(s, -1) @ vc) * torch.exp(block_lse - new).unsqueeze(-1)
            lse = new
        for op in ops:
            op.wait()
        if ops:
            kv = nxt
    return out


class _Counter:
    def __init__(self):
        import torch.distributed as dist

        self.bytes = {"all_gather": 0, "send": 0}
        for name, kind in (("all_gather_single", "all_gather"), ("all_gather_into_tensor", "all_gather"),
                           ("isend", "send"), ("send", "send")):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), kind))

    def _wrap(self, fn, kind):
        def counting(*args, **kwargs):
            t = args[1] if kind == "all_gather" else args[0]
            self.bytes[kind] += t.numel() * t.element_size()
            return fn(*args, **kwargs)

        return counting

    def take(self) -> dict:
        out, self.bytes = self.bytes, {"all_gather": 0, "send": 0}
        return out


def _bytes_worker(rank, world, configs):
    from linattn_cuda.distributed import hybrid_attention_cp, taylor_attention_cp

    counter = _Counter()
    rows = []
    for c in configs:
        b, h, d, dv, total = c["B"], c["H"], c["D"], c["Dv"], c["L"]
        shard = total // world
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(b, h, total, n, generator=g) for n in (d, d, dv)]
        part = [x[:, :, rank * shard:(rank + 1) * shard].clone().requires_grad_() for x in full]
        row = dict(c, ranks=world, shard=shard)
        for name, fn in (("taylor", lambda: taylor_attention_cp(*part)),
                         ("hybrid", lambda: hybrid_attention_cp(*part, window=c["window"]))):
            counter.take()
            out = fn()
            fwd = counter.take()["all_gather"]
            out.sum().backward()
            row[name] = {"forward": fwd, "backward": counter.take()["all_gather"]}
        if c.get("ring", True):
            q, k, v = (x.detach() for x in part)
            counter.take()
            out = ring_attention(q, k, v)
            row["ring"] = {"forward": counter.take()["send"]}
            ref = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True)[:, :, rank * shard:(rank + 1) * shard]
            row["ring"]["max_error_vs_sdpa"] = (out - ref).abs().max().item()
        rows.append(row)
    return rows


def measure_bytes(lengths=(1024, 4096, 16384), ranks=(2, 4), ring_max=4096, b=1, h=2, d=16, dv=64, window=64):
    rows = []
    for p in ranks:
        configs = [dict(B=b, H=h, D=d, Dv=dv, L=n, window=window, ring=n <= ring_max) for n in lengths]
        rows += run_ranks(_bytes_worker, p, configs, timeout=1800, collective_timeout=600)[0]
    return rows


# ------------------------------------------------------------------------------------------------- timing


def _timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _overlap_worker(rank, world, configs, rounds):
    import torch.distributed as dist

    import linattn_cuda as la
    from linattn_cuda.distributed import taylor_attention_cp
    from linattn_cuda.distributed.collectives import all_gather

    results = []
    for c in configs:
        b, h, d, dv, n, causal = c["B"], c["H"], c["D"], c["Dv"], c["shard"], c["causal"]
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(b, h, n, x, generator=g).requires_grad_() for x in (d, d, dv))
        grad = torch.randn(b, h, n, dv, generator=g)
        state = torch.randn(state_bytes(b, h, d, dv) // 4)

        def cp(overlap):
            return lambda: taylor_attention_cp(q, k, v, causal=causal, overlap=overlap).backward(grad)

        def local():
            la.taylor_attention(q, k, v, causal=causal).backward(grad)

        def comm():
            all_gather(state, None)
            all_gather(state, None)

        runs = {"fused": cp(False), "overlapped": cp(True), "local_alone": local, "state_all_gathers_alone": comm}
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                dist.barrier()
                times[name] += _timed(fn, 1)
        results.append(dict(c, ms={k: 1000 * statistics.median(t[1:]) for k, t in times.items()}))
    return results


def measure_overlap(shards=(2048, 8192), rounds=7, b=1, h=4, d=16, dv=64):
    configs = [dict(B=b, H=h, D=d, Dv=dv, shard=n, causal=causal) for n in shards for causal in (True, False)]
    per_rank = run_ranks(_overlap_worker, 2, configs, rounds, timeout=3000, collective_timeout=600)
    return [dict(c, ms_per_rank=[r[i]["ms"] for r in per_rank]) for i, c in enumerate(configs)]


def _weak_worker(rank, world, c, rounds):
    import torch.distributed as dist

    from linattn_cuda.distributed import hybrid_attention_cp, taylor_attention_cp

    b, h, d, dv, n = c["B"], c["H"], c["D"], c["Dv"], c["shard"]
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(b, h, n, x, generator=g).requires_grad_() for x in (d, d, dv))
    grad = torch.randn(b, h, n, dv, generator=g)
    runs = {"taylor": lambda: taylor_attention_cp(q, k, v).backward(grad),
            "hybrid": lambda: hybrid_attention_cp(q, k, v, window=c["window"]).backward(grad)}
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            dist.barrier()
            times[name] += _timed(fn, 1)
    return {name: 1000 * statistics.median(t[1:]) for name, t in times.items()}


def measure_weak(ranks=(1, 2, 4), shard=4096, rounds=5, b=1, h=4, d=16, dv=64, window=64):
    c = dict(B=b, H=h, D=d, Dv=dv, shard=shard, window=window)
    rows = []
    for p in ranks:
        per_rank = run_ranks(_weak_worker, p, c, rounds, timeout=3000, collective_timeout=600)
        rows.append(dict(c, ranks=p, total=p * shard, ms_max_over_ranks={k: max(r[k] for r in per_rank) for k in per_rank[0]}))
    return rows


# ------------------------------------------------------------------------------------------------- NCCL estimate


def nccl_table(ranks=(8, 16, 32, 64), lengths=(32768, 131072, 524288, 2097152), window=64, gbps=50.0):
    b, h, d, dv = BASED["B"], BASED["H"], BASED["D"], BASED["Dv"]
    s = state_bytes(b, h, d, dv)
    halo_f, halo_b = halo_bytes(b, h, d, dv, window), halo_bytes(b, h, d, dv, window, flags=False)
    rows = []
    for p in ranks:
        for n in lengths:
            shard = n // p
            ours = (p - 1) * 2 * s  # a ring all-gather forward, one backward
            hybrid = ours + (p - 1) * (halo_f + halo_b)
            ring = 3 * ring_bytes(b, h, d, dv, shard, p)  # forward + a backward of twice its bytes
            rows.append(dict(ranks=p, length=n, shard=shard, taylor_bytes=ours, hybrid_bytes=hybrid, ring_bytes=ring,
                             ring_over_taylor=ring / ours, taylor_ms=ours / gbps / 1e6, ring_ms=ring / gbps / 1e6))
    return rows


# ------------------------------------------------------------------------------------------------- report


def _mib(x):
    return f"{x / 2**20:,.2f}"


def report(results: dict) -> str:
    from bench.machine import format_machine_header

    out = ["# Context parallelism: communication, overlap, weak scaling", "", format_machine_header(results["machine"]), ""]
    if "bytes" in results:
        r0 = results["bytes"][0]
        out += [f"## Bytes each rank puts into collectives per layer (measured, gloo; B {r0['B']}, H {r0['H']}, D {r0['D']}, "
                f"Dv {r0['Dv']}, float32, causal; hybrid window {r0['window']})", "",
                "Taylor / hybrid: what each rank puts into its forward + backward all-gathers (its state, plus its halo for "
                "the hybrid; measured), and what it sends when the all-gather runs as a ring (P - 1 times that). Ring "
                "attention: its forward's point-to-point sends (measured) and a backward of twice that (computed). MiB.", "",
                "| ranks | length | shard | Taylor CP put in | Taylor CP sent | hybrid CP put in | hybrid CP sent | "
                "ring attention sent | ring / Taylor sent | ring max error vs SDPA |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["bytes"]:
            t = r["taylor"]["forward"] + r["taylor"]["backward"]
            hy = r["hybrid"]["forward"] + r["hybrid"]["backward"]
            ring = r.get("ring")
            ring_total = 3 * ring["forward"] if ring else 3 * ring_bytes(r["B"], r["H"], r["D"], r["Dv"], r["shard"], r["ranks"], el=4)
            mark = "" if ring else " (computed)"
            err = f"{ring['max_error_vs_sdpa']:.1e}" if ring else "-"
            hops = r["ranks"] - 1
            out.append(f"| {r['ranks']} | {r['L']} | {r['shard']} | {_mib(t)} | {_mib(hops * t)} | {_mib(hy)} | "
                       f"{_mib(hops * hy)} | {_mib(ring_total)}{mark} | {ring_total / (hops * t):,.1f} | {err} |")
        out.append("")
    if "nccl" in results:
        out += [f"## Computed for NCCL at the Based shape (B 16, H 16, D 16, Dv 64; bf16 keys/values, float32 state)", "",
                "Bytes each rank sends per layer, forward + backward, with a ring all-gather (P - 1 pieces sent per rank). "
                "Taylor: 2 (P - 1) states of 9.71 MiB. Hybrid (W 64): plus 2 (P - 1) halos of 2.46 MiB. Ring attention: "
                "3 (P - 1) shards of keys and values. Time = bytes / 50 GB/s (an assumption: one 400 Gb/s link per GPU).", "",
                "| GPUs | length | shard | Taylor CP (MiB) | hybrid CP (MiB) | ring attention (MiB) | ring / Taylor | Taylor ms | ring ms |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in results["nccl"]:
            out.append(f"| {r['ranks']} | {r['length']:,} | {r['shard']:,} | {_mib(r['taylor_bytes'])} | {_mib(r['hybrid_bytes'])} | "
                       f"{_mib(r['ring_bytes'])} | {r['ring_over_taylor']:,.1f} | {r['taylor_ms']:.2f} | {r['ring_ms']:.1f} |")
        out.append("")
    if "overlap" in results:
        r0 = results["overlap"][0]
        out += [f"## Overlap of the state all-gather with the local compute (measured; 2 processes, B {r0['B']}, H {r0['H']}, "
                f"D {r0['D']}, Dv {r0['Dv']}, float32)", "",
                "Forward + backward per call, ms, median over interleaved rounds, the slower rank. `local alone`: "
                "`taylor_attention` on the shard in one process (what the call costs without context parallelism); "
                "`all-gathers alone`: the two state-sized all-gathers of a call (forward, backward) with no compute.", "",
                "| shard | causal | fused | overlapped | local alone | all-gathers alone |", "|---|---|---|---|---|---|"]
        for r in results["overlap"]:
            ms = {k: max(m[k] for m in r["ms_per_rank"]) for k in r["ms_per_rank"][0]}
            out.append(f"| {r['shard']} | {r['causal']} | {ms['fused']:.1f} | {ms['overlapped']:.1f} | {ms['local_alone']:.1f} | "
                       f"{ms['state_all_gathers_alone']:.1f} |")
        out.append("")
    if "weak" in results:
        r0 = results["weak"][0]
        out += [f"## Weak scaling (measured; shard {r0['shard']} tokens per process, B {r0['B']}, H {r0['H']}, D {r0['D']}, "
                f"Dv {r0['Dv']}, causal, float32; hybrid window {r0['window']})", "",
                f"Forward + backward per call, ms, the slowest rank. This machine has {os.cpu_count()} cores: "
                "4 processes of one thread each share 2 cores, so that row measures oversubscription, not scaling.", "",
                "| processes | sequence | Taylor CP | hybrid CP |", "|---|---|---|---|"]
        for r in results["weak"]:
            ms = r["ms_max_over_ranks"]
            out.append(f"| {r['ranks']} | {r['total']} | {ms['taylor']:.1f} | {ms['hybrid']:.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("all", "bytes", "overlap", "weak", "nccl"))
    parser.add_argument("--out", default=None, help="write cp_comm.json and cp_comm.md into this folder")
    parser.add_argument("--note", default=None, help="a note for the machine header (e.g. the load)")
    args = parser.parse_args(argv)
    from bench.machine import machine_info

    torch.set_num_threads(1)
    results = {"machine": machine_info("cpu")}
    results["machine"]["load_average_before"] = os.getloadavg()
    if args.note:
        results["machine"]["note"] = args.note
    parts = ("bytes", "nccl", "overlap", "weak") if args.part == "all" else (args.part,)
    for part in parts:
        t0 = time.perf_counter()
        results[part] = {"bytes": measure_bytes, "nccl": nccl_table, "overlap": measure_overlap, "weak": measure_weak}[part]()
        print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)
    results["machine"]["load_average_after"] = os.getloadavg()
    text = report(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cp_comm.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "cp_comm.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
