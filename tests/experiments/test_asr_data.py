"""LJ Speech pipeline pieces: tokenizer, front end, metadata/splits, feature cache, download and safe extraction."""
import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.asr import data as asr_data
from experiments.asr.data import (
    ASRDataset, ChecksumError, FeatureStore, UnsafeArchiveError, download, load_wav, prepare_ljspeech,
    read_metadata, safe_extract, split_ranges,
)
from experiments.asr.features import FrontEndConfig, LogMelFrontEnd, hz_to_mel, mel_filterbank, mel_to_hz
from experiments.asr.synthetic import SAMPLE_RATE, make_corpus, symbol_frequencies
from experiments.asr.tokenizer import PAD_ID, START_ID, STOP_ID, UNK_ID, VOCAB, Tokenizer

# ------------------------------------------------------------------------------------------------ tokenizer


def test_vocabulary_order():
    assert len(VOCAB) == 35
    assert "".join(VOCAB) == "<>@# ,.?-abcdefghijklmnopqrstuvwxyz"
    assert (START_ID, STOP_ID, PAD_ID, UNK_ID) == (0, 1, 2, 3)


def test_tokenizer_round_trip_and_padding():
    tok = Tokenizer()
    ids = tok.encode("Hello, World - is it?")
    assert ids.shape == (99,) and ids.dtype == torch.long
    assert ids[0] == START_ID and ids[22] == STOP_ID and (ids[23:] == PAD_ID).all()
    assert tok.decode(ids, strip=True) == "hello, world - is it?"
    assert tok.decode(ids).startswith("<hello, world - is it?>@@")


def test_tokenizer_unknown_and_truncation():
    tok = Tokenizer()
    assert tok.decode(tok.encode("a;b\"c'1"), strip=True) == "a#b#c##"
    long = "x" * 150
    ids = tok.encode(long)
    assert ids.shape == (99,) and ids[-1] == STOP_ID and (ids[1:98] == VOCAB.index("x")).all()
    assert Tokenizer(max_chars=5).encode("abcdefgh").tolist() == [0, 9, 10, 11, 12, 13, 1]


# ------------------------------------------------------------------------------------------------ front end


def test_mel_scale_round_trip_and_known_points():
    f = torch.tensor([0.0, 500.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(f)), f)
    assert float(hz_to_mel(torch.tensor(1000.0))) == pytest.approx(15.0)  # Slaney: linear to 1 kHz, 15 mel there


def test_filterbank_shape_and_slaney_normalization():
    fb = mel_filterbank(400, 80, 16000)
    assert fb.shape == (201, 80) and (fb >= 0).all()
    pts = mel_to_hz(torch.linspace(0, float(hz_to_mel(torch.tensor(8000.0))), 82, dtype=torch.float64))
    freqs = torch.linspace(0, 8000, 201, dtype=torch.float64)
    m = 40  # a triangle from pts[m] up to pts[m+1] and down to pts[m+2], scaled by 2 / (pts[m+2] - pts[m])
    rise = (freqs - pts[m]) / (pts[m + 1] - pts[m])
    fall = (pts[m + 2] - freqs) / (pts[m + 2] - pts[m + 1])
    expected = torch.clamp(torch.minimum(rise, fall), min=0) * 2 / (pts[m + 2] - pts[m])
    torch.testing.assert_close(fb[:, m].double(), expected, atol=1e-8, rtol=1e-5)


def test_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    for rate in (16000, 22050):
        ref = librosa.filters.mel(sr=rate, n_fft=400, n_mels=80, norm="slaney", htk=False)
        np.testing.assert_allclose(mel_filterbank(400, 80, rate).numpy().T, ref, atol=1e-7, rtol=1e-5)


def _tone(freq, seconds=1.0, rate=SAMPLE_RATE, amp=0.5):
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


