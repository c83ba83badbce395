"""LJ Speech preparation that survives real networks, disks and mistakes (local HTTP server on 127.0.0.1).

A small archive in LJ Speech layout (synthetic clips) stands in for the 2.6 GB one: a cut connection
resumes, a wrong checksum extracts nothing, a truncated archive and a half-extracted tree are detected and
rebuilt, a bad clip is named and leaves no partial feature cache, an interrupted feature build resumes.
"""
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.asr import data as asr_data
from experiments.asr.data import (
    COMPLETE_MARKER, ArchiveError, ChecksumError, ClipError, CorpusError, FeatureStore, check_corpus, check_wav,
    prepare_ljspeech, read_metadata,
)
from experiments.asr.features import FrontEndConfig
from experiments.asr.synthetic import make_corpus

from .http_server import FileServer

QUIET = dict(progress=False, log=lambda m: None)
CLIPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("synth") / "LJSpeech-1.1", clips=CLIPS, seed=5)


@pytest.fixture(scope="module")
def archive(corpus):
    """``(bytes, sha256)`` of a .tar.bz2 holding ``LJSpeech-1.1/metadata.csv`` and ``LJSpeech-1.1/wavs/*.wav``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        tar.add(corpus / "metadata.csv", arcname="LJSpeech-1.1/metadata.csv")
        tar.add(corpus / "wavs", arcname="LJSpeech-1.1/wavs")
    payload = buf.getvalue()
    return payload, hashlib.sha256(payload).hexdigest()


@pytest.fixture
def server(archive):
    with FileServer({"/LJSpeech-1.1.tar.bz2": archive[0]}) as s:
        yield s


def _entries(root: Path):
    return sorted(p.name for p in root.iterdir() if p.suffix != ".lock")


def _wav_ids(dataset: Path):
    return sorted(p.stem for p in (dataset / "wavs").glob("*.wav"))


def test_cut_download_resumes_and_extracts_a_checked_tree(server, archive, tmp_path):
    server.cut_after = [len(archive[0]) // 3]
    messages = []
    root = tmp_path / "data"
    dataset = prepare_ljspeech(root, url=server.url("/LJSpeech-1.1.tar.bz2"), sha256=archive[1], progress=False,
                               log=messages.append)
    assert [s for _, _, s in server.requests] == [200, 206] and any("resuming" in m for m in messages)
    assert (root / "LJSpeech-1.1.tar.bz2").read_bytes() == archive[0]
    assert _entries(root) == ["LJSpeech-1.1", "LJSpeech-1.1.tar.bz2"]  # no .part, no temporary extraction folder
    assert len(read_metadata(dataset)) == CLIPS and len(_wav_ids(dataset)) == CLIPS
    assert (dataset / COMPLETE_MARKER).exists()
    assert prepare_ljspeech(root, url=server.url("/LJSpeech-1.1.tar.bz2"), sha256=archive[1], **QUIET) == dataset
    assert server.gets() == 2  # the second call neither downloads nor extracts


def test_wrong_checksum_is_refused_and_nothing_is_extracted(server, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="does not match the expected f{64}"):
        prepare_ljspeech(root, url=server.url("/LJSpeech-1.1.tar.bz2"), sha256="f" * 64, **QUIET)
    assert _entries(root) == []
    # the official checksum (default) also implies the official size: a wrong archive is refused by its size
    with pytest.raises(ChecksumError, match="expected 2,748,572,632"):
        prepare_ljspeech(root, url=server.url("/LJSpeech-1.1.tar.bz2"), **QUIET)
    assert _entries(root) == []


@pytest.mark.parametrize("checksum", [True, False], ids=["sha256", "checksum-none"])
def test_truncated_archive_on_disk_is_detected_and_fetched_again(server, archive, tmp_path, checksum):
    root = tmp_path / "data"
    root.mkdir()
    (root / "LJSpeech-1.1.tar.bz2").write_bytes(archive[0][: len(archive[0]) // 2])
    dataset = prepare_ljspeech(root, url=server.url("/LJSpeech-1.1.tar.bz2"), sha256=archive[1] if checksum else None, **QUIET)
    assert server.gets() == 1 and (root / "LJSpeech-1.1.tar.bz2").read_bytes() == archive[0]
    assert len(_wav_ids(dataset)) == CLIPS and (dataset / COMPLETE_MARKER).exists()


def test_truncated_archive_without_download_is_named_and_removed(archive, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "LJSpeech-1.1.tar.bz2").write_bytes(archive[0][:-200])
    with pytest.raises(ArchiveError, match=r"LJSpeech-1\.1\.tar\.bz2 is truncated or corrupt.*rerun without --no-download"):
        prepare_ljspeech(root, url="http://127.0.0.1:9/LJSpeech-1.1.tar.bz2", sha256=None, download_if_missing=False, **QUIET)
    assert _entries(root) == []  # neither the bad archive nor a partial tree is left


def test_half_extracted_tree_is_detected_and_rebuilt(server, archive, tmp_path):
    root = tmp_path / "data"
    url = server.url("/LJSpeech-1.1.tar.bz2")
    dataset = prepare_ljspeech(root, url=url, sha256=archive[1], **QUIET)
    ids = _wav_ids(dataset)
    # what an interrupted extraction leaves: no marker, the last clips missing, one WAV cut short, a temp folder
    (dataset / COMPLETE_MARKER).unlink()
    for clip_id in ids[-3:]:
        (dataset / "wavs" / f"{clip_id}.wav").unlink()
    cut = dataset / "wavs" / f"{ids[0]}.wav"
    cut.write_bytes(cut.read_bytes()[:-100])
    (root / ".LJSpeech-1.1.extract-stale").mkdir()
    messages = []
    assert prepare_ljspeech(root, url=url, sha256=archive[1], progress=False, log=messages.append) == dataset
    assert any("is incomplete" in m and "4 of 12 clips" in m for m in messages), messages
    assert _wav_ids(dataset) == ids and (dataset / COMPLETE_MARKER).exists()
    assert cut.read_bytes()[-100:] != b"" and check_wav(cut).sample_rate == 22050
    assert _entries(root) == ["LJSpeech-1.1", "LJSpeech-1.1.tar.bz2"]
    assert server.gets() == 1  # rebuilt from the verified archive on disk


def test_complete_tree_without_marker_is_checked_and_kept(corpus, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(corpus, root / "LJSpeech-1.1")
    # no archive and no download allowed: only a complete, checked tree can be accepted
    dataset = prepare_ljspeech(root, url="http://127.0.0.1:9/LJSpeech-1.1.tar.bz2", sha256=None, download_if_missing=False, **QUIET)
    assert (dataset / COMPLETE_MARKER).exists()
    (dataset / COMPLETE_MARKER).unlink()
    (dataset / "wavs" / f"{read_metadata(dataset)[4].id}.wav").unlink()
    with pytest.raises(CorpusError, match=r"is incomplete \(1 of 12 clips .* missing.*no .*LJSpeech-1\.1\.tar\.bz2 to extract again"):
        prepare_ljspeech(root, url="http://127.0.0.1:9/LJSpeech-1.1.tar.bz2", sha256=None, download_if_missing=False, **QUIET)
    assert dataset.exists() and not (dataset / COMPLETE_MARKER).exists()  # nothing to rebuild from: kept, not used


def test_marker_of_another_archive_is_refused(server, archive, tmp_path):
    root = tmp_path / "data"
    prepare_ljspeech(root, url=server.url("/LJSpeech-1.1.tar.bz2"), sha256=archive[1], **QUIET)
    with pytest.raises(CorpusError, match="extracted from another archive"):
        prepare_ljspeech(root, url=server.url("/LJSpeech-1.1.tar.bz2"), sha256="e" * 64, **QUIET)


def test_official_clip_count_and_wav_format_are_checked(corpus, tmp_path):
    with pytest.raises(CorpusError, match="lists 12 clips; LJ Speech 1.1 has 13,100"):
        check_corpus(corpus, expected_clips=13_100)
    assert len(check_corpus(corpus)) == CLIPS
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000, subtype="PCM_16")
    with pytest.raises(ClipError, match=r"a\.wav: 1 channel\(s\), 16-bit, 16000 Hz; expected 1 channel\(s\), 16-bit, 22050 Hz"):
        check_wav(tmp_path / "a.wav")
    assert check_wav(tmp_path / "a.wav", sample_rate=None).frames == 1600
    (tmp_path / "b.wav").write_bytes(b"not a wav at all")
    with pytest.raises(ClipError, match=r"b\.wav: not a RIFF/WAVE file"):
        check_wav(tmp_path / "b.wav")
    with pytest.raises(ClipError, match=r"c\.wav: missing"):
        check_wav(tmp_path / "c.wav")


# ------------------------------------------------------------------------------------------ feature cache

def _copy(corpus: Path, dest: Path) -> Path:
    shutil.copytree(corpus, dest, ignore=shutil.ignore_patterns("features"))
    return dest


def test_missing_wav_is_named_and_leaves_no_partial_cache(corpus, tmp_path):
    bad = _copy(corpus, tmp_path / "corpus")
    missing = bad / "wavs" / f"{read_metadata(bad)[7].id}.wav"
    missing.unlink()
    with pytest.raises(ClipError, match=f"{missing.name}: missing"):
        FeatureStore.build(bad, FrontEndConfig(max_frames=100), tmp_path / "cache", **QUIET)
    assert _entries(tmp_path / "cache") == []


def test_unreadable_wav_is_named_and_leaves_no_partial_cache(corpus, tmp_path):
    bad = _copy(corpus, tmp_path / "corpus")
    broken = bad / "wavs" / f"{read_metadata(bad)[9].id}.wav"
    broken.write_bytes(b"RIFF garbage")
    with pytest.raises(ClipError, match=f"{broken.name}: cannot compute its features"):
        FeatureStore.build(bad, FrontEndConfig(max_frames=100), tmp_path / "cache", **QUIET)
    assert _entries(tmp_path / "cache") == []


def test_interrupted_feature_build_resumes(corpus, tmp_path, monkeypatch):
    config = FrontEndConfig(max_frames=100)
    reference = FeatureStore.build(corpus, config, tmp_path / "fresh", **QUIET)
    monkeypatch.setattr(asr_data, "PROGRESS_EVERY", 4)
    real_load = asr_data.load_wav
    calls = []

    def flaky(path):
        calls.append(Path(path).stem)
        if len(calls) == 10:
            raise KeyboardInterrupt  # the process is interrupted at clip 10 (8 clips saved)
        return real_load(path)

    monkeypatch.setattr(asr_data, "load_wav", flaky)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore.build(corpus, config, tmp_path / "cache", **QUIET)
    key = reference.folder.name
    assert _entries(tmp_path / "cache") == [f"{key}.partial"]  # not taken as a cache
    calls.clear()
    messages = []
    store = FeatureStore.build(corpus, config, tmp_path / "cache", progress=False, log=messages.append)
    assert calls == [c.id for c in read_metadata(corpus)[8:]] and "at clip 8 of 12" in messages[0]
    assert _entries(tmp_path / "cache") == [key] and len(store) == CLIPS
    for i in range(CLIPS):
        torch.testing.assert_close(store[i], reference[i], rtol=0, atol=0)


def test_cache_key_follows_the_front_end_code_and_config(corpus, monkeypatch):
    base = FeatureStore.folder_for(corpus, FrontEndConfig())
    assert FeatureStore.folder_for(corpus, FrontEndConfig(max_frames=10)) != base
    code = "def f(x):\n    '''doc'''\n    return x + 1  # comment\n"
    same = "def f(x):\n    # another comment\n    return x + 1\n"
    assert asr_data._code_fingerprint(code) == asr_data._code_fingerprint(same)
    assert asr_data._code_fingerprint(code) != asr_data._code_fingerprint(code.replace("x + 1", "x + 2"))
    monkeypatch.setattr(asr_data, "front_end_code_version", lambda: "another-version")
    assert FeatureStore.folder_for(corpus, FrontEndConfig()) != base
