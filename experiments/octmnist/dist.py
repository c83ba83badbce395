"""Process-group and device handling (single process, or several under ``torchrun``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            dist.barrier()


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": CUDA when present (one GPU per local rank), else CPU; otherwise the given device."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return dev


def setup(requested_device: str = "auto", backend: str = "auto") -> DistContext:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); gloo on CPU, nccl on CUDA unless ``backend`` says otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return DistContext(device=device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def teardown(ctx: DistContext):
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(batch_len: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous share of a global batch (``torch.tensor_split`` convention: the first
    ``batch_len % world_size`` ranks get one more; a share may be empty)."""
    q, r = divmod(batch_len, world_size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)
