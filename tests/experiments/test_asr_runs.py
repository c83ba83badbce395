"""ASR runs and command line: run folders are not overwritten, --resume compares every setting, two gloo
processes prepare the data once, --help works with only torch, expected failures are one line and status 2."""
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from experiments.asr.__main__ import _config, build_parser, main
from experiments.asr.models import ModelConfig
from experiments.asr.synthetic import make_corpus
from experiments.asr.train import RESUME_MAY_DIFFER, RunFolderError, TrainConfig, _remove_outputs, check_run_dir, resume_differences, train

from .http_server import FileServer

REPO = Path(__file__).resolve().parents[2]
TINY = ["--max-frames", "40", "--max-chars", "6", "--width", "16", "--heads", "2", "--mlp", "32", "--encoder-layers", "1",
        "--batch-size", "8", "--eval-batch-size", "8", "--num-workers", "0", "--no-progress", "--limit-eval", "4",
        "--limit-train", "8", "--warmup-epochs", "1", "--decay-epochs", "2", "--examples", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("runs") / "synth", clips=40, min_words=1, max_words=1, seed=2)


def _args(corpus, run, cache, *extra):
    return ["train", "--corpus-dir", str(corpus), "--run-dir", str(run), "--cache-dir", str(cache), "--epochs", "1", *TINY, *extra]


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A real 1-epoch run (a few seconds on CPU): its folder and its cache."""
    base = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    assert main(_args(corpus, base / "run", base / "cache")) == 0
    return base / "run", base / "cache"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m experiments.asr: error: "), err
    return err


def test_non_empty_run_folder_is_not_overwritten(corpus, finished_run, capsys):
    run, cache = finished_run
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(_args(corpus, run, cache)) == 2
    err = _error_line(capsys)
    assert f"--run-dir {run} is not empty" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing touched
    assert main(_args(corpus, run, cache, "--resume", "--overwrite")) == 2
    assert "exclude each other" in _error_line(capsys)


def test_resume_with_changed_settings_is_refused_with_their_names(corpus, finished_run, capsys):
    run, cache = finished_run
    assert main(_args(corpus, run, cache, "--resume", "--weight-decay", "0")) == 2
    err = _error_line(capsys)
    assert "weight_decay (--weight-decay): 0.01 in the checkpoint, 0.0 now" in err
    assert main(_args(corpus, run, cache, "--resume", "--label-smoothing", "0", "--mel-rate", "none", "--no-amp",
                      "--width", "24", "--warmup-epochs", "2")) == 2
    err = _error_line(capsys)
    for name in ("label_smoothing (--label-smoothing)", "filterbank_rate (--mel-rate): 16000 in the checkpoint, None now",
                 "amp (--no-amp)", "model.width (--width): 16 in the checkpoint, 24 now", "warmup_epochs (--warmup-epochs)"):
        assert name in err, name
    assert "weight_decay" not in err  # only what differs is named
    other = make_corpus(run.parent / "other", clips=40, min_words=1, max_words=1, seed=9)
    assert main(_args(other, run, cache, "--resume")) == 2
    assert "corpus_dir (--corpus-dir)" in _error_line(capsys)


def test_resume_allows_what_does_not_change_results(corpus, finished_run, tmp_path):
    run, cache = finished_run
    args = build_parser().parse_args(_args(corpus, run, tmp_path / "elsewhere", "--resume", "--epochs", "3",
                                           "--num-workers", "1", "--examples", "5"))
    cfg = _config(args)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    cfg.device = ckpt["config"]["device"]
    cfg.model.max_frames, cfg.model.max_len, cfg.masked = ckpt["config"]["model"]["max_frames"], ckpt["config"]["model"]["max_len"], ckpt["config"]["masked"]
    assert resume_differences(ckpt["config"], cfg) == []
    assert check_run_dir(cfg)["epoch"] == 0
    assert {"epochs", "progress", "run_dir", "resume"} <= RESUME_MAY_DIFFER


def test_every_field_is_compared_generically(tmp_path):
    """A field nobody listed (as another change may add) is compared too; an older checkpoint without it
    counts with the default."""
    cfg = TrainConfig(run_dir=str(tmp_path), model=ModelConfig(width=16))
    saved = cfg.as_dict()
    for key in (k for k in saved if k not in RESUME_MAY_DIFFER and k != "model"):
        changed = TrainConfig.from_dict(saved)
        value = getattr(changed, key)
        setattr(changed, key, (not value) if isinstance(value, bool) else ("x" if not isinstance(value, (int, float)) or value is None else value + 1))
        assert resume_differences(saved, changed) == [key], key
    changed = TrainConfig.from_dict(saved)
    changed.model.heads += 1
    assert resume_differences(saved, changed) == ["model.heads"]
    older = {k: v for k, v in saved.items() if k != "lr_floor"}  # written before lr_floor existed
    assert resume_differences(older, TrainConfig.from_dict(saved)) == []


def test_overwrite_removes_only_the_runs_outputs(tmp_path):
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    for name in ("checkpoint.pt", "results.json", "config.json", "plots/loss.png", "notes.txt"):
        (run / name).write_text("x")
    with pytest.raises(RunFolderError, match="not empty"):
        check_run_dir(TrainConfig(run_dir=str(run)))
    assert check_run_dir(TrainConfig(run_dir=str(run), overwrite=True)) is None
    _remove_outputs(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunFolderError, match="cannot read .*checkpoint.pt.*--overwrite"):
        check_run_dir(TrainConfig(run_dir=str(run), resume=True))


# ------------------------------------------------------------------------------------ DDP data preparation

CHILD = r"""
import datetime, json, os, sys, time
import torch.distributed as dist
from experiments.asr import data as asr_data
from experiments.asr import train as asr_train

