"""experiments.common.download against a local HTTP server on 127.0.0.1: resume, retries, verification."""
import hashlib
import os

import pytest

from experiments.common.download import ChecksumError, DownloadError, download, file_digest, verify_file
from experiments.common.errors import EXIT_USAGE, ExperimentError, report_expected_failure

from .http_server import FileServer

PAYLOAD = os.urandom(300_000) + bytes(range(256)) * 100  # not a multiple of the server's 64 KiB chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
FAST = dict(progress=False, backoff=0.01, timeout=5, log=lambda m: None)


@pytest.fixture
def server():
    with FileServer({"/data.bin": PAYLOAD}) as s:
        yield s


def test_cut_connection_resumes_with_range_to_the_right_bytes(server, tmp_path):
    server.cut_after = [100_000, 50_001]  # two drops mid-file, then a clean transfer
    messages = []
    dest = download(server.url("/data.bin"), tmp_path / "data.bin", sha256=SHA, size=len(PAYLOAD),
                    **{**FAST, "log": messages.append})
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "data.bin.part").exists()
    assert [(r, s) for _, r, s in server.requests] == [(None, 200), ("bytes=100000-", 206), ("bytes=150001-", 206)]
    assert len(messages) == 2 and "resuming" in messages[0] and "100,000 bytes so far" in messages[0]


def test_a_part_left_by_a_killed_run_is_continued(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:123_457])
    download(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, **FAST)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert [r for _, r, _ in server.requests] == ["bytes=123457-"]


def test_a_stale_part_of_another_file_is_redone_from_zero_once(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(b"\0" * 1000)  # not a prefix of PAYLOAD: the checksum fails after resuming
    download(server.url("/data.bin"), tmp_path / "data.bin", sha256=SHA, **FAST)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert [r for _, r, _ in server.requests] == ["bytes=1000-", None]


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.ignore_range = True
    server.cut_after = [70_000]
    download(server.url("/data.bin"), tmp_path / "data.bin", sha256=SHA, **FAST)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert [s for _, _, s in server.requests] == [200, 200]


def test_wrong_checksum_is_refused_and_nothing_is_kept(server, tmp_path):
    with pytest.raises(ChecksumError, match=r"sha256 .* does not match the expected 0{64}.*deleted"):
        download(server.url("/data.bin"), tmp_path / "data.bin", sha256="0" * 64, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_wrong_size_is_refused(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"has {len(PAYLOAD):,} bytes, expected {len(PAYLOAD) + 1:,}"):
        download(server.url("/data.bin"), tmp_path / "data.bin", size=len(PAYLOAD) + 1, **FAST)
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_retries_give_up_with_a_clear_message_and_keep_the_part(server, tmp_path):
    server.cut_after = [10_000] + [0] * 10  # progress once, then nothing more arrives
    waits = []
    with pytest.raises(DownloadError, match=r"gave up after 3 retries .*10,000 bytes kept in .*data\.bin\.part: rerun to resume"):
        download(server.url("/data.bin"), tmp_path / "data.bin", retries=3, sleep=waits.append, **FAST)
    assert waits == [0.01, 0.02, 0.04]  # back-off doubles with each failure in a row (the first one made progress)
    assert (tmp_path / "data.bin.part").read_bytes() == PAYLOAD[:10_000]
    server.cut_after = []
    download(server.url("/data.bin"), tmp_path / "data.bin", sha256=SHA, **FAST)  # the rerun resumes
    assert server.requests[-1][1] == "bytes=10000-" and (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_stalled_server_times_out_and_is_retried(server, tmp_path):
    server.stall = [3.0]
    download(server.url("/data.bin"), tmp_path / "data.bin", sha256=SHA, **{**FAST, "timeout": 0.5})
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD and server.gets() == 2


def test_server_errors_retry_and_missing_files_do_not(server, tmp_path):
    server.status = [503, 500]
    download(server.url("/data.bin"), tmp_path / "a.bin", sha256=SHA, **FAST)
    assert [s for _, _, s in server.requests] == [503, 500, 200]
    with pytest.raises(DownloadError, match=r"/missing\.bin: HTTP 404"):
        download(server.url("/missing.bin"), tmp_path / "b.bin", **FAST)
    assert server.gets("/missing.bin") == 1


def test_existing_file_is_verified_reused_or_fetched_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    download(server.url("/data.bin"), dest, sha256=SHA, **FAST)
    assert server.gets() == 0
    dest.write_bytes(PAYLOAD[:-1])  # a corrupt copy: detected and replaced
    download(server.url("/data.bin"), dest, sha256=SHA, **FAST)
    assert server.gets() == 1 and dest.read_bytes() == PAYLOAD


def test_local_paths_and_file_urls(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:5000])
    assert download(str(src), tmp_path / "a.bin", sha256=SHA, **FAST).read_bytes() == PAYLOAD
    assert download(src.as_uri(), tmp_path / "b.bin", md5=MD5, **FAST).read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="no such file"):
        download(str(tmp_path / "nope.bin"), tmp_path / "c.bin", **FAST)


def test_verify_file_and_digest(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(PAYLOAD)
    assert file_digest(path) == SHA and file_digest(path, "md5") == MD5
    verify_file(path, sha256=SHA.upper(), md5=MD5, size=len(PAYLOAD))
    with pytest.raises(ChecksumError, match=r"x\.bin: md5 .* does not match the expected f{32}; do this"):
        verify_file(path, md5="F" * 32, hint="do this")


def test_expected_failures_print_one_line(capsys):
    assert report_expected_failure(ExperimentError("bad\n  thing"), "prog") == EXIT_USAGE
    assert capsys.readouterr().err == "prog: error: bad thing\n"
    err = ModuleNotFoundError("No module named 'textdistance'", name="textdistance")
    assert report_expected_failure(err, "prog") == EXIT_USAGE
    assert "pip install -r experiments/requirements-asr.txt" in capsys.readouterr().err
    assert report_expected_failure(ValueError("a bug"), "prog") is None
