"""The espeak-ng corpus: real sentences of pydoc_data.topics, LJ Speech's layout and format, disjoint splits.

The generator tests speak a handful of clips and skip cleanly without espeak-ng (`apt-get install espeak-ng`);
the sentence selection and the missing-program error run everywhere.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.asr import espeak
from experiments.asr.data import FeatureStore, read_metadata
from experiments.asr.espeak import EspeakNotFound, make_espeak_corpus, normalize, sentences
from experiments.asr.features import FrontEndConfig
from experiments.asr.tokenizer import UNK_ID, Tokenizer

REPO = Path(__file__).resolve().parents[2]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")


def test_sentences_are_real_text_of_pydoc_topics():
    from pydoc_data import topics

    pool = sentences()
    assert len(pool) > 500  # enough for disjoint validation/test sentences of a ~1,000-clip corpus
    text = " ".join(" ".join(t.split()) for t in topics.topics.values()).replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    tok = Tokenizer()
    normalized = [n for _, n in pool]
    assert len(set(normalized)) == len(normalized)
    for raw, n in pool:
        assert raw in text  # verbatim from the topics, not generated
        assert n == normalize(raw) and 12 <= len(n) <= 97 and n[0].isupper() and n[-1] in ".?"
        assert UNK_ID not in tok.encode(n).tolist()  # every character is in the course's vocabulary
    assert normalize('The "in" operator (see below): fast!') == "The in operator see below, fast."
    assert sentences(text="Short one. This sentence is long enough to keep. X = 1 is code.") == [
        ("This sentence is long enough to keep.", "This sentence is long enough to keep.")]
    with pytest.raises(ValueError, match="min_chars"):
        sentences(min_chars=0)


def test_missing_espeak_is_a_clear_error(tmp_path):
    with pytest.raises(EspeakNotFound, match="apt-get install espeak-ng"):
        make_espeak_corpus(tmp_path / "c", clips=4, executable="no-such-espeak-program")
    with pytest.raises(ValueError, match="clips"):
        make_espeak_corpus(tmp_path / "c", clips=2)


@needs_espeak
def test_espeak_corpus_layout_format_and_splits(tmp_path):
    import soundfile as sf

    out = make_espeak_corpus(tmp_path / "es", clips=20, seed=3, voices=("en-us", "en-gb+f3"), rates=(130, 190),
                             min_seconds=1.0, max_seconds=8.0, progress=False)
    clips = read_metadata(out)
    assert len(clips) == 20 and all(re.fullmatch(r"ES001-\d{4}", c.id) for c in clips)
    real = {n for _, n in sentences()}
    durations = []
    for c in clips:
        info = sf.info(str(out / "wavs" / f"{c.id}.wav"))
        assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")  # LJ Speech's format
        durations.append(info.frames / info.samplerate)
        assert c.normalized in real and normalize(c.text) == c.normalized
    assert 0.8 <= min(durations) and max(durations) <= 8.5
    info = json.loads((out / "corpus.json").read_text())
    assert info["splits"] == {"train": [0, 15], "validation": [15, 16], "test": [16, 20]}  # the course's 9825/655/2620 of 13,100, scaled
    texts = {name: [clips[i].normalized for i in range(*r)] for name, r in info["splits"].items()}
    held_out = texts["validation"] + texts["test"]
    assert len(set(held_out)) == len(held_out) and not set(held_out) & set(texts["train"])  # disjoint sentences
    assert info["engine"] == "espeak-ng" and "pydoc_data.topics" in info["text_source"]
    assert info["max_frames"] == 1 + round(max(durations) * 22050) // 160
    store = FeatureStore.build(out, FrontEndConfig(max_frames=info["max_frames"]), tmp_path / "cache", progress=False)
    assert max(store.frames(i) for i in range(len(store))) == info["max_frames"]  # crop to the longest clip: nothing lost


@needs_espeak
def test_synth_cli_espeak_engine(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.asr", "synth", "--engine", "espeak", "--out", str(tmp_path / "es"),
                             "--clips", "4", "--voices", "en-us", "--rates", "170"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_metadata(tmp_path / "es")) == 4 and '"max_frames"' in result.stdout


def test_speak_rejects_unknown_voice(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    with pytest.raises(RuntimeError, match="voice 'bogus'"):  # (espeak-ng reads "no-..." as Norwegian)
        espeak.speak("Hello there.", tmp_path / "x.wav", voice="bogus")
