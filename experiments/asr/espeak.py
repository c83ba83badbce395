"""A corpus that sounds like speech: real English sentences spoken by espeak-ng, in LJ Speech's on-disk layout.

``python -m experiments.asr synth --engine espeak --out data/espeak --clips 1000``

* Text: sentences of CPython's ``pydoc_data.topics`` (the Python language reference topics that ship with
  the interpreter, the same corpus as the character-LM experiment), taken as written: each topic's
  paragraphs are split into sentences, a sentence is kept when it holds nothing but letters, spaces and
  ``, . ? ! ; : - ( ) " '`` (no digits, code or markup), and is normalized by dropping quotes and
  parentheses and reading ``; :`` as ``,`` and ``!`` as ``.``. The normalized sentence is what espeak-ng
  speaks and the transcript the model learns (third ``metadata.csv`` column); the second column is the
  sentence as written. Sentences of 12 to ``max_chars`` (97) characters, each distinct.
* Splits: the course's index split (:func:`experiments.asr.data.split_ranges`, 75 / 5 / 20 %) gets disjoint
  sentences: every validation and test clip speaks a sentence of its own that no other clip speaks; the
  training clips share the remaining sentences, each spoken several times by different voices and rates.
* Voices and rates: :data:`VOICES` (espeak-ng's English voices with its male and female variants) and
  :data:`RATES` words per minute, drawn per clip with the seed. A clip longer than ``max_seconds`` is spoken
  again at the next faster rate, one shorter than ``min_seconds`` at the next slower one.
* Audio: espeak-ng writes 22,050 Hz mono 16-bit PCM WAV, LJ Speech's format (checked per clip).
* ``corpus.json``: engine and version, text source, voices, rates, per-split sentence counts, the longest clip
  in seconds and its feature frames (``max_frames``: pass it to ``train --max-frames`` to crop nothing and pad
  as little as possible).

espeak-ng is a system package: ``apt-get install espeak-ng`` (Debian/Ubuntu), ``brew install espeak-ng``
(macOS). Without it :func:`make_espeak_corpus` raises :class:`EspeakNotFound`.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SAMPLE_RATE = 22_050
HOP = 160  # the front end's hop: a clip of T samples has 1 + T // 160 feature frames
TEXT_SOURCE = "CPython pydoc_data.topics (the Python language reference topics shipped with the interpreter)"
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-gb-scotland+f2", "en-029+m5", "en-gb-x-rp+f4", "en-us+m7")
RATES = (130, 150, 170, 190)
_ALLOWED = re.compile(r"[A-Za-z ,.?\-\"'();:!]+")
_SENTENCE = re.compile(r"[A-Z][a-z]*( [A-Za-z,\-]+)+[a-z][.?]")
_ABBREVIATION = re.compile(r"\b(e\.g|i\.e|etc|vs)\b", re.IGNORECASE)

__all__ = ["SAMPLE_RATE", "TEXT_SOURCE", "VOICES", "RATES", "EspeakNotFound", "espeak_executable", "normalize",
           "sentences", "speak", "make_espeak_corpus"]


class EspeakNotFound(RuntimeError):
    """espeak-ng is not installed (``apt-get install espeak-ng``)."""


def espeak_executable(executable: Optional[str] = None) -> str:
    """Path of the espeak-ng program, or :class:`EspeakNotFound` with the install command."""
    found = shutil.which(executable or "espeak-ng")
    if found is None:
        raise EspeakNotFound(f"{executable or 'espeak-ng'} not found on PATH: install it with `apt-get install espeak-ng` "
                             "(Debian/Ubuntu) or `brew install espeak-ng` (macOS)")
    return found


def normalize(sentence: str) -> str:
    """Drop quotes and parentheses, ``; :`` -> ``,``, ``!`` -> ``.``, collapse spaces."""
    s = re.sub(r"[\"'()]", "", sentence)
    s = re.sub(r"\s*[;:]\s*", ", ", s).replace("!", ".")
    return " ".join(s.split())


def _topic_text() -> str:
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


def sentences(*, min_chars: int = 12, max_chars: int = 97, text: Optional[str] = None) -> List[Tuple[str, str]]:
    """``(as written, normalized)`` pairs of distinct sentences of ``text`` (default ``pydoc_data.topics``), in text order.

    A sentence is kept when it has only letters, spaces and ``, . ? ! ; : - ( ) " '``, has no apostrophe inside a
    word (``class's`` would read ``classs``) and no abbreviation, and its normalized form starts with a capital,
    ends with ``.`` or ``?`` after a letter and has ``min_chars`` to ``max_chars`` characters.
    """
    if not 1 <= min_chars <= max_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    text = _topic_text() if text is None else text
    seen: Dict[str, str] = {}
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for s in re.split(r"(?<=[.?!])\s+(?=[A-Z\"(])", flat):
            if not _ALLOWED.fullmatch(s) or re.search(r"[A-Za-z]'[A-Za-z]", s) or _ABBREVIATION.search(s):
                continue
            n = normalize(s)
            if (min_chars <= len(n) <= max_chars and _SENTENCE.fullmatch(n) and " -" not in n and "- " not in n
                    and n not in seen):
                seen[n] = s
    return [(raw, n) for n, raw in seen.items()]


def speak(text: str, path: Path, *, voice: str = "en-us", rate: int = 170, executable: Optional[str] = None) -> float:
    """Speak ``text`` into the WAV file ``path`` (22,050 Hz mono 16-bit); returns its duration in seconds."""
    import soundfile as sf

    exe = espeak_executable(executable)
    result = subprocess.run([exe, "-v", voice, "-s", str(int(rate)), "-w", str(path), "--stdin"], input=text,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not Path(path).exists():
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}, rate {rate}: {result.stderr.strip() or result.returncode}")
    info = sf.info(str(path))
    if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, "PCM_16"):
        raise RuntimeError(f"espeak-ng wrote {info.samplerate} Hz, {info.channels} channel(s), {info.subtype}; expected "
                           f"{SAMPLE_RATE} Hz mono PCM_16 (LJ Speech's format)")
    return info.frames / info.samplerate


def _speak_fitting(text, path, voice, rate, rates, min_seconds, max_seconds, exe) -> Tuple[float, int]:
    """Speak at ``rate``; if the clip is too long (short), retry at the next faster (slower) rate of ``rates``."""
    ordered = sorted(rates)
    i = ordered.index(rate)
    seconds = speak(text, path, voice=voice, rate=rate, executable=exe)
    while seconds > max_seconds and i + 1 < len(ordered):
        i += 1
        seconds = speak(text, path, voice=voice, rate=ordered[i], executable=exe)
    while seconds < min_seconds and i > 0:
        i -= 1
        seconds = speak(text, path, voice=voice, rate=ordered[i], executable=exe)
    return seconds, ordered[i]


def make_espeak_corpus(out: Path, *, clips: int = 1000, seed: int = 0, voices: Sequence[str] = VOICES,
                       rates: Sequence[int] = RATES, min_seconds: float = 1.0, max_seconds: float = 8.0,
                       max_chars: int = 97, executable: Optional[str] = None, progress: bool = True) -> Path:
    """Write ``clips`` spoken sentences to ``out`` in LJ Speech's layout (see the module docstring); returns ``out``."""
    from .data import COURSE_SPLIT_BOUNDS, LJSPEECH_CLIPS

    if clips < 3:
        raise ValueError(f"clips must be >= 3 (one per split at least), got {clips}")
    if not voices or not rates:
        raise ValueError("voices and rates must not be empty")
    if not 0 < min_seconds < max_seconds:
        raise ValueError(f"need 0 < min_seconds < max_seconds, got min_seconds={min_seconds}, max_seconds={max_seconds}")
    exe = espeak_executable(executable)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    pool = sentences(max_chars=max_chars)
    rng = random.Random(seed)
    rng.shuffle(pool)
    a, b = (clips * bound // LJSPEECH_CLIPS for bound in COURSE_SPLIT_BOUNDS)  # the course's split, scaled (as training does)
    ranges = {"train": range(0, a), "validation": range(a, b), "test": range(b, clips)}
    held_out = len(ranges["validation"]) + len(ranges["test"])
    n_train = len(ranges["train"])
    if held_out + min(n_train, 1) > len(pool):
        raise ValueError(f"clips={clips} needs {held_out} distinct validation/test sentences plus training ones; "
                         f"the text has {len(pool)} sentences of at most {max_chars} characters")
    # text order in metadata.csv: training clips, then validation, then test (the index split)
    evaluation = pool[:held_out]
    train_pool = pool[held_out:][: max(n_train, 1)]
    plan: List[Tuple[str, Tuple[str, str], str]] = []
    for i in range(n_train):
        repeat, j = divmod(i, len(train_pool))
        plan.append(("train", train_pool[j], voices[(j + repeat) % len(voices)]))  # repeats: another voice each time
    for k, name in enumerate(("validation", "test")):
        offset = 0 if k == 0 else len(ranges["validation"])
        for j in range(len(ranges[name])):
            plan.append((name, evaluation[offset + j], rng.choice(voices)))
    out = Path(out)
    wavs = out / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    lines, longest, shortest, total = [], 0.0, float("inf"), 0.0
    used_rates: Dict[int, int] = {}
    for i, (split, (raw, normalized), voice) in enumerate(tqdm(plan, desc="espeak-ng", unit="clip", disable=not progress)):
        clip_id = f"ES{1 + i // 1000:03d}-{i % 1000 + 1:04d}"
        seconds, rate = _speak_fitting(normalized, wavs / f"{clip_id}.wav", voice, rng.choice(list(rates)), rates,
                                       min_seconds, max_seconds, exe)
        longest, shortest, total = max(longest, seconds), min(shortest, seconds), total + seconds
        used_rates[rate] = used_rates.get(rate, 0) + 1
        lines.append(f"{clip_id}|{raw}|{normalized}")
    (out / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    longest_samples = max(int(round(longest * SAMPLE_RATE)), 0)
    info = {
        "engine": "espeak-ng", "version": version, "text_source": TEXT_SOURCE, "clips": clips, "seed": seed,
        "voices": list(voices), "rates_wpm": list(rates), "clips_per_rate": {str(k): v for k, v in sorted(used_rates.items())},
        "sample_rate": SAMPLE_RATE, "min_seconds": shortest, "max_seconds": longest, "mean_seconds": total / clips,
        "max_frames": 1 + longest_samples // HOP, "max_chars": max(len(n) for _, (_, n), _ in plan),
        "sentences": {"train": len(train_pool) if n_train else 0, "validation": len(ranges["validation"]),
                      "test": len(ranges["test"]), "available": len(pool)},
        "splits": {k: [r.start, r.stop] for k, r in ranges.items()},
    }
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
