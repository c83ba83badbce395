"""The course's text decoders, the Taylor variant and the hybrid (SPEC sections 3 and 4).

* ``lstm``: Embedding -> LayerNorm -> LSTM (1 layer) -> residual cross-attention block -> LayerNorm -> Linear.
* ``transformer``: Embedding + learned positions (``max_len x W``, uniform [0, 1) init, as the course's
  ``torch.rand``) -> causal residual self-attention layer ``x + MHA(LN x)`` (no MLP) -> residual
  cross-attention block -> LayerNorm -> Linear.
* ``taylor``: the transformer decoder with :class:`linattn_cuda.nn.TaylorAttention` for self- and
  cross-attention.
* ``hybrid``: the transformer decoder with :class:`linattn_cuda.nn.HybridAttention` (exact softmax over the
  last ``window`` tokens, Taylor weight beyond, one normalizer) as causal self-attention; its cross-attention
  is softmax by default (``cross_attention="taylor"`` for Taylor).

``cross_attention`` (``"softmax"`` | ``"taylor"``) overrides any decoder's cross-attention kind (default:
Taylor for ``taylor``, softmax otherwise). q/k width per head: ``feature_dim`` for Taylor and hybrid
attention, ``softmax_feature_dim`` for softmax attention (``None``: the head dim, the course).

``forward(tokens [B, T], memory [B, S, W], memory_mask=None) -> logits [B, T, V]`` (teacher forcing;
``memory_mask [B, S]`` True marks padded encoder frames, which cross-attention then ignores).
Incremental decoding: ``cache = dec.init_cache(memory, memory_mask)``, then ``logits [B, V], cache =
dec.step(token [B], cache)`` per position: the LSTM carries its (h, c); the transformer keeps its softmax
key/value cache (grows by one key per token); the Taylor decoder its recurrent state and the hybrid its
window of keys plus a Taylor state (both O(1) per token). All caches hold the cross-attention keys/values
(or, for Taylor cross-attention, the state of the whole encoder output), computed once per utterance with
the same mask.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .attention import build_attention
from .encoder import ResidualAttentionBlock

__all__ = ["LSTMDecoder", "TransformerDecoder", "DECODERS", "CROSS_ATTENTION_KINDS", "build_decoder", "default_cross_attention"]

DECODERS = ("lstm", "transformer", "taylor", "hybrid")
CROSS_ATTENTION_KINDS = ("softmax", "taylor")
_SELF_ATTENTION = {"transformer": "softmax", "taylor": "taylor", "hybrid": "hybrid"}


class LSTMCache(NamedTuple):
    state: Optional[tuple]
    cross: Any


class TransformerCache(NamedTuple):
    self_attn: Any
    cross: Any
    position: int


def default_cross_attention(decoder: str) -> str:
    return "taylor" if decoder == "taylor" else "softmax"


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
    """``attention``: the causal self-attention kind (softmax | taylor | hybrid); ``cross_attention``: softmax |
    taylor (default: ``attention`` for softmax/taylor, softmax for hybrid). ``feature_dim`` applies to each
    attention as given; :func:`build_decoder` picks it per kind."""

    def __init__(self, vocab_size: int = 35, width: int = 200, heads: int = 2, mlp: int = 400, max_len: int = 98, *,
                 attention: str = "softmax", cross_attention: Optional[str] = None, feature_dim: Optional[int] = None,
                 cross_feature_dim: Optional[int] = None, window: int = 64, backend: str = "auto") -> None:
        super().__init__()
        if cross_attention is None:
            cross_attention, cross_feature_dim = ("softmax", None) if attention == "hybrid" else (attention, feature_dim)
        self.embed = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.rand(max_len, width))
        self.self_ln = nn.LayerNorm(width)
        self.self_attn = build_attention(attention, width, heads, feature_dim=feature_dim, window=window, backend=backend)
        self.cross = ResidualAttentionBlock(width, heads, mlp, attention=cross_attention, feature_dim=cross_feature_dim, backend=backend)
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
                  feature_dim: Optional[int] = None, softmax_feature_dim: Optional[int] = None,
                  cross_attention: Optional[str] = None, window: int = 64, backend: str = "auto") -> nn.Module:
    """``lstm`` | ``transformer`` | ``taylor`` | ``hybrid`` (see the module docstring).

    ``feature_dim``: q/k dims per head of Taylor and hybrid attention; ``softmax_feature_dim``: of softmax
    attention (``None``: the head dim, as the course); ``cross_attention``: softmax | taylor (``None``: the
    decoder's default, :func:`default_cross_attention`); ``window``: the hybrid's softmax window.
    """
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {DECODERS}")
    cross = cross_attention or default_cross_attention(kind)
    if cross not in CROSS_ATTENTION_KINDS:
        raise ValueError(f"unknown cross_attention {cross_attention!r}; choose one of {CROSS_ATTENTION_KINDS}")
    dims = {"softmax": softmax_feature_dim, "taylor": feature_dim, "hybrid": feature_dim}
    if kind == "lstm":
        return LSTMDecoder(vocab_size, width, heads, mlp, attention=cross, feature_dim=dims[cross], backend=backend)
    attention = _SELF_ATTENTION[kind]
    return TransformerDecoder(vocab_size, width, heads, mlp, max_len, attention=attention, cross_attention=cross,
                              feature_dim=dims[attention], cross_feature_dim=dims[cross], window=window, backend=backend)
