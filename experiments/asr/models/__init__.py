"""Models of the LJ Speech experiment: the course's encoder and decoders, softmax, Taylor or hybrid attention."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .attention import ATTENTION_KINDS, KVCache, SoftmaxAttention, build_attention
from .decoders import CROSS_ATTENTION_KINDS, DECODERS, LSTMDecoder, TransformerDecoder, build_decoder, default_cross_attention
from .encoder import AudioEncoder, sinusoids

__all__ = [
    "ModelConfig", "SpeechToText", "build_model", "AudioEncoder", "LSTMDecoder", "TransformerDecoder",
    "SoftmaxAttention", "KVCache", "build_attention", "build_decoder", "sinusoids", "DECODERS", "ATTENTION_KINDS",
    "CROSS_ATTENTION_KINDS", "default_cross_attention",
]


@dataclass
class ModelConfig:
    decoder: str = "transformer"      # lstm | transformer | taylor | hybrid
    encoder_attention: str = "softmax"  # softmax | taylor
    n_mels: int = 80
    max_frames: int = 2754
    vocab_size: int = 35
    max_len: int = 98                 # decoder positions = tokens per transcript - 1
    width: int = 200
    heads: int = 2
    mlp: int = 400
    encoder_layers: int = 2
    feature_dim: Optional[int] = 16   # q/k dims per head of Taylor and hybrid attention (None: the head dim)
    softmax_feature_dim: Optional[int] = None  # q/k dims per head of the decoder's softmax attention (None: head dim, the course)
    cross_attention: Optional[str] = None      # decoder cross-attention: softmax | taylor (None: taylor for `taylor`, else softmax)
    window: int = 64                  # hybrid decoder: keys of the exact softmax window
    backend: str = "auto"             # linattn_cuda backend of Taylor attention

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_taylor(self) -> bool:
        """Whether any attention of the model has Taylor weights (taylor or hybrid decoder, Taylor cross- or encoder attention)."""
        return (self.decoder in ("taylor", "hybrid") or self.encoder_attention == "taylor"
                or (self.cross_attention or default_cross_attention(self.decoder)) == "taylor")


class SpeechToText(nn.Module):
    """Encoder + decoder. ``lengths [B]`` (valid feature frames per clip), when given, masks the padded frames in
    the encoder's self-attention and the decoder's cross-attention (and its decoding cache): a clip's logits
    then do not depend on how far its batch pads it. Without ``lengths`` nothing is masked (the course)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.encoder_attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown encoder_attention {c.encoder_attention!r}; choose one of {ATTENTION_KINDS}")
        taylor_fd = c.feature_dim if c.encoder_attention == "taylor" else None
        self.encoder = AudioEncoder(c.n_mels, c.width, c.heads, c.mlp, c.encoder_layers, c.max_frames,
                                    attention=c.encoder_attention, feature_dim=taylor_fd, backend=c.backend)
        self.decoder = build_decoder(c.decoder, vocab_size=c.vocab_size, width=c.width, heads=c.heads, mlp=c.mlp,
                                     max_len=c.max_len, feature_dim=c.feature_dim, softmax_feature_dim=c.softmax_feature_dim,
                                     cross_attention=c.cross_attention, window=c.window, backend=c.backend)

    def encode(self, feats: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """``(memory [B, S, W], memory_mask [B, S] bool or None)``; the mask is True at padded encoder frames."""
        memory = self.encoder(feats, lengths)
        mask = None if lengths is None else self.encoder.padding_mask(lengths.to(memory.device), memory.shape[1])
        return memory, mask

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing: ``feats [B, n_mels, T]``, ``tokens [B, L]``, ``lengths [B]`` or None -> logits ``[B, L, V]``."""
        memory, mask = self.encode(feats, lengths)
        return self.decoder(tokens, memory, mask)


def build_model(config: ModelConfig) -> SpeechToText:
    return SpeechToText(config)
