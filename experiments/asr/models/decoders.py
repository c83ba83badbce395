"""The course's text decoders and the Taylor variant (SPEC section 3).

* ``lstm``: Embedding -> LayerNorm -> LSTM (1 layer) -> residual cross-attention block -> LayerNorm -> Linear.
* ``transformer``: Embedding + learned positions (``max_len x W``, uniform [0, 1) init, as the course's
  ``torch.rand``) -> causal residual self-attention layer ``x + MHA(LN x)`` (no MLP) -> residual
  cross-attention block -> LayerNorm -> Linear.
* ``taylor``: the transformer decoder with :class:`linattn_cuda.nn.TaylorAttention` for self- and
  cross-attention.

``forward(tokens [B, T], memory [B, S, W], memory_mask=None) -> logits [B, T, V]`` (teacher forcing).
Incremental decoding: ``cache = dec.init_cache(memory)``, then ``logits [B, V], cache = dec.step(token [B], cache)``
per position: the LSTM carries its (h, c); the transformer keeps its softmax key/value cache; the Taylor
decoder keeps its recurrent state (O(1) per token). All caches hold the cross-attention keys/values (or,
for Taylor, the state of the whole encoder output), computed once per utterance.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .attention import build_attention
from .encoder import ResidualAttentionBlock

__all__ = ["LSTMDecoder", "TransformerDecoder", "DECODERS", "build_decoder"]

DECODERS = ("lstm", "transformer", "taylor")


class LSTMCache(NamedTuple):
    state: Optional[tuple]
    cross: Any


class TransformerCache(NamedTuple):
    self_attn: Any
    cross: Any
    position: int


class LSTMDecoder(nn.Module):
    def __init__(self, vocab_size: int = 35, width: int = 200, heads: int = 2, mlp: int = 400, *,
                 attention: str = "softmax", feature_dim: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.lstm_ln = nn.LayerNorm(width)
        self.lstm = nn.LSTM(width, width, num_layers=1, batch_first=True)
        self.cross = ResidualAttentionBlock(width, heads, mlp, attention=attention, feature_dim=feature_dim, backend=backend)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, tokens, memory, memory_mask=None):
        x, _ = self.lstm(self.lstm_ln(self.embed(tokens)))
        x = self.cross(x, memory, key_padding_mask=memory_mask)
        return self.head(self.ln(x))

    def init_cache(self, memory, memory_mask=None) -> LSTMCache:
        return LSTMCache(None, self.cross.init_cache(memory, memory_mask))

    def step(self, token, cache: LSTMCache):
        x, state = self.lstm(self.lstm_ln(self.embed(token[:, None])), cache.state)
        x, cross = self.cross.step(x, cache.cross)
        return self.head(self.ln(x))[:, 0], LSTMCache(state, cross)


class TransformerDecoder(nn.Module):
    def __init__(self, vocab_size: int = 35, width: int = 200, heads: int = 2, mlp: int = 400, max_len: int = 98, *,
                 attention: str = "softmax", feature_dim: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.rand(max_len, width))
        self.self_ln = nn.LayerNorm(width)
        self.self_attn = build_attention(attention, width, heads, feature_dim=feature_dim, backend=backend)
        self.cross = ResidualAttentionBlock(width, heads, mlp, attention=attention, feature_dim=feature_dim, backend=backend)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, tokens, memory, memory_mask=None):
        length = tokens.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"at most {self.positions.shape[0]} decoder positions, got {length}")
        x = self.embed(tokens) + self.positions[:length]
        x = x + self.self_attn(self.self_ln(x), causal=True)
        x = self.cross(x, memory, key_padding_mask=memory_mask)
        return self.head(self.ln(x))

    def init_cache(self, memory, memory_mask=None) -> TransformerCache:
        return TransformerCache(self.self_attn.init_cache(batch_size=memory.shape[0]), self.cross.init_cache(memory, memory_mask), 0)

    def step(self, token, cache: TransformerCache):
        if cache.position >= self.positions.shape[0]:
            raise ValueError(f"at most {self.positions.shape[0]} decoder positions")
        x = self.embed(token[:, None]) + self.positions[cache.position]
        a, self_cache = self.self_attn.step(self.self_ln(x), cache.self_attn)
        x, cross = self.cross.step(x + a, cache.cross)
        return self.head(self.ln(x))[:, 0], TransformerCache(self_cache, cross, cache.position + 1)


def build_decoder(kind: str, *, vocab_size: int = 35, width: int = 200, heads: int = 2, mlp: int = 400, max_len: int = 98,
                  feature_dim: Optional[int] = None, backend: str = "auto") -> nn.Module:
    """``lstm`` | ``transformer`` | ``taylor``; ``feature_dim`` applies to Taylor attention only."""
    if kind == "lstm":
        return LSTMDecoder(vocab_size, width, heads, mlp)
    if kind == "transformer":
        return TransformerDecoder(vocab_size, width, heads, mlp, max_len)
    if kind == "taylor":
        return TransformerDecoder(vocab_size, width, heads, mlp, max_len, attention="taylor", feature_dim=feature_dim, backend=backend)
    raise ValueError(f"unknown decoder {kind!r}; choose one of {DECODERS}")
