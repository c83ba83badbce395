"""The course's audio encoder (SPEC section 3).

Conv1d(n_mels -> W, k3, p1) -> GELU -> Conv1d(W -> W, k3, stride 2, p1) -> GELU -> + fixed sinusoidal
positions (max timescale 3000) -> ``layers`` pre-LN blocks ``x + MHA(LN x)``, ``x + MLP(LN x)`` -> LayerNorm.
No dropout. The attention is the course's softmax MHA or, with ``attention="taylor"``, Taylor attention.

Padding. ``forward(feats, lengths)`` with ``lengths [B]`` (valid feature frames per clip) makes every valid
output frame independent of how far the batch pads the clip: the first convolution's outputs beyond a clip's
frames are zeroed before the strided convolution (so its last window sees zeros whether or not the batch
pads), and the self-attention ignores the padded frames (``key_padding_mask``). A clip of ``n`` frames has
``out_frames(n) = ceil(n / 2)`` valid output frames (:meth:`AudioEncoder.padding_mask`). Without ``lengths``
nothing is masked (the course).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .attention import build_attention

__all__ = ["sinusoids", "ResidualAttentionBlock", "AudioEncoder"]


def sinusoids(length: int, channels: int, max_timescale: float = 3000.0) -> torch.Tensor:
    """``[length, channels]``: sin in the first half, cos in the second, timescales 1..max_timescale."""
    if channels % 2:
        raise ValueError(f"channels must be even, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class ResidualAttentionBlock(nn.Module):
    """``x + Attn(LN x [, context])`` then ``x + MLP(LN x)`` (MLP: Linear, GELU, Linear)."""

    def __init__(self, width: int, heads: int, mlp: int, *, attention: str = "softmax", feature_dim: Optional[int] = None,
                 window: int = 64, backend: str = "auto") -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(width)
        self.attn = build_attention(attention, width, heads, feature_dim=feature_dim, window=window, backend=backend)
        self.mlp_ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x, context=None, *, key_padding_mask=None):
        x = x + self.attn(self.attn_ln(x), context, key_padding_mask=key_padding_mask)
        return x + self.mlp(self.mlp_ln(x))

    def init_cache(self, context, key_padding_mask=None):
        return self.attn.init_cache(context=context, key_padding_mask=key_padding_mask)

    def step(self, x, cache):
        """Cross-attention block for one position (the context was summarized in ``cache``)."""
        a, cache = self.attn.step(self.attn_ln(x), cache)
        x = x + a
        return x + self.mlp(self.mlp_ln(x)), cache


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int = 80, width: int = 200, heads: int = 2, mlp: int = 400, layers: int = 2,
                 max_frames: int = 2754, *, attention: str = "softmax", feature_dim: Optional[int] = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(self.out_frames(max_frames), width), persistent=False)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp, attention=attention, feature_dim=feature_dim, backend=backend)
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(width)

    @staticmethod
    def out_frames(frames):
        """Output frames of ``frames`` input frames (an int or a tensor of them): ``ceil(frames / 2)``."""
        return (frames - 1) // 2 + 1

    @staticmethod
    def check_lengths(lengths: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch:
            shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be a 1-D tensor of {batch} frame counts (one per clip), got {shape}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise ValueError(f"lengths must hold integers, got dtype {lengths.dtype}")
        if batch and (int(lengths.min()) < 1 or int(lengths.max()) > frames):
            raise ValueError(f"lengths must lie in [1, {frames}] (the padded frames of feats), got "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")
        return lengths

    def padding_mask(self, lengths: torch.Tensor, out_frames: int) -> torch.Tensor:
        """``[B, out_frames]`` bool, True at the output frames that come from padding only."""
        valid = self.out_frames(lengths.to(torch.long))
        return torch.arange(out_frames, device=lengths.device)[None, :] >= valid[:, None]

    def forward(self, feats: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, n_mels, T] -> [B, ceil(T / 2), width]``; ``lengths [B]``: valid frames per clip (see the module docstring)."""
        x = nn.functional.gelu(self.conv1(feats))
        mask = None
        if lengths is not None:
            lengths = self.check_lengths(lengths, feats.shape[0], feats.shape[-1]).to(feats.device)
            valid = torch.arange(feats.shape[-1], device=feats.device)[None, :] < lengths[:, None]
            x = x * valid[:, None, :].to(x.dtype)
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        if lengths is not None:
            mask = self.padding_mask(lengths, x.shape[1])
        x = x + self.positions[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        return self.ln(x)
