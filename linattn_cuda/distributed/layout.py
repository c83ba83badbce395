"""Which rank holds which part of the sequence, learned from one small exchange that also checks the call.

Every context-parallel call starts with a fixed-size all-gather of a few integers per rank: its shard length, the
shape and options of its call, and whether its own inputs passed their checks. Afterwards every rank knows every
shard's length (its start in the sequence, the halo it needs) and every rank raises an error when one rank's
inputs were refused or the ranks disagree on the call, so that a bad call on one rank fails the whole group at
once instead of leaving the others waiting in a collective until a timeout.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .collectives import all_gather

__all__ = ["ShardLayout", "group_rank_and_size", "exchange_call", "dtype_code", "float_bits"]

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def dtype_code(dtype) -> int:
    return _DTYPE_CODES.get(dtype, 0)


def float_bits(x: float) -> int:
    """The bits of a float64 as an int64, so that a float travels exactly in the integer exchange."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def group_rank_and_size(group) -> tuple[int, int]:
    """This process's rank in ``group`` (None: the default group) and the group's size."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context parallelism needs torch.distributed: call torch.distributed.init_process_group(...) first "
            "(backend 'gloo' for CPU tensors, 'nccl' for CUDA tensors), e.g. under torchrun"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the process group passed as `group`")
    return rank, dist.get_world_size(group)


@dataclass(frozen=True)
class ShardLayout:
    """The contiguous shards of one sequence: rank r holds positions ``[starts[r], starts[r] + lengths[r])``
    (rank order = sequence order; shards may differ in length and may be empty)."""

    rank: int
    lengths: tuple

    @property
    def world_size(self) -> int:
        return len(self.lengths)

    @property
    def start(self) -> int:
        """The position of this rank's first token in the whole sequence."""
        return sum(self.lengths[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.lengths[self.rank]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def state_sources(self, rank: int, causal: bool) -> list:
        """The ranks whose keys every query of ``rank`` sees through their state: the earlier ranks (causal) or
        all the others (non-causal)."""
        return list(range(rank)) if causal else [r for r in range(self.world_size) if r != rank]

    def _start_of(self, rank: int) -> int:
        return sum(self.lengths[:rank])

    def left_halo(self, rank: int, rows: int) -> list:
        """Where the ``min(rows, start)`` positions just before ``rank``'s shard live: ``(source rank, first row in
        the source's tail, first row in the halo, count)`` segments, the halo being ``rows`` long and filled at its
        end. A source's tail holds its last ``min(length, rows)`` positions from row 0 on."""
        need = min(rows, self._start_of(rank))
        segments, dst_end, src = [], rows, rank - 1
        while need > 0:
            tail = min(self.lengths[src], rows)
            take = min(tail, need)
            if take:
                segments.append((src, tail - take, dst_end - take, take))
            dst_end, need, src = dst_end - take, need - take, src - 1
        return segments

    def right_halo(self, rank: int, rows: int) -> list:
        """The mirror of :meth:`left_halo`: the ``min(rows, total - end)`` positions just after ``rank``'s shard,
        filled from the halo's row 0 on; a source's head holds its first ``min(length, rows)`` positions."""
        need = min(rows, self.total - self._start_of(rank + 1))
        segments, dst, src = [], 0, rank + 1
        while need > 0:
            take = min(self.lengths[src], rows, need)
            if take:
                segments.append((src, 0, dst, take))
            dst, need, src = dst + take, need - take, src + 1
        return segments


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def exchange_call(name: str, group, device, fields: Sequence[tuple], *, length: int,
                  error: Optional[BaseException] = None) -> ShardLayout:
    """All-gather this rank's call description and check it against the other ranks'.

    ``fields``: ``(description, int value)`` pairs that every rank must agree on (shapes, dtype code, options);
    ``length``: this rank's shard length; ``error``: the exception this rank's own checks raised (None if none).
    If any rank failed its checks, every rank raises (the failing ranks their own exception, the others a
    RuntimeError quoting it); if the ranks disagree on a field, every rank raises the same ValueError.
    Returns the :class:`ShardLayout` of the shard lengths.
    """
    rank, world = group_rank_and_size(group)
    values = [1 if error is not None else 0, int(length)] + [int(v) for _, v in fields]
    table, _ = all_gather(torch.tensor(values, dtype=torch.int64, device=device), group)
    rows = table.tolist()
    failed = [r for r in range(world) if rows[r][0]]
    if failed:
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else _describe(error), group=group)
        others = "; ".join(f"rank {r}: {messages[r]}" for r in failed if r != rank)
        if error is not None:
            error.add_note(f"{name}: raised on rank {rank} of {world}; every rank of the group fails with it"
                           + (f" (also {others})" if others else ""))
            raise error
        raise RuntimeError(f"{name}: rank(s) {failed} of the context-parallel group refused their inputs, so no "
                           f"rank can go on: {others}")
    for i, (what, _) in enumerate(fields):
        column = [row[2 + i] for row in rows]
        if len(set(column)) > 1:
            raise ValueError(f"{name}: every rank must pass the same {what}, got {column} (by rank); each rank passes "
                             "its contiguous shard of the same batch of sequences with the same options")
    return ShardLayout(rank, tuple(row[1] for row in rows))
