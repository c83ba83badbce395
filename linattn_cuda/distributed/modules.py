"""The nn entry point: :class:`~linattn_cuda.nn.TaylorAttention` / :class:`~linattn_cuda.nn.HybridAttention` whose
self-attention runs over a sequence sharded across the ranks of a process group.

A module built with ``context_parallel=True`` (the default process group) or ``context_parallel=group``, or switched
by :func:`enable_context_parallel` (for models built by other code), takes ``x [B, L_r, E]`` -- this rank's
contiguous shard of the sequence -- and returns its shard of the output; the rest of a model (projections, MLPs,
norms) is per token and needs nothing. Absolute positions are the model's business: add the table's rows
``[start, start + L_r)`` (:func:`shard_layout` gives ``start``). Cross-attention and decoding (``step``) are not
sharded.
"""
from __future__ import annotations

import torch

from .collectives import Piece, ShardExchange, end_rows, exchange
from .hybrid import hybrid_attention_cp
from .layout import ShardLayout, dtype_code, exchange_call
from .taylor import collective_device, taylor_attention_cp

__all__ = ["check_context_parallel", "enable_context_parallel", "shard_layout", "shard_bounds",
           "taylor_forward_cp", "hybrid_forward_cp"]


def check_context_parallel(value):
    """None (off), True (the default process group) or a ``torch.distributed.ProcessGroup``."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    import torch.distributed as dist

    if isinstance(value, dist.ProcessGroup):
        return value
    raise TypeError(f"context_parallel must be None, True (the default process group) or a "
                    f"torch.distributed.ProcessGroup, got {type(value).__name__}")


def _group(value):
    return None if value is True else value


def enable_context_parallel(module: torch.nn.Module, group=True) -> int:
    """Make every TaylorAttention / HybridAttention inside ``module`` context-parallel over ``group`` (True: the
    default process group; None: back to single-process). Returns how many modules were switched."""
    from ..nn import TaylorAttention  # HybridAttention is one

    group = check_context_parallel(group)
    count = 0
    for m in module.modules():
        if isinstance(m, TaylorAttention):
            m.context_parallel = group
            count += 1
    return count


def shard_layout(length: int, group=None, device=None) -> ShardLayout:
    """Every rank's shard length (a collective call): ``layout.start`` is this rank's first position in the
    sequence, e.g. the offset of its rows of a learned position table."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0 (this rank's shard length), got {length!r}")
    return exchange_call("shard_layout", group, device or collective_device(group), [], length=length)


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, end)`` of ``rank``'s contiguous shard when ``total`` positions are split as evenly as possible
    (lengths differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return rank * total // world_size, (rank + 1) * total // world_size


def _refuse_context(context) -> None:
    if context is not None:
        raise ValueError("context parallelism shards the sequence of self-attention; this module got a context "
                         "(cross-attention), which is not sharded: switch context_parallel off for it")


def taylor_forward_cp(m, x, context, *, causal: bool, key_padding_mask):
    """TaylorAttention.forward with ``m.context_parallel`` set."""
    _refuse_context(context)
    hk = m.num_kv_heads
    q, k, v = m._heads(m.query(x)), m._heads(m.key(x), hk), m._heads(m.value(x), hk)
    out = taylor_attention_cp(q, k, v, group=_group(m.context_parallel), causal=causal, scale=m.scale,
                              key_padding_mask=key_padding_mask, enable_gqa=hk != m.num_heads, backend=m.backend)
    return m.out(m._merge(out))


def rows_before(x: torch.Tensor, rows: int, group, key_padding_mask=None):
    """The ``h = min(rows, start)`` rows of the sequence just before this rank's shard ``x [B, L_r, C]`` (and their
    padding flags), from the ranks that hold them: ``(x_before [B, h, C], mask_before [B, h] or None)``.
    Differentiable (the gradients go back to those ranks); a collective call."""
    b, length, width = x.shape
    fields = [("operation", 3), ("batch size B", b), ("width", width), ("dtype", dtype_code(x.dtype)),
              ("halo rows", rows), ("key_padding_mask presence", int(key_padding_mask is not None))]
    layout = exchange_call("rows_before", group, x.device, fields, length=length)
    count = min(length, rows)
    pieces, tensors = [Piece("left")], [end_rows(x, count, False, rows, 1)]
    if key_padding_mask is not None:
        pieces.append(Piece("left", row_dim=-1))
        tensors.append(end_rows(key_padding_mask, count, False, rows, 1))
    got = exchange(ShardExchange(layout, group, pieces, causal=True, halo_rows=rows), *tensors)
    h = min(rows, layout.start)
    return got[0][:, rows - h:], (got[1][:, rows - h:] if key_padding_mask is not None else None)


def hybrid_forward_cp(m, x, context, *, causal: bool, key_padding_mask):
    """HybridAttention.forward (self-attention) with ``m.context_parallel`` set. A short convolution reads the
    ``conv_size - 1`` rows before the shard from the ranks that hold them."""
    _refuse_context(context)
    group = _group(m.context_parallel)
    before = 0
    if m.conv is not None:  # the convolution's history: the rows before this shard (zeros at the sequence start)
        x_before, mask_before = rows_before(x, m.conv_size - 1, group, key_padding_mask)
        before = x_before.shape[1]
        x = torch.cat([x_before, x], dim=1)
        if key_padding_mask is not None:
            key_padding_mask = torch.cat([mask_before, key_padding_mask], dim=1)
    q, k, v, _ = m._qkv(x, key_padding_mask)
    if before:
        q, k, v = q[:, before:], k[:, before:], v[:, before:]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[:, before:]
    hk = m.num_kv_heads
    q, k, v = m._temperature(m._heads(q)), m._heads(k, hk), m._heads(v, hk)
    out = hybrid_attention_cp(q, k, v, window=m.window, group=group, causal=causal, scale=m.scale,
                              key_padding_mask=key_padding_mask, far_weight=m._far_weight(),
                              enable_gqa=hk != m.num_heads, backend=m.backend)
    return m.out(m._merge(out))
