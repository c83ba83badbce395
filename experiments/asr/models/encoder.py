"""The course's audio encoder (SPEC section 3).

Conv1d(n_mels -> W, k3, p1) -> GELU -> Conv1d(W -> W, k3, stride 2, p1) -> GELU -> + fixed sinusoidal
positions (max timescale 3000) -> ``layers`` pre-LN blocks ``x + MHA(LN x)``, ``x + MLP(LN x)`` -> LayerNorm.
No dropout. The attention is the course's softmax MHA or, with ``attention="taylor"``, Taylor attention.
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
                 backend: str = "auto") -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(width)
        self.attn = build_attention(attention, width, heads, feature_dim=feature_dim, backend=backend)
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
    def out_frames(frames: int) -> int:
        return (frames - 1) // 2 + 1

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, T] -> [B, ceil(T / 2), width]``."""
        x = nn.functional.gelu(self.conv1(feats))
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positions[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln(x)
