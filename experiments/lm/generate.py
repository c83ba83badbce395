"""Generation from a prompt with each attention kind's decoding cache, and the full re-run it must equal.

``generate(model, prompt, new_tokens, temperature=0 (greedy) | > 0 (sampling, optional top_k), seed)``: the
prompt goes through ``model.prefill`` in one call (each layer's cache: the softmax KV cache, the Taylor
recurrent state, the hybrid's window ring buffer + Taylor state, prefilled by one fused call), then each new
token is picked from the last logits and fed back through ``model.step``. ``use_cache=False`` instead re-runs the whole sequence through ``model.forward``
for every new token (quadratic work, the ground truth the cached path is tested against).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .model import LanguageModel, cache_numel

__all__ = ["generate", "encode", "decode"]


def encode(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def decode(tokens: List[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[..., 0]


@torch.no_grad()
def generate(model: LanguageModel, prompt: List[int], new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, seed: int = 0, use_cache: bool = True,
             return_logits: bool = False) -> Tuple[List[int], dict]:
    """``prompt + new_tokens`` bytes; returns ``(tokens, info)`` with ``info['cache_numel']`` per position
    (cached path) and, with ``return_logits``, ``info['logits'] [new_tokens, 256]`` of each pick."""
    if not prompt:
        raise ValueError("the prompt needs at least one byte")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = list(prompt)
    picked_logits, sizes = [], []
    if use_cache:
        logits, cache = model.prefill(torch.tensor([tokens], device=device))
        for i in range(new_tokens):
            picked_logits.append(logits[0])
            sizes.append(cache_numel(cache))
            nxt = int(_pick(logits, temperature, top_k, generator)[0])
            tokens.append(nxt)
            if i + 1 < new_tokens:
                logits, cache = model.step(torch.tensor([nxt], device=device), cache)
    else:
        for _ in range(new_tokens):
            logits = model(torch.tensor([tokens], device=device))[:, -1]
            picked_logits.append(logits[0])
            tokens.append(int(_pick(logits, temperature, top_k, generator)[0]))
    info = {"cache_numel": sizes}
    if return_logits:
        info["logits"] = torch.stack(picked_logits) if picked_logits else torch.empty(0, 256)
    return tokens, info
