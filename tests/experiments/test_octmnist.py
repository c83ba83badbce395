"""Tests of the OCTMNIST CNN experiment (CPU, no network, synthetic data in medmnist's format)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments.octmnist import CNN, count_trainable_parameters, course_test_subset, load_split, npz_filename
from experiments.octmnist.cli import EXIT_STOPPED, main
from experiments.octmnist.data import to_inputs
from experiments.octmnist.dist import local_slice
from experiments.octmnist.synthetic import write_synthetic_npz
from experiments.octmnist.train import epoch_order

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--no-progress", "--no-plots", "--download", "no", "--checksum", "none"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("medmnist")
    write_synthetic_npz(str(root), n_train=800, n_val=200, n_test=200, seed=0)
    return str(root)


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _deterministic(runs):
    """Run results without the wall-clock timings."""
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "train_seconds")} for r in runs]


def _model_state(out, name):
    return torch.load(os.path.join(out, "checkpoints", f"{name}.ckpt"), weights_only=False)["model"]


# ---------------------------------------------------------------- data

def test_npz_in_medmnist_format_loads_through_medmnist_class(synth_root, tmp_path):
    from medmnist import OCTMNIST

    assert os.listdir(synth_root) == ["octmnist.npz"] == [npz_filename(28)]
    raw = np.load(os.path.join(synth_root, "octmnist.npz"))
    assert sorted(raw.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
    for split, n in (("train", 800), ("val", 200), ("test", 200)):
        assert raw[f"{split}_images"].dtype == np.uint8 and raw[f"{split}_images"].shape == (n, 28, 28)
        assert raw[f"{split}_labels"].dtype == np.uint8 and raw[f"{split}_labels"].shape == (n, 1)
        ds = OCTMNIST(split=split, root=synth_root, download=False)  # medmnist finds the file by its name
        np.testing.assert_array_equal(ds.imgs, raw[f"{split}_images"])

    val = load_split("val", synth_root, download="no", md5=None)
    assert val.images.dtype == torch.uint8 and tuple(val.images.shape) == (200, 28, 28)
    assert val.labels.dtype == torch.int64 and tuple(val.labels.shape) == (200,)
    np.testing.assert_array_equal(val.labels.numpy(), raw["val_labels"][:, 0])
    x = to_inputs(val.images)
    assert x.dtype == torch.float32 and tuple(x.shape) == (200, 1, 28, 28)
    np.testing.assert_array_equal(x[:, 0].numpy(), raw["val_images"].astype(np.float64) / 256)
    assert float(x.max()) == 255 / 256  # divided by 256, not 255
    assert len(load_split("train", synth_root, download="no", limit=37, md5=None)) == 37

    with pytest.raises(FileNotFoundError, match=r"octmnist\.npz not found; pass --download auto .* --data-root"):
        load_split("train", str(tmp_path / "empty"), download="no", md5=None)


def test_course_subset_known_answer():
    labels = np.array([3, 0, 1, 0, 2, 3, 0, 1, 1, 3, 2, 0])
    # first 2 of class 0, 1 of class 1, 1 of class 2, 3 of class 3, class-ordered
    assert course_test_subset(labels, (2, 1, 1, 3)).tolist() == [1, 3, 2, 4, 0, 5, 9]
    assert course_test_subset(labels.reshape(-1, 1), (9, 0, 0, 1)).tolist() == [1, 3, 6, 11, 0]

    rng = np.random.default_rng(1)
    test_labels = rng.permutation(np.repeat(np.arange(4), 250))  # like OCTMNIST's test set: 250 per class
    sub = course_test_subset(test_labels)
    assert len(sub) == 529
    assert np.bincount(test_labels[sub]).tolist() == [182, 55, 42, 250]
    assert np.all(np.diff(test_labels[sub]) >= 0)  # class-ordered
    for c, n in enumerate((182, 55, 42, 250)):  # the first n of class c, in dataset order
        assert sub[test_labels[sub] == c].tolist() == [i for i, l in enumerate(test_labels) if l == c][:n]


def test_epoch_order_matches_course_dataloader():
    n = 37
    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(42)
    for _ in range(3):
        expected = torch.cat([b for b in loader]).tolist()
        assert epoch_order(n, g).tolist() == expected


def test_local_slice_partitions_like_tensor_split():
    for bl in range(0, 10):
        for w in (1, 2, 3, 4):
            parts = torch.tensor_split(torch.arange(bl), w)
            assert [local_slice(bl, w, r) for r in range(w)] == [
                (int(p[0]), int(p[-1]) + 1) if len(p) else (local_slice(bl, w, r)[0],) * 2 for r, p in enumerate(parts)]
            assert sum(hi - lo for lo, hi in (local_slice(bl, w, r) for r in range(w))) == bl


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("no_maxpool", [False, True])
def test_parameter_count_and_layers(no_maxpool):
    m = CNN(dropout_prob=0.7, no_maxpool=no_maxpool)
    assert count_trainable_parameters(m) == 224_892  # SPEC §3
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"conv1.weight": (8, 1, 3, 3), "conv1.bias": (8,), "conv2.weight": (16, 8, 3, 3),
                      "conv2.bias": (16,), "fc1.weight": (320, 576), "fc1.bias": (320,),
                      "fc2.weight": (120, 320), "fc2.bias": (120,), "fc3.weight": (4, 120), "fc3.bias": (4,)}
    s = 2 if no_maxpool else 1
    assert (m.conv1.stride, m.conv1.padding, m.conv2.stride, m.conv2.padding) == ((s, s), (1, 1), (s, s), (0, 0))
    assert m.drop.p == 0.7


@pytest.mark.parametrize("no_maxpool,expected", [
    (False, [("conv1", (8, 28, 28)), ("pool", (8, 14, 14)), ("conv2", (16, 12, 12)), ("pool", (16, 6, 6)),
             ("fc1", (320,)), ("fc2", (120,)), ("fc3", (4,))]),
    (True, [("conv1", (8, 14, 14)), ("conv2", (16, 6, 6)), ("fc1", (320,)), ("fc2", (120,)), ("fc3", (4,))]),
])
def test_output_size_after_each_layer(no_maxpool, expected):
    m = CNN(no_maxpool=no_maxpool).eval()
    seen = []
    for name in ("conv1", "pool", "conv2", "fc1", "fc2", "fc3"):
        getattr(m, name).register_forward_hook(
            lambda mod, inp, out, name=name: seen.append((name, tuple(out.shape[1:]))))
    x = torch.rand(3, 784)  # flat input, as the course fed it
    out = m(x)
    assert seen == expected
    assert tuple(out.shape) == (3, 4)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))  # log-softmax


# ---------------------------------------------------------------- training runs

def test_learns_easy_synthetic_task_and_writes_run_folder(synth_root, tmp_path):
    out = str(tmp_path / "run")
    rc = main(["--data-root", synth_root, "--out", out, "--epochs", "2", "--lrs", "0.05",
               "--no-progress", "--download", "no", "--checksum", "none"])
    assert rc == 0
    res = _results(out)
    assert [r["name"] for r in res["runs"]] == ["maxpool_lr0.05", "no_maxpool_lr0.05"]
    assert res["trainable_parameters"] == {"maxpool": 224_892, "no_maxpool": 224_892}
    for r in res["runs"]:
        h = r["history"]
        assert [e["epoch"] for e in h] == [1, 2]
        # the bright-patch class is learnt: >= 95% on validation and on the test set
        assert h[-1]["val_acc"] >= 0.95 and r["test_acc"] >= 0.95, r
        assert h[1]["train_loss"] < h[0]["train_loss"] < 1.45
        # the course's cumulative mean is the batch-weighted mean of the epoch means
        assert h[1]["train_loss_cumulative"] == pytest.approx((h[0]["train_loss"] + h[1]["train_loss"]) / 2)
        assert r["course_subset_size"] == sum(r["course_subset_counts"]) <= 529
        assert r["trainable_parameters"] == 224_892
    # an untrained network is at chance on the same data, so the threshold is not met by construction
    val = load_split("val", synth_root, download="no", md5=None)
    torch.manual_seed(42)
    with torch.no_grad():
        acc0 = (CNN().eval()(to_inputs(val.images)).argmax(1) == val.labels).float().mean().item()
    assert acc0 < 0.5

    table = open(os.path.join(out, "results.md")).read()
    assert table.count("| 0.05 |") == 2 and table.count("224,892") == 2
    first = res["runs"][0]
    assert f"| {first['final']['train_loss_cumulative']:.4f} | {first['final']['train_loss']:.4f} | " \
           f"{first['final']['val_acc']:.4f} | {first['test_acc_course529']:.4f} | {first['test_acc']:.4f} |" in table
    plots = sorted(os.listdir(os.path.join(out, "plots")))
    for name in ("maxpool_lr0.05_train_loss.png", "no_maxpool_lr0.05_val_acc.png",
                 "best_all_train_loss.png", "best_all_val_acc.png", "maxpool_all_lrs_val_acc.png"):
        assert name in plots
        with open(os.path.join(out, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_after_stop_equals_uninterrupted_run(synth_root, tmp_path):
    args = ["--data-root", synth_root, "--epochs", "3", "--lrs", "0.05", "--limit-train", "163",
            "--limit-val", "64", "--limit-test", "64"] + COMMON
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert main(args + ["--out", full]) == 0

    assert main(args + ["--out", cut, "--stop-after-epoch", "2"]) == EXIT_STOPPED  # "killed" in config 1
    ck = torch.load(os.path.join(cut, "checkpoints", "maxpool_lr0.05.ckpt"), weights_only=False)
    assert ck["epoch"] == 2 and ck["result"] is None
    assert not os.path.exists(os.path.join(cut, "results.json"))
    assert main(args + ["--out", cut]) == 2  # refuses to overwrite checkpoints without --resume
    torch.manual_seed(1234)  # the resumed process must not depend on the RNG state it starts with
    np.random.seed(1234)
    # finishes config 1 from epoch 3, then is "killed" again after epoch 1 of config 2
    assert main(args + ["--out", cut, "--resume", "--stop-after-epoch", "1"]) == EXIT_STOPPED
    torch.rand(100)
    assert main(args + ["--out", cut, "--resume"]) == 0

    a, b = _results(full)["runs"], _results(cut)["runs"]
    assert _deterministic(a) == _deterministic(b)  # bit-identical floats
    for name in ("maxpool_lr0.05", "no_maxpool_lr0.05"):
        sa, sb = _model_state(full, name), _model_state(cut, name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and the runs did train (the comparison is not between two untouched models)
    assert a[0]["history"][0]["train_loss"] != a[0]["history"][2]["train_loss"]


def _torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "experiments.octmnist"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_torchrun_ddp_matches_single_process(synth_root, tmp_path):
    # 203 images: 25 full global batches of 8 split 4/4 over the two ranks and a last one of 3 split 2/1
    args = ["--data-root", synth_root, "--epochs", "2", "--lrs", "0.05", "--variants", "maxpool",
            "--limit-train", "203", "--limit-val", "100", "--limit-test", "100", "--threads", "1"] + COMMON
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    assert main(args + ["--out", single]) == 0
    log = _torchrun(args + ["--out", ddp, "--dist-mode", "ddp"])
    assert "2 process(es), ddp" in log
    rs, rd = _results(single), _results(ddp)
    assert rd["environment"]["world_size"] == 2 and rd["environment"]["dist_mode"] == "ddp"
    a, b = rs["runs"][0], rd["runs"][0]
    # same global batches, masks and init: equal up to float summation order
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5)
        assert hb["train_loss_cumulative"] == pytest.approx(ha["train_loss_cumulative"], rel=1e-5)
        assert hb["val_acc"] == ha["val_acc"]
    assert (b["test_acc"], b["test_acc_course529"]) == (a["test_acc"], a["test_acc_course529"])
    sa, sb = _model_state(single, "maxpool_lr0.05"), _model_state(ddp, "maxpool_lr0.05")
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=2e-4)
    # the runs moved the weights far more than that tolerance
    torch.manual_seed(42)
    init = CNN().state_dict()
    assert max((sa[k] - init[k]).abs().max().item() for k in sa) > 1e-2


def test_torchrun_sweep_mode_is_bit_identical(synth_root, tmp_path):
    args = ["--data-root", synth_root, "--epochs", "2", "--lrs", "0.05", "0.01", "--variants", "no_maxpool",
            "--limit-train", "120", "--limit-val", "100", "--limit-test", "100", "--threads", "1"] + COMMON
    single, sweep = str(tmp_path / "single"), str(tmp_path / "sweep")
    assert main(args + ["--out", single]) == 0
    _torchrun(args + ["--out", sweep, "--dist-mode", "sweep"])
    a, b = _results(single)["runs"], _results(sweep)["runs"]
    assert [r["name"] for r in b] == ["no_maxpool_lr0.05", "no_maxpool_lr0.01"]
    assert _deterministic(a) == _deterministic(b)
    with open(os.path.join(single, "results.md")) as fa, open(os.path.join(sweep, "results.md")) as fb:
        assert fa.read() == fb.read()  # identical results tables
