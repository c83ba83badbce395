"""A small synthetic corpus in LJ Speech's on-disk layout, with a signal a model can learn to transcribe.

Each character of the normalized transcript is a pure tone of its own frequency lasting ``char_seconds``
(short raised-cosine edges, small noise); a space is a tone too, so every token is audible. Frequencies
are spaced evenly on the mel scale as the course's front end sees them (its 16 kHz filterbank reads a
22,050 Hz file's frequencies divided by 1.378), two mel bins apart, so every symbol lights its own bin.

Layout: ``<out>/metadata.csv`` (``id|transcript|normalized transcript``, the transcript column
capitalized and with digits so that loaders must read the third column) and ``<out>/wavs/<id>.wav``
(22,050 Hz mono 16-bit PCM). Transcripts are random sequences of words from a small lexicon.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Dict, List

import numpy as np

from .features import hz_to_mel, mel_to_hz

SAMPLE_RATE = 22_050
LEXICON = (
    "the", "of", "and", "to", "in", "was", "he", "that", "his", "by", "with", "for", "as", "which",
    "prison", "court", "said", "were", "on", "had", "at", "it", "be", "from", "an", "they", "mr",
    "oswald", "this", "have", "not", "jury", "quick", "zeal", "vex", "why", "yes",
)
SYMBOLS = " ,.?-abcdefghijklmnopqrstuvwxyz"
_NUMBERS = {"one": "1", "two": "2", "three": "3"}

__all__ = ["SAMPLE_RATE", "symbol_frequencies", "synthesize", "make_corpus"]


def symbol_frequencies(filterbank_rate: int = 16_000, sample_rate: int = SAMPLE_RATE, n_mels: int = 80) -> Dict[str, float]:
    """Frequency (Hz, in the file) of each symbol: the centre of mel bin ``6 + 2 i`` as the front end sees it."""
    top = filterbank_rate / 2
    pts = mel_to_hz(np.linspace(0.0, float(hz_to_mel(np.float64(top))), n_mels + 2))
    stretch = sample_rate / filterbank_rate  # the filterbank's f Hz is the file's f * stretch Hz
    return {s: float(pts[1 + 6 + 2 * i]) * stretch for i, s in enumerate(SYMBOLS)}


def synthesize(text: str, *, char_seconds: float = 0.05, sample_rate: int = SAMPLE_RATE, freqs=None, rng=None) -> np.ndarray:
    """int16 samples: one tone per character (unknown characters are silent), 50 ms of silence around."""
    freqs = freqs or symbol_frequencies(sample_rate=sample_rate)
    rng = rng or np.random.default_rng(0)
    n = int(round(char_seconds * sample_rate))
    t = np.arange(n) / sample_rate
    edge = max(1, n // 10)
    env = np.ones(n)
    env[:edge] = env[-edge:][::-1] = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
    silence = np.zeros(int(0.05 * sample_rate))
    parts = [silence]
    for c in text:
        f = freqs.get(c)
        tone = np.zeros(n) if f is None else 0.5 * env * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        parts.append(tone)
    parts.append(silence)
    wave = np.concatenate(parts) + rng.normal(0.0, 1e-3, size=sum(len(p) for p in parts))
    return np.clip(np.round(wave * 32767), -32768, 32767).astype(np.int16)


def _transcript(rng: random.Random, min_words: int, max_words: int) -> tuple[str, str]:
    words = [rng.choice(LEXICON + tuple(_NUMBERS)) for _ in range(rng.randint(min_words, max_words))]
    normalized = " ".join(words)
    if rng.random() < 0.3:
        normalized += rng.choice(",.?")
    raw = " ".join(_NUMBERS.get(w, w) for w in words)
    raw = raw[:1].upper() + raw[1:] + normalized[len(" ".join(words)):]
    return raw, normalized


def make_corpus(out: Path, *, clips: int = 200, min_words: int = 2, max_words: int = 4, char_seconds: float = 0.05, seed: int = 0) -> Path:
    """Write ``clips`` synthetic clips to ``out`` (LJ Speech layout); returns ``out``."""
    import soundfile as sf

    out = Path(out)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    freqs = symbol_frequencies()
    lines: List[str] = []
    for i in range(clips):
        clip_id = f"SY{1 + i // 1000:03d}-{i % 1000:04d}"
        raw, normalized = _transcript(rng, min_words, max_words)
        sf.write(str(out / "wavs" / f"{clip_id}.wav"), synthesize(normalized, char_seconds=char_seconds, freqs=freqs, rng=nrng), SAMPLE_RATE, subtype="PCM_16")
        lines.append(f"{clip_id}|{raw}|{normalized}")
    (out / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def frames_needed(max_chars: int, char_seconds: float = 0.05, hop: int = 160, sample_rate: int = SAMPLE_RATE) -> int:
    """Feature frames of the longest synthetic clip with ``max_chars`` characters (for ``--max-frames``)."""
    return 1 + int(math.ceil((max_chars * char_seconds + 0.1) * sample_rate / hop))
