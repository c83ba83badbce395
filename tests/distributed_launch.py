"""Run a function on N local processes joined in a gloo process group (the distributed tests' launcher).

``run_ranks(fn, world_size, *args)`` spawns the processes, each calling ``fn(rank, world_size, *args)`` with
torch.distributed initialized (gloo over a file store in a temporary folder, one thread per process) and returns
the list of their return values (picklable). A rank that raises makes the launcher stop every rank at once and
raise an AssertionError carrying that rank's traceback; a group that does not finish within ``timeout`` seconds is
stopped the same way. Collectives themselves time out after ``collective_timeout`` seconds, so a rank left waiting
for a dead peer ends too. No test can hang CI.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _worker(fn, rank, world_size, store_path, collective_timeout, results, args):
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()  # bytes, not shared-memory tensors: this process exits before the launcher reads them
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the launcher
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 90.0, collective_timeout: float = 30.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="linattn-dist-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store, collective_timeout, results, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        values, deadline = {}, time.monotonic() + timeout
        try:
            while len(values) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the {world_size} ranks did not finish within {timeout:.0f} s "
                                         f"(finished: {sorted(values)})")
                try:
                    rank, status, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
                    if dead:
                        raise AssertionError(f"rank(s) {dead} died (exit codes "
                                             f"{[procs[r].exitcode for r in dead]}) without a result")
                    continue
                if status == "error":
                    raise AssertionError(f"rank {rank} of {world_size} raised:\n{value}")
                import torch

                values[rank] = torch.load(io.BytesIO(value), weights_only=False)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [values[r] for r in range(world_size)]
