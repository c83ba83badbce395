"""octmnist.npz: MD5-checked (existing files too), fetched with the shared downloader, once for several processes."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.common.download import ChecksumError
from experiments.common.errors import ExperimentError
from experiments.octmnist.cli import main
from experiments.octmnist.data import OCTMNIST_MD5, OCTMNIST_URL, ensure_npz, load_octmnist, load_split
from experiments.octmnist.synthetic import write_synthetic_npz

from .http_server import FileServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """``(bytes, md5)`` of a small synthetic octmnist.npz."""
    root = tmp_path_factory.mktemp("npz")
    write_synthetic_npz(str(root), n_train=64, n_val=16, n_test=16, seed=0)
    payload = (root / "octmnist.npz").read_bytes()
    return payload, hashlib.md5(payload).hexdigest()


@pytest.fixture
def server(npz):
    with FileServer({"/octmnist.npz": npz[0]}) as s:
        yield s


def test_urls_and_md5_are_medmnists():
    from medmnist.info import INFO

    assert (OCTMNIST_URL, OCTMNIST_MD5) == (INFO["octmnist"]["url"], INFO["octmnist"]["MD5"])


def test_corrupt_npz_is_detected_by_its_md5_and_replaced(server, npz, tmp_path):
    path = tmp_path / "octmnist.npz"
    path.write_bytes(npz[0][:-50])  # a cut-short copy
    with pytest.raises(ChecksumError, match=r"octmnist\.npz: md5 .* does not match the expected .*--checksum none"):
        ensure_npz(str(tmp_path), "no", md5=npz[1], **QUIET)
    assert server.gets() == 0
    ensure_npz(str(tmp_path), "auto", url=server.url("/octmnist.npz"), md5=npz[1], **QUIET)
    assert server.gets() == 1 and path.read_bytes() == npz[0]
    assert len(load_split("val", str(tmp_path), "no", md5=npz[1])) == 16
    ensure_npz(str(tmp_path), "auto", url=server.url("/octmnist.npz"), md5=npz[1], **QUIET)  # good file: reused
    ensure_npz(str(tmp_path), "yes", url=server.url("/octmnist.npz"), md5=npz[1], **QUIET)   # yes: fetched again
    assert server.gets() == 2


def test_default_md5_refuses_a_file_that_is_not_the_official_one(npz, tmp_path):
    (tmp_path / "octmnist.npz").write_bytes(npz[0])
    with pytest.raises(ChecksumError, match=f"expected {OCTMNIST_MD5}"):
        load_split("train", str(tmp_path), "no")


def test_unreadable_npz_without_checksum_is_named(tmp_path):
    (tmp_path / "octmnist.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ExperimentError, match=r"octmnist\.npz cannot be read as OCTMNIST's npz"):
        load_octmnist(str(tmp_path), "no", md5=None, progress=False)


def test_cut_download_resumes(server, npz, tmp_path):
    server.cut_after = [len(npz[0]) // 2]
    d = load_octmnist(str(tmp_path), "auto", url=server.url("/octmnist.npz"), md5=npz[1], progress=False)
    assert [s for _, _, s in server.requests] == [200, 206] and len(d["train"]) == 64


def test_cli_errors_are_one_line_with_status_2(npz, tmp_path, capsys):
    rc = main(["--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--download", "no",
               "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "octmnist.npz not found; pass --download auto" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "octmnist.npz").write_bytes(npz[0][:100])
    rc = main(["--data-root", str(tmp_path / "bad"), "--out", str(tmp_path / "run"), "--download", "no", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("python -m experiments.octmnist: error: ") and "md5" in err and err.count("\n") == 1


CHILD = """
import json, os, sys, time
from experiments.octmnist.data import ensure_npz
root, url, md5, tag = sys.argv[1:5]
open(os.path.join(root, "ready-" + tag), "w").close()
deadline = time.time() + 120
while not os.path.exists(os.path.join(root, "go")) and time.time() < deadline:  # start both at the same moment
    time.sleep(0.01)
messages = []
ensure_npz(root, "auto", url=url, md5=md5, progress=False, log=messages.append)
print(json.dumps(messages))
"""


def _start_together(procs, folder, timeout=120):
    import time

    deadline = time.time() + timeout
    while not all((folder / f"ready-{i}").exists() for i in range(len(procs))):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "children did not start"
        time.sleep(0.02)
    (folder / "go").touch()


def test_two_processes_download_once(server, npz, tmp_path):
    server.stall = [2.0]  # the first download takes a while: the second process must wait for it, not fetch too
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), server.url("/octmnist.npz"), npz[1], str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    _start_together(procs, tmp_path)
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert server.gets() == 1 and (tmp_path / "octmnist.npz").read_bytes() == npz[0]
    assert sum(any("waiting for another process" in m for m in json.loads(o[0])) for o in outs) == 1
