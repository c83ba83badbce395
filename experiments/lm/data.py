"""The corpus: bytes of real English text, a train/validation split, training and validation windows.

Default corpus: the documentation text CPython ships in ``pydoc_data.topics`` (the help texts of the
language reference topics, ~465 K characters on Python 3.11). Its topics are joined in sorted key order with
one blank line between them (``"\\n\\n".join(topics[k] for k in sorted(topics))``) and UTF-8 encoded; the
text differs between Python versions, so runs record the corpus' sha256 and length. ``--text FILE`` (one or
more) uses those files instead, concatenated in the given order with a blank line between them.

* Vocabulary: the 256 byte values (UTF-8 bytes; the default corpus is almost all ASCII, so bits per
  byte = bits per character to within 0.3 %; we report bits per byte under the name ``val_bits_per_char``).
* Split: the first 90 % of the bytes train, the last 10 % validate (``val_fraction``), cut at a byte index:
  contiguous, no shuffling, so validation is text the model never saw (the last topics in key order).
* Training windows: ``batch_size`` random contiguous windows of ``context + 1`` bytes per step, start
  offsets drawn uniformly from the training part by a generator seeded with ``(seed, step)``: step ``t``'s
  batch is the same in every run with that seed, whatever the attention kind and whether it was resumed.
* Validation windows: the validation part cut into consecutive, non-overlapping windows of ``context + 1``
  bytes (the remainder shorter than a window is dropped), fixed for a given context; every position of
  every window is scored, so bits/char is averaged over ~46 K predictions with 0..context-1 bytes of context.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["VOCAB_SIZE", "Corpus", "default_text", "load_corpus", "train_batch", "validation_windows"]

VOCAB_SIZE = 256


def default_text() -> str:
    """CPython's ``pydoc_data.topics`` texts joined in sorted key order with a blank line between topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass
class Corpus:
    train: torch.Tensor        # uint8 [N_train]
    validation: torch.Tensor   # uint8 [N_val]
    source: str                # "pydoc_data.topics" or the file names
    sha256: str                # of the whole byte string before the split
    num_bytes: int

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "bytes": self.num_bytes,
                "train_bytes": int(self.train.numel()), "validation_bytes": int(self.validation.numel())}


def load_corpus(files: Optional[Sequence[str]] = None, *, val_fraction: float = 0.1) -> Corpus:
    """Bytes of the default corpus (``files`` empty/None) or of ``files``, split train / validation."""
    if files:
        data = b"\n\n".join(Path(f).read_bytes() for f in files)
        source = " + ".join(str(f) for f in files)
    else:
        data = default_text().encode("utf-8")
        source = "pydoc_data.topics"
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    all_bytes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    cut = len(data) - int(round(len(data) * val_fraction))
    return Corpus(all_bytes[:cut].clone(), all_bytes[cut:].clone(), source, hashlib.sha256(data).hexdigest(), len(data))


def _check_length(part: torch.Tensor, context: int, name: str) -> None:
    if part.numel() < context + 1:
        raise ValueError(f"the {name} part has {part.numel()} bytes, fewer than context + 1 = {context + 1}")


def train_batch(train: torch.Tensor, *, step: int, seed: int, batch_size: int, context: int) -> torch.Tensor:
    """``[batch_size, context + 1]`` int64 windows of the training bytes for ``step`` (input ``[:, :-1]``, target ``[:, 1:]``)."""
    _check_length(train, context, "training")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, train.numel() - context, (batch_size,), generator=g)
    return torch.stack([train[s:s + context + 1] for s in starts.tolist()]).long()


def validation_windows(validation: torch.Tensor, context: int, limit: Optional[int] = None) -> torch.Tensor:
    """``[W, context + 1]`` int64: consecutive non-overlapping windows of the validation bytes (first ``limit``)."""
    _check_length(validation, context, "validation")
    count = validation.numel() // (context + 1)
    if limit is not None:
        count = min(count, limit)
    return validation[: count * (context + 1)].view(count, context + 1).long()
