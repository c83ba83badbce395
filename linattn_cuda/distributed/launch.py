"""Run a function on N local processes joined in a gloo process group: for tests, benchmarks and trying context
parallelism on one machine (training jobs use ``torchrun``).

``run_ranks(fn, world_size, *args)`` spawns the processes, each calling ``fn(rank, world_size, *args)`` with
torch.distributed initialized (gloo over a file store in a temporary folder, ``threads`` threads per process) and
returns the list of their return values (anything ``torch.save`` takes). ``fn`` must be importable by name (a
module-level function; scripts need the ``if __name__ == "__main__":`` guard). A rank that raises makes the launcher
stop every rank at once and raise a ``RankFailed`` error carrying that rank's traceback; a group that does not finish
within ``timeout`` seconds is stopped the same way. Collectives time out after ``collective_timeout`` seconds, so a
rank left waiting for a dead peer ends too: nothing hangs.
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

__all__ = ["run_ranks", "RankFailed"]


class RankFailed(AssertionError):
    """A rank raised, died or did not finish in time (an AssertionError, so that tests report it as a failure)."""


def _worker(fn, rank, world_size, store_path, collective_timeout, threads, results, args):
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
    except BaseException:  # noqa: BLE001 - every failure goes back to the launcher
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()  # bytes, not shared-memory tensors: this process exits before the launcher reads them
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001
        # reported before the group is torn down, so that the cause arrives before its peers' "connection closed"
        results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _errors(results, rank: int, first: str, world_size: int, grace: float = 2.0) -> str:
    """The first failure's traceback and those of the ranks that fail within ``grace`` seconds after it (a peer of a
    failed rank fails too, with a "connection closed" of its own: the first is the cause, usually)."""
    parts, end = [f"rank {rank} of {world_size} raised:\n{first}"], time.monotonic() + grace
    while time.monotonic() < end:
        try:
            other, status, value = results.get(timeout=max(end - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if status == "error":
            parts.append(f"rank {other} of {world_size} raised too:\n{value}")
    return "\n".join(parts)


def run_ranks(fn, world_size: int, *args, timeout: float = 90.0, collective_timeout: float = 30.0,
              threads: int = 1) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="linattn-dist-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, r, world_size, store, collective_timeout, threads, results, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        values, deadline = {}, time.monotonic() + timeout
        try:
            while len(values) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RankFailed(f"the {world_size} ranks did not finish within {timeout:.0f} s "
                                     f"(finished: {sorted(values)})")
                try:
                    rank, status, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
                    if dead:
                        raise RankFailed(f"rank(s) {dead} died (exit codes "
                                         f"{[procs[r].exitcode for r in dead]}) without a result")
                    continue
                if status == "error":
                    raise RankFailed(_errors(results, rank, value, world_size))
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
