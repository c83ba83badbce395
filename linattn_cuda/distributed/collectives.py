"""The collectives of context parallelism and their adjoints.

Every byte a rank sends goes through :func:`all_gather` (one ``torch.distributed.all_gather_single``, called
``all_gather_into_tensor`` before torch 2.10), so what a rank puts into collectives can be counted by wrapping
that one function.

:class:`ShardExchange` is one exchange between the shards of a sequence. Each rank contributes fixed-size pieces
(its Taylor state; the rows at its ends, for a halo), packed as bytes into one buffer and all-gathered; each rank
then combines what it received into its outputs: the sum of the states of the ranks it reads (a prefix sum when
causal, all the others otherwise) and the halo of positions just before (and after) its shard. The combination is
linear, so its adjoint, the backward, is the same pattern: one all-gather of every rank's output gradients (the
same sizes), after which each rank adds up what came from its own pieces -- a suffix sum of state gradients where
the forward took a prefix sum. Both directions put exactly the pieces' bytes into the collective, whatever the
shard length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_gather", "Piece", "ShardExchange", "exchange", "end_rows"]


def all_gather(x: torch.Tensor, group, *, async_op: bool = False):
    """``[world_size, *x.shape]``: every rank's ``x``, in rank order, and the work handle (None unless async)."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    out = x.new_empty(world * x.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, x.view(-1), group=group, async_op=async_op)
    return out.view((world,) + tuple(x.shape)), work


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bytes of ``tensors`` one after another, each padded to 8 bytes (so each piece stays aligned)."""
    parts = []
    for t in tensors:
        b = t.contiguous().view(-1).view(torch.uint8)
        parts.append(b)
        if b.numel() % 8:
            parts.append(b.new_zeros(8 - b.numel() % 8))
    return torch.cat(parts)


def _unpack(buf: torch.Tensor, like: Sequence[tuple]) -> list:
    """Views of ``buf`` (one rank's row of a gathered buffer) as tensors of the ``(shape, dtype)`` in ``like``."""
    out, offset = [], 0
    for shape, dtype in like:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(buf[offset : offset + n].view(dtype).view(shape))
        offset += n + (-n) % 8
    return out


@dataclass(frozen=True)
class Piece:
    """How one contributed tensor is combined: ``"sum"`` over the ranks whose state this rank reads, or ``"left"`` /
    ``"right"``: the rows (along ``row_dim``) of the halo just before / after this rank's shard. A rank's halo
    piece holds its own last (``"left"``, for the next ranks) or first (``"right"``) rows from row 0 on."""

    kind: str
    row_dim: int = -2


class _Pending:
    def __init__(self, finish, work):
        self._finish, self._work = finish, work

    def wait(self) -> list:
        if self._work is not None:
            self._work.wait()
        return self._finish()


class ShardExchange:
    """One exchange of fixed-size pieces between the ranks of a :class:`~.layout.ShardLayout` (module docstring).

    ``halo_rows``: the length of the halo pieces (every rank sends that many rows, zeros past its shard length);
    ``causal``: the states summed are the earlier ranks' (else all the others').
    """

    def __init__(self, layout, group, pieces: Sequence[Piece], *, causal: bool, halo_rows: int = 0):
        self.layout, self.group, self.pieces = layout, group, tuple(pieces)
        self.causal, self.halo_rows = causal, halo_rows

    def _segments(self, kind: str, rank: int) -> list:
        if kind == "left":
            return self.layout.left_halo(rank, self.halo_rows)
        return self.layout.right_halo(rank, self.halo_rows)

    def _gathered(self, buf: torch.Tensor, like) -> list:
        return [_unpack(buf[r], like) for r in range(buf.shape[0])]

    def start(self, tensors: Sequence[torch.Tensor]) -> _Pending:
        """All-gather ``tensors`` (one per piece; asynchronous) and return a handle whose ``wait()`` gives this
        rank's combined outputs (same shapes as the pieces)."""
        like = [(t.shape, t.dtype) for t in tensors]
        buf, work = all_gather(_pack(tensors), self.group, async_op=True)
        return _Pending(lambda: self.combine(self._gathered(buf, like), tensors), work)

    def start_adjoint(self, grads: Sequence[torch.Tensor], indices: Sequence[int]) -> _Pending:
        """The backward of :meth:`start` for the pieces ``indices`` (their output gradients ``grads``)."""
        like = [(g.shape, g.dtype) for g in grads]
        buf, work = all_gather(_pack(grads), self.group, async_op=True)
        return _Pending(lambda: self.adjoint(self._gathered(buf, like), grads, indices), work)

    def combine(self, gathered: list, own: Sequence[torch.Tensor]) -> list:
        rank = self.layout.rank
        outputs = []
        for i, (piece, mine) in enumerate(zip(self.pieces, own)):
            if piece.kind == "sum":
                out = torch.zeros_like(mine)
                for src in self.layout.state_sources(rank, self.causal):
                    out += gathered[src][i]
            else:
                out = torch.zeros_like(mine)
                for src, s0, d0, count in self._segments(piece.kind, rank):
                    out.narrow(piece.row_dim, d0, count).copy_(gathered[src][i].narrow(piece.row_dim, s0, count))
            outputs.append(out)
        return outputs

    def adjoint(self, gathered: list, own: Sequence[torch.Tensor], indices: Sequence[int]) -> list:
        rank = self.layout.rank
        grads = []
        for j, (i, mine) in enumerate(zip(indices, own)):
            piece = self.pieces[i]
            grad = torch.zeros_like(mine)
            for dst in range(self.layout.world_size):
                if piece.kind == "sum":
                    if rank in self.layout.state_sources(dst, self.causal):
                        grad += gathered[dst][j]
                    continue
                for src, s0, d0, count in self._segments(piece.kind, dst):
                    if src == rank:
                        grad.narrow(piece.row_dim, s0, count).add_(gathered[dst][j].narrow(piece.row_dim, d0, count))
            grads.append(grad)
        return grads


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ex: ShardExchange, *tensors):
        outputs = ex.start(tensors).wait()
        ctx.ex = ex
        ctx.float_pieces = [i for i, t in enumerate(tensors) if t.is_floating_point()]
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        indices = ctx.float_pieces
        piece_grads = ctx.ex.start_adjoint([grads[i].contiguous() for i in indices], indices).wait()
        out = [None] * len(grads)
        for i, g in zip(indices, piece_grads):
            out[i] = g
        return (None, *out)


def exchange(ex: ShardExchange, *tensors: torch.Tensor) -> tuple:
    """:meth:`ShardExchange.start` + ``wait``, differentiable: the backward is one all-gather of the output
    gradients (every rank must run it: keep every rank's outputs in its loss)."""
    return _Exchange.apply(ex, *tensors)


def end_rows(x: torch.Tensor, count: int, first: bool, rows: int, dim: int) -> torch.Tensor:
    """The first (``first``) or last ``count`` rows of ``x`` along ``dim``, padded after them to ``rows`` rows with
    zeros (False): a halo piece of fixed size whatever the shard length."""
    part = x.narrow(dim, 0 if first else x.shape[dim] - count, count)
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, rows - count]
    if part.dtype == torch.bool:
        return torch.nn.functional.pad(part.to(torch.uint8), pad).bool()
    return torch.nn.functional.pad(part, pad)