@pytest.mark.parametrize("filterbank_rate", [16000, None], ids=["course-16k-quirk", "native-rate"])
def test_pure_tone_lands_in_the_right_mel_bin(filterbank_rate):
    front = LogMelFrontEnd(FrontEndConfig(filterbank_rate=filterbank_rate))
    freq = 2000.0
    feats = front.features(_tone(freq), SAMPLE_RATE)
    assert feats.shape == (80, 1 + SAMPLE_RATE // 160)
    # the filterbank's frequency axis: with the quirk, the file's f Hz is read as f * 16000 / 22050 Hz
    seen = freq * (16000 / SAMPLE_RATE if filterbank_rate else 1.0)
    fb_rate = filterbank_rate or SAMPLE_RATE
    pts = mel_to_hz(torch.linspace(0, float(hz_to_mel(torch.tensor(fb_rate / 2))), 82, dtype=torch.float64))
    expected = int(torch.argmin((pts[1:-1] - seen).abs()))
    peak = feats[:, 10:-10].mean(1).argmax().item()
    assert abs(peak - expected) <= 1


def test_normalization_values():
    front = LogMelFrontEnd()
    feats = front.features(_tone(1000.0), SAMPLE_RATE)
    # max(x, max - 8) then (x + 4) / 4: the range is exactly 8 / 4 = 2 below the maximum
    assert feats.max() - feats.min() == pytest.approx(2.0, abs=1e-5)
    silence = front.features(torch.zeros(16000), SAMPLE_RATE)
    torch.testing.assert_close(silence, torch.full_like(silence, (-10 + 4) / 4))  # log10(1e-10) = -10
    padded = front(_tone(1000.0, 0.5), SAMPLE_RATE)
    n = 1 + int(0.5 * SAMPLE_RATE) // 160
    assert padded.shape == (80, 2754) and (padded[:, n:] == 0).all() and (padded[:, :n] != 0).any()
    long = LogMelFrontEnd(FrontEndConfig(max_frames=50))(_tone(1000.0, 1.0), SAMPLE_RATE)
    assert long.shape == (80, 50)


# ------------------------------------------------------------------------------- corpus, splits, cache


def test_split_ranges_match_the_course():
    s = split_ranges(13100)
    assert (s["train"], s["validation"], s["test"]) == (range(0, 9825), range(9825, 10480), range(10480, 13100))
    small = split_ranges(100, scale=True)
    assert sum(len(r) for r in small.values()) == 100 and len(small["train"]) == 75
    with pytest.raises(asr_data.CorpusError, match="13,100 clips, the corpus has 13,099"):
        split_ranges(13099)  # LJ Speech with a line missing is not silently rescaled


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("synth") / "LJSpeech-1.1", clips=24, seed=3)


