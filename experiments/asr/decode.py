"""Greedy decoding: from ``<`` for ``steps`` (98) positions, with or without each decoder's cache.

``use_cache=False`` is the course's procedure: at every step the whole prefix is fed through the decoder
again (for every decoder, the LSTM included) and the last position's argmax is appended.
``use_cache=True`` feeds one token per step through ``decoder.step`` (LSTM state, softmax key/value
cache or Taylor recurrent state; cross-attention keys/values or state computed once). Both give the
same tokens (tests/experiments/test_asr_models.py).
"""
from __future__ import annotations

import torch

from .tokenizer import START_ID

__all__ = ["greedy_decode", "greedy_decode_memory"]


@torch.no_grad()
def greedy_decode_memory(decoder, memory: torch.Tensor, *, steps: int = 98, use_cache: bool = True, start: int = START_ID) -> torch.Tensor:
    """Tokens ``[B, steps + 1]`` (start token first) decoded from the encoder output ``memory [B, S, W]``."""
    tokens = torch.full((memory.shape[0], 1), start, dtype=torch.long, device=memory.device)
    if use_cache:
        cache = decoder.init_cache(memory)
        for _ in range(steps):
            logits, cache = decoder.step(tokens[:, -1], cache)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    else:
        for _ in range(steps):
            logits = decoder(tokens, memory)[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
def greedy_decode(model, feats: torch.Tensor, *, steps: int = 98, use_cache: bool = True) -> torch.Tensor:
    """Encode ``feats [B, n_mels, T]`` and decode greedily: ``[B, steps + 1]`` token ids."""
    return greedy_decode_memory(model.decoder, model.encoder(feats), steps=steps, use_cache=use_cache)
