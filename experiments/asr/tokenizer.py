"""The course's character tokenizer: 35 symbols, ``<`` start, ``>`` stop, ``@`` pad, ``#`` unknown.

Index order (SPEC section 3): ``< > @ #``, then space ``, . ? -``, then ``a``-``z``. A transcript is
lowercased, cut to ``max_chars`` (97) characters, wrapped in ``<...>`` and padded with ``@`` to
``max_chars + 2`` (99) tokens; characters outside the vocabulary map to ``#``.
"""
from __future__ import annotations

import string
from typing import Iterable, List, Sequence

import torch

START, STOP, PAD, UNK = "<", ">", "@", "#"
VOCAB: tuple[str, ...] = (START, STOP, PAD, UNK, " ", ",", ".", "?", "-", *string.ascii_lowercase)
START_ID, STOP_ID, PAD_ID, UNK_ID = 0, 1, 2, 3
MAX_CHARS = 97

__all__ = ["VOCAB", "START_ID", "STOP_ID", "PAD_ID", "UNK_ID", "MAX_CHARS", "Tokenizer"]


class Tokenizer:
    """``encode(text) -> LongTensor [max_chars + 2]``, ``decode(ids) -> str``."""

    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        if max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {max_chars}")
        self.max_chars = max_chars
        self.vocab = VOCAB
        self.index = {c: i for i, c in enumerate(VOCAB)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def length(self) -> int:
        """Tokens per encoded transcript (start + max_chars + stop)."""
        return self.max_chars + 2

    def encode(self, text: str) -> torch.Tensor:
        chars = START + text.lower()[: self.max_chars] + STOP
        ids = [self.index.get(c, UNK_ID) for c in chars]
        ids += [PAD_ID] * (self.length - len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def encode_batch(self, texts: Iterable[str]) -> torch.Tensor:
        return torch.stack([self.encode(t) for t in texts])

    def decode(self, ids: Sequence[int], *, strip: bool = False) -> str:
        """Token ids to text; ``strip`` drops the start token and everything from the first stop token on."""
        ids = [int(i) for i in ids]
        if strip:
            if ids and ids[0] == START_ID:
                ids = ids[1:]
            if STOP_ID in ids:
                ids = ids[: ids.index(STOP_ID)]
        return "".join(self.vocab[i] for i in ids)

    def decode_batch(self, ids: torch.Tensor, *, strip: bool = False) -> List[str]:
        return [self.decode(row.tolist(), strip=strip) for row in ids]