def test_synthetic_corpus_layout_and_loader(corpus, tmp_path):
    lines = (corpus / "metadata.csv").read_text().splitlines()
    assert len(lines) == 24 and all(line.count("|") == 2 for line in lines)
    clips = read_metadata(corpus)
    assert clips[0].id == lines[0].split("|")[0]
    import soundfile as sf

    info = sf.info(str(corpus / "wavs" / f"{clips[0].id}.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
    wave, rate = load_wav(corpus / "wavs" / f"{clips[0].id}.wav")
    assert rate == 22050 and wave.dtype == torch.float32 and wave.abs().max() <= 1.0

    config = FrontEndConfig(max_frames=300)
    store = FeatureStore.build(corpus, config, tmp_path / "cache", progress=False)
    assert len(store) == 24
    again = FeatureStore.build(corpus, config, tmp_path / "cache", progress=False)  # reused, not recomputed
    assert again.folder == store.folder and [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"] == [store.folder.name]
    front = LogMelFrontEnd(config)
    torch.testing.assert_close(store[5], front.features(*load_wav(corpus / "wavs" / f"{clips[5].id}.wav")))

    ds = ASRDataset(store, clips, split_ranges(len(clips), scale=True)["test"], Tokenizer())
    feats, tokens, index, frames = ds[0]
    assert feats.shape == (80, 300) and tokens.shape == (99,) and index == 19
    assert frames == min(store.frames(19), 300) and (feats[:, frames:] == 0).all()
    assert Tokenizer().decode(tokens, strip=True) == clips[19].normalized  # the normalized column is used


def test_synthetic_tones_light_their_own_bins(corpus):
    freqs = symbol_frequencies()
    front = LogMelFrontEnd()
    peaks = []
    for symbol in ("a", "m", "z", " "):
        t = torch.arange(int(0.2 * SAMPLE_RATE)) / SAMPLE_RATE
        peaks.append(front.features(torch.sin(2 * math.pi * freqs[symbol] * t), SAMPLE_RATE)[:, 5:-5].mean(1).argmax().item())
    assert len(set(peaks)) == 4


# --------------------------------------------------------------------------------- download / extraction


def _tar(path: Path, entries) -> Path:
    with tarfile.open(path, "w:bz2") as tar:
        for info, payload in entries:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name, payload=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(_file("/etc/evil"), id="absolute"),
        pytest.param(_file("LJSpeech-1.1/../../evil"), id="dotdot"),
        pytest.param(_link("LJSpeech-1.1/escape", "../../outside"), id="symlink-escape"),
        pytest.param(_link("LJSpeech-1.1/abs", "/etc/passwd"), id="symlink-absolute"),
        pytest.param(_link("LJSpeech-1.1/hard", "../outside", tarfile.LNKTYPE), id="hardlink-escape"),
        pytest.param((lambda i: (setattr(i, "type", tarfile.CHRTYPE), (i, None))[1])(tarfile.TarInfo("LJSpeech-1.1/dev")), id="device"),
    ],
)
def test_safe_extract_rejects_malicious_archive(tmp_path, entry):
    archive = _tar(tmp_path / "evil.tar.bz2", [_file("LJSpeech-1.1/ok.txt"), entry])
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, target, progress=False)
    assert not (target / "LJSpeech-1.1" / "ok.txt").exists()  # checked before anything is written
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_safe_extract_accepts_inner_links(tmp_path):
    archive = _tar(tmp_path / "ok.tar.bz2", [_file("d/a.txt", b"hello"), _link("d/b.txt", "a.txt")])
    names = safe_extract(archive, tmp_path / "out", progress=False)
    assert names == ["d/a.txt", "d/b.txt"] and (tmp_path / "out/d/b.txt").read_bytes() == b"hello"


def test_download_verifies_checksum(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"lj speech" * 1000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    got = download(src.as_uri(), tmp_path / "dl" / "a.bin", sha256=sha, progress=False)
    assert got.read_bytes() == src.read_bytes()
    with pytest.raises(ChecksumError):
        download(src.as_uri(), tmp_path / "dl" / "b.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "dl" / "b.bin").exists() and not (tmp_path / "dl" / "b.bin.part").exists()


def test_prepare_ljspeech_from_a_small_archive(tmp_path, corpus):
    """The real download path (URL, checksum, extraction) on a generated LJ-layout archive."""
    archive = tmp_path / "LJSpeech-1.1.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(corpus / "metadata.csv", arcname="LJSpeech-1.1/metadata.csv")
        tar.add(corpus / "wavs", arcname="LJSpeech-1.1/wavs")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    root = tmp_path / "data"
    with pytest.raises(ChecksumError):  # the official checksum does not match the test archive
        prepare_ljspeech(root, url=archive.as_uri(), progress=False)
    dataset = prepare_ljspeech(root, url=archive.as_uri(), sha256=sha, progress=False)
    assert dataset == root / "LJSpeech-1.1" and len(read_metadata(dataset)) == 24
    assert asdict_len(dataset) == 24
    with pytest.raises(FileNotFoundError, match="download"):
        prepare_ljspeech(tmp_path / "empty", download_if_missing=False)
    assert asr_data.LJSPEECH_SHA256 == "be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5"


def asdict_len(dataset: Path) -> int:
    return len(list((dataset / "wavs").glob("*.wav")))
