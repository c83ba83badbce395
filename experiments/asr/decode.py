"""Greedy decoding: from ``<`` for ``steps`` (98) positions, with or without each decoder's cache.

``use_cache=False`` is the course's procedure: at every step the whole prefix is fed through the decoder
again (for every decoder, the LSTM included) and the last position's argmax is appended.
``use_cache=True`` feeds one token per step through ``decoder.step`` (LSTM state, softmax key/value
cache, Taylor recurrent state or the hybrid's window + state; cross-attention keys/values or state computed
once). Both give the same tokens (tests/experiments/test_asr_models.py). ``lengths`` / ``memory_mask``
mask the padded encoder frames (cross-attention and its cache), as in training with ``--mask-padding``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .tokenizer import START_ID

__all__ = ["greedy_decode", "greedy_decode_memory"]


@torch.no_grad()
def greedy_decode_memory(decoder, memory: torch.Tensor, *, steps: int = 98, use_cache: bool = True, start: int = START_ID,
                         memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens ``[B, steps + 1]`` (start token first) decoded from the encoder output ``memory [B, S, W]``.

    ``memory_mask [B, S]`` (True = padded frame) is ignored by the cross-attention, cached or not.
    """
    if memory_mask is not None and tuple(memory_mask.shape) != tuple(memory.shape[:2]):
        raise ValueError(f"memory_mask must have shape {tuple(memory.shape[:2])} ([B, S] of memory), got {tuple(memory_mask.shape)}")
    tokens = torch.full((memory.shape[0], 1), start, dtype=torch.long, device=memory.device)
    if use_cache:
        cache = decoder.init_cache(memory, memory_mask)
        for _ in range(steps):
            logits, cache = decoder.step(tokens[:, -1], cache)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    else:
        for _ in range(steps):
            logits = decoder(tokens, memory, memory_mask)[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
def greedy_decode(model, feats: torch.Tensor, *, steps: int = 98, use_cache: bool = True,
                  lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Encode ``feats [B, n_mels, T]`` (``lengths [B]``: valid frames, masks the padding) and decode greedily:
    ``[B, steps + 1]`` token ids."""
    memory, mask = model.encode(feats, lengths)
    return greedy_decode_memory(model.decoder, memory, steps=steps, use_cache=use_cache, memory_mask=mask)
