"""The language-model experiment (experiments/lm): data split, model, training, decoding caches, resume, outputs, CLI.

All on CPU with tiny models (width 32, context 32, tens of steps): a few seconds each.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.lm.data import VOCAB_SIZE, default_text, load_corpus, train_batch, validation_windows
from experiments.lm.generate import generate
from experiments.lm.model import ATTENTION_KINDS, LanguageModel, ModelConfig, cache_numel, count_parameters, hybrid_available
from experiments.lm.report import combine, label
from experiments.lm.train import TrainConfig, lr_at, train

REPO = Path(__file__).resolve().parents[2]
needs_hybrid = pytest.mark.skipif(not hybrid_available(), reason="linattn_cuda.nn.HybridAttention is not in this checkout")
KINDS = [pytest.param(k, marks=needs_hybrid) if k == "hybrid" else k for k in ATTENTION_KINDS]
# (kind, HybridAttention options): every kind, and the hybrid with the rest of the Based recipe
BASED = {"window": 8, "conv_size": 4, "learn_scale": True}
CASES = [pytest.param("softmax", None, id="softmax"), pytest.param("taylor", None, id="taylor"),
         pytest.param("hybrid", None, id="hybrid", marks=needs_hybrid),
         pytest.param("hybrid", BASED, id="hybrid-conv4-learn_scale", marks=needs_hybrid)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two (and leaves the other core alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(kind: str, **kw) -> ModelConfig:
    base = dict(attention=kind, width=32, layers=2, heads=2, context=32, feature_dim=8, hybrid={"window": 8})
    base.update(kw)
    return ModelConfig(**base)


def _cfg(tmp_path, kind="softmax", name="run", **kw) -> TrainConfig:
    base = dict(run_dir=str(tmp_path / name), model=_tiny(kind), steps=12, batch_size=4, lr=3e-3, warmup=2,
                eval_every=6, eval_limit=8, checkpoint_every=4, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------- data

def test_default_corpus_is_pydoc_topics_in_key_order_and_split_at_90_percent():
    from pydoc_data.topics import topics

    text = default_text()
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(topics[k]) for k in keys) + 2 * (len(keys) - 1)
    corpus = load_corpus()
    data = text.encode("utf-8")
    n_val = round(len(data) * 0.1)
    assert corpus.validation.numel() == n_val and corpus.train.numel() == len(data) - n_val
    assert bytes(corpus.train.tolist()) + bytes(corpus.validation.tolist()) == data
    assert corpus.describe()["sha256"] == load_corpus().sha256  # deterministic


def test_text_files_are_concatenated_in_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first file " * 20)
    b.write_text("second file é " * 20)
    corpus = load_corpus([str(a), str(b)], val_fraction=0.25)
    whole = bytes(corpus.train.tolist()) + bytes(corpus.validation.tolist())
    assert whole == a.read_bytes() + b"\n\n" + b.read_bytes()
    assert corpus.validation.numel() == round(len(whole) * 0.25)


def test_training_windows_depend_only_on_seed_and_step():
    corpus = load_corpus()
    w = train_batch(corpus.train, step=5, seed=1, batch_size=6, context=16)
    assert w.shape == (6, 17) and w.dtype == torch.int64 and int(w.max()) < VOCAB_SIZE
    assert torch.equal(w, train_batch(corpus.train, step=5, seed=1, batch_size=6, context=16))
    assert not torch.equal(w, train_batch(corpus.train, step=6, seed=1, batch_size=6, context=16))
    assert not torch.equal(w, train_batch(corpus.train, step=5, seed=2, batch_size=6, context=16))
    text = bytes(corpus.train.tolist())
    for row in w.tolist():  # contiguous windows of the training part
        assert bytes(row) in text


def test_validation_windows_tile_the_validation_part():
    corpus = load_corpus()
    v = validation_windows(corpus.validation, 256)
    assert v.shape == (corpus.validation.numel() // 257, 257)
    assert torch.equal(v.reshape(-1), corpus.validation[: v.numel()].long())
    assert validation_windows(corpus.validation, 256, limit=3).shape == (3, 257)
    with pytest.raises(ValueError, match="fewer than context"):
        validation_windows(corpus.validation[:10], 16)


# ------------------------------------------------------------------------------------------------ model

def _variant(kind, options=None, **kw) -> ModelConfig:
    return _tiny(kind, **({"hybrid": options} if options else {}), **kw)


@pytest.mark.parametrize("kind,options", CASES)
@pytest.mark.parametrize("pos", ["learned", "none"])
def test_model_shapes(kind, options, pos):
    torch.manual_seed(0)
    model = LanguageModel(_variant(kind, options, pos=pos))
    tokens = torch.randint(0, VOCAB_SIZE, (3, 32))
    logits = model(tokens)
    assert logits.shape == (3, 32, VOCAB_SIZE) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_parameter_counts_at_the_experiment_shape():
    """Softmax with q/k of the Taylor feature dim has exactly the Taylor model's parameters; the default
    softmax (q/k = head dim 32) has 2 * 128 * 64 + 64 more per layer."""
    counts = {name: count_parameters(LanguageModel(ModelConfig(**kw)))["total"] for name, kw in {
        "softmax": dict(attention="softmax"), "softmax16": dict(attention="softmax", qk_dim=16),
        "taylor": dict(attention="taylor", feature_dim=16)}.items()}
    assert counts["softmax16"] == counts["taylor"]
    assert counts["softmax"] - counts["taylor"] == 2 * (2 * 128 * 64 + 64)


@pytest.mark.parametrize("kind,options", CASES)
def test_causal_prefix_invariance(kind, options):
    """Logits at position t do not depend on later tokens."""
    model = _perturbed(kind, options)
    a = torch.randint(0, VOCAB_SIZE, (2, 20), generator=torch.Generator().manual_seed(2))
    b = a.clone()
    b[:, 12:] = torch.randint(0, VOCAB_SIZE, (2, 8))
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12], rtol=1e-5, atol=1e-5)
    assert (la[:, 12:] - lb[:, 12:]).abs().max() > 1e-2  # the later positions do see the change


def _perturbed(kind: str, options=None, **kw) -> LanguageModel:
    """A tiny model with larger-than-init weights, so attention rows are far from uniform."""
    torch.manual_seed(3)
    model = LanguageModel(_variant(kind, options, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kind,options", CASES)
def test_cached_decoding_equals_full_rerun(kind, options):
    """Step-by-step logits through the kind's cache == the full forward at every position (fp32), greedy and
    sampled generation give the same bytes either way, and only the softmax cache grows with the context."""
    model = _perturbed(kind, options)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(batch_size=2)
        steps, sizes = [], []
        for t in range(tokens.shape[1]):
            logits, cache = model.step(tokens[:, t], cache)
            steps.append(logits)
            sizes.append(cache_numel(cache))
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)
    if kind == "softmax":
        assert sizes[-1] > sizes[0] and sizes[-1] == sizes[0] * tokens.shape[1]
    else:
        assert len(set(sizes)) == 1, sizes
    prompt = tokens[0, :5].tolist()
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=7)):
        cached, info = generate(model, prompt, 20, use_cache=True, return_logits=True, **kw)
        rerun, ref = generate(model, prompt, 20, use_cache=False, return_logits=True, **kw)
        assert cached == rerun and len(cached) == 25
        torch.testing.assert_close(info["logits"], ref["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,options", CASES[1:])
def test_fixed_size_cache_runs_past_the_training_context(kind, options):
    """With pos='none' the Taylor/hybrid cache stays the same size for 3x the training context."""
    model = _perturbed(kind, options, pos="none", context=16)
    tokens, info = generate(model, [65, 66], 46)
    assert len(tokens) == 48 and len(set(info["cache_numel"])) == 1


# --------------------------------------------------------------------------------------------- training

def test_lr_schedule_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_learns(tmp_path, kind):
    """80 steps on real text: validation falls from ~8 bits (uniform over 256 bytes) well below 5."""
    cfg = _cfg(tmp_path, kind, steps=80, batch_size=8, lr=1e-2, warmup=5, eval_every=40, checkpoint_every=80)
    r = train(cfg)
    first, last = sum(r["train_loss"][:5]) / 5, sum(r["train_loss"][-5:]) / 5
    assert last < first - 1.5, (first, last)
    assert r["val_bits_per_char"] < 5.0 and r["val_bits_per_char"] == r["validation"][-1]["bits_per_char"]


def test_resume_equals_uninterrupted(tmp_path):
    full = train(_cfg(tmp_path, name="full"))
    assert train(_cfg(tmp_path, name="split", stop_after=8)) is None
    ckpt = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 8 and not (tmp_path / "split" / "results.json").exists()
    resumed = train(_cfg(tmp_path, name="split", resume=True))
    assert resumed["train_loss"] == full["train_loss"] and resumed["validation"] == full["validation"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr differs"):
        train(_cfg(tmp_path, name="split", resume=True, lr=1e-3))


def test_results_json_schema(tmp_path):
    r = train(_cfg(tmp_path))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved.keys() >= {"config", "corpus", "parameters", "val_loss", "val_bits_per_char", "train_loss", "lr",
                            "validation", "train_seconds", "ms_per_step", "machine"}
    assert len(saved["train_loss"]) == 12 and len(saved["lr"]) == 12
    assert [v["step"] for v in saved["validation"]] == [6, 12]
    assert saved["val_bits_per_char"] == pytest.approx(saved["val_loss"] / math.log(2))
    assert saved["corpus"]["source"] == "pydoc_data.topics" and saved["corpus"]["validation_windows"] == 8
    assert saved["corpus"]["validation_predictions"] == 8 * 32
    assert saved["parameters"]["total"] == count_parameters(LanguageModel(_tiny("softmax")))["total"]
    assert TrainConfig.from_dict(saved["config"]).model == _tiny("softmax")
    assert "| run | softmax width=32 heads=2 context=32 lr=0.003 | 0 |" in (tmp_path / "run" / "results.md").read_text()
    assert r["val_bits_per_char"] == saved["val_bits_per_char"]


def test_report_groups_seeds_and_plots(tmp_path):
    runs = []
    for kind in ("softmax", "taylor"):
        for seed in (0, 1):
            name = f"{kind}-s{seed}"
            train(_cfg(tmp_path, kind, name=name, seed=seed, steps=6, eval_every=3))
            runs.append(tmp_path / name)
    text = combine(runs, tmp_path / "out")
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "results.md").read_text() == text
    summary = text.split("## Per run")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| softmax") or line.startswith("| taylor")]
    assert len(rows) == 2 and all("| 2 |" in row and "±" in row for row in rows), rows
    values = [json.loads((d / "results.json").read_text())["val_bits_per_char"] for d in runs[:2]]
    mean = sum(values) / 2
    assert f"{mean:.4f} ± {abs(values[0] - values[1]) / math.sqrt(2):.4f}" in text
    assert label(json.loads((runs[2] / "results.json").read_text())) == "taylor fd=8 width=32 heads=2 context=32 lr=0.003"


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.lm", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_help(capsys):
    out = _cli("--help")  # the module entry point itself, in a fresh interpreter
    assert out.returncode == 0 and "{train,report,generate}" in out.stdout, out.stderr
    from experiments.lm.__main__ import main

    for cmd in ("train", "report", "generate"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--attention {softmax,taylor,hybrid}", "--window", "--conv-size", "--learn-scale", "--feature-dim",
                 "--text FILE", "--resume", "--threads", "--temperature", "--out"):
        assert flag in text, flag


def test_cli_train_report_generate(tmp_path):
    run = tmp_path / "cli"
    out = _cli("train", "--attention", "taylor", "--width", "32", "--heads", "2", "--context", "32", "--feature-dim", "8",
               "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--eval-limit", "4", "--threads", "1",
               "--no-progress", "--run-dir", str(run))
    assert out.returncode == 0, out.stderr
    assert "step 6/6" in out.stdout and (run / "results.json").exists()
    out = _cli("report", str(run), "--out", str(tmp_path / "rep"))
    assert out.returncode == 0 and "| taylor fd=8 width=32 heads=2 context=32 lr=0.001 | " in out.stdout and (tmp_path / "rep" / "curves.png").exists()
    out = _cli("generate", str(run), "--prompt", "def ", "--new", "10", "--check")
    assert out.returncode == 0 and out.stdout.startswith("def ") and "agree: True" in out.stderr, out.stderr