root, url, sha, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(os.environ["RANK"])
built = []
real_build = asr_data._build_features
asr_data._build_features = lambda *a, **k: (built.append(1), real_build(*a, **k))[1]
open(os.path.join(root, f"ready-{rank}"), "w").close()
deadline = time.time() + 120
while not os.path.exists(os.path.join(root, "go")) and time.time() < deadline:
    time.sleep(0.01)
# a short process-group timeout: a rank left waiting in a collective while the other downloads would fail
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=4))
cfg = asr_train.TrainConfig(data_dir=os.path.join(root, "data"), url=url, sha256=sha, cache_dir=os.path.join(root, "cache"),
                            max_frames=40, progress=False)
env = asr_train.Dist(dist.get_rank(), dist.get_world_size(), 0)
t0 = time.time()
sets, _, clips = asr_train._data(cfg, env)
dist.barrier()
print(json.dumps({"rank": rank, "built": len(built), "clips": len(clips), "train": len(sets["train"]), "seconds": time.time() - t0}))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_prepare_the_data_once(corpus, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(corpus / "metadata.csv", arcname="LJSpeech-1.1/metadata.csv")
        tar.add(corpus / "wavs", arcname="LJSpeech-1.1/wavs")
    payload = buf.getvalue()
    with FileServer({"/LJSpeech-1.1.tar.gz": payload}) as server:
        server.stall = [6.0]  # the download alone outlasts the 4 s process-group timeout
        port = _free_port()
        procs = []
        for rank in range(2):
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
                   "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, str(tmp_path), server.url("/LJSpeech-1.1.tar.gz"), hashlib.sha256(payload).hexdigest()],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            deadline = time.time() + 120
            while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
                assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
                time.sleep(0.02)
            (tmp_path / "go").touch()
            outs = [p.communicate(timeout=180) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
        results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
        assert server.gets() == 1  # one download
        assert sum(r["built"] for r in results) == 1  # one feature build
        assert all(r["clips"] == 40 for r in results) and max(r["seconds"] for r in results) > 4


# ------------------------------------------------------------------------------------------ command line

HELP_CHILD = r"""
import sys
for name in ("textdistance", "soundfile", "medmnist", "tqdm", "matplotlib", "librosa"):
    sys.modules[name] = None  # `import name` now fails, as when the package is not installed
from experiments.asr.__main__ import build_parser
parser = build_parser()
subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
for argv in [["--help"]] + [[name, "--help"] for name in subcommands]:
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, argv
    else:
        raise AssertionError(argv)
print("ok", sorted(subcommands))
from experiments.octmnist.cli import build_parser as octmnist_parser
try:
    octmnist_parser().parse_args(["--help"])
except SystemExit as e:
    assert e.code == 0
print("ok octmnist")
"""


def test_help_of_every_subcommand_works_without_the_optional_packages():
    out = subprocess.run([sys.executable, "-c", HELP_CHILD], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok [" in out.stdout and "'download'" in out.stdout and "'synth'" in out.stdout and "ok octmnist" in out.stdout


def test_expected_failures_are_one_line_and_status_2(tmp_path, capsys):
    assert main(["download", "--data-dir", str(tmp_path / "d"), "--url", f"http://127.0.0.1:{_free_port()}/LJSpeech-1.1.tar.bz2",
                 "--retries", "0", "--checksum", "none", "--no-progress"]) == 2
    assert "gave up after 0 retries" in _error_line(capsys)
    src = tmp_path / "LJSpeech-1.1.tar.bz2"
    src.write_bytes(b"not the archive")
    assert main(["download", "--data-dir", str(tmp_path / "e"), "--url", str(src), "--no-progress"]) == 2
    assert "expected 2,748,572,632" in _error_line(capsys)
    assert main(["download", "--data-dir", str(tmp_path / "f"), "--url", str(src), "--checksum", "0" * 64, "--no-progress"]) == 2
    assert "does not match the expected" in _error_line(capsys)
    assert main(["train", "--corpus-dir", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "run"), *TINY]) == 2
    assert "metadata.csv not found" in _error_line(capsys)
    assert main(["features", "--corpus-dir", str(tmp_path / "nothing")]) == 2
    assert "metadata.csv not found" in _error_line(capsys)
