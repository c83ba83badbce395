"""Models of the LJ Speech experiment: the course's encoder and decoders, softmax or Taylor attention."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .attention import ATTENTION_KINDS, KVCache, SoftmaxAttention, build_attention
from .decoders import DECODERS, LSTMDecoder, TransformerDecoder, build_decoder
from .encoder import AudioEncoder, sinusoids

__all__ = [
    "ModelConfig", "SpeechToText", "build_model", "AudioEncoder", "LSTMDecoder", "TransformerDecoder",
    "SoftmaxAttention", "KVCache", "build_attention", "build_decoder", "sinusoids", "DECODERS", "ATTENTION_KINDS",
]


@dataclass
class ModelConfig:
    decoder: str = "transformer"      # lstm | transformer | taylor
    encoder_attention: str = "softmax"  # softmax | taylor
    n_mels: int = 80
    max_frames: int = 2754
    vocab_size: int = 35
    max_len: int = 98                 # decoder positions = tokens per transcript - 1
    width: int = 200
    heads: int = 2
    mlp: int = 400
    encoder_layers: int = 2
    feature_dim: Optional[int] = 16   # q/k dims per head of Taylor attention (None: the head dim)
    backend: str = "auto"             # linattn_cuda backend of Taylor attention

    def as_dict(self) -> dict:
        return asdict(self)


class SpeechToText(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        taylor_fd = c.feature_dim if c.encoder_attention == "taylor" else None
        self.encoder = AudioEncoder(c.n_mels, c.width, c.heads, c.mlp, c.encoder_layers, c.max_frames,
                                    attention=c.encoder_attention, feature_dim=taylor_fd, backend=c.backend)
        self.decoder = build_decoder(c.decoder, vocab_size=c.vocab_size, width=c.width, heads=c.heads, mlp=c.mlp,
                                     max_len=c.max_len, feature_dim=c.feature_dim, backend=c.backend)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``feats [B, n_mels, T]``, ``tokens [B, L]`` -> logits ``[B, L, V]``."""
        return self.decoder(tokens, self.encoder(feats))


def build_model(config: ModelConfig) -> SpeechToText:
    return SpeechToText(config)
