"""Run outputs: results JSON, the course-style results table, example predictions, plots.

A run folder gets ``results.json``, ``results.md`` (loss, Jaccard, cosine and Damerau-Levenshtein for the
test set and the last validation epoch, the padding mask setting, training and total wall seconds), ``examples.md`` (predictions next to targets),
``predictions.tsv`` (every test clip) and ``plots/`` (train/validation loss, each similarity per epoch).
``combine`` puts several runs into one table (``python -m experiments.asr report RUN...``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List

from .metrics import METRIC_LABELS, METRICS

__all__ = ["results_table", "run_name", "mask_label", "examples_table", "plot_history", "write_run", "combine"]

COLUMNS = ("loss", *METRICS)


def _row(name: str, split: str, values: dict, extra) -> str:
    return "| " + " | ".join([name, split] + [f"{values[k]:.3f}" for k in COLUMNS] + list(extra)) + " |"


def run_name(config: dict) -> str:
    """Decoder and the attention choices that differ from its default (encoder, cross-attention, q/k width, window)."""
    model = config["model"]
    decoder = model["decoder"]
    parts = []
    if model.get("encoder_attention") == "taylor":
        parts.append("Taylor encoder")
    cross = model.get("cross_attention")
    if decoder == "hybrid" or (cross and cross != ("taylor" if decoder == "taylor" else "softmax")):
        parts.append(f"{cross or 'softmax'} cross-attention")
    if decoder == "hybrid":
        parts.append(f"window {model.get('window', 64)}")
    if model.get("softmax_feature_dim") and decoder in ("lstm", "transformer", "hybrid"):
        parts.append(f"softmax q/k {model['softmax_feature_dim']}")
    return decoder + (f" ({', '.join(parts)})" if parts else "")


def mask_label(config: dict) -> str:
    """``on`` / ``off`` (the resolved padding mask) and the requested setting when it was ``auto``."""
    masked = config.get("masked")
    requested = config.get("mask_padding", "off")
    if masked is None:  # a run from before padding masks: nothing was masked
        return "off"
    return ("on" if masked else "off") + (" (auto)" if requested == "auto" else "")


def results_table(runs: Iterable[dict]) -> str:
    """Loss and similarities (test and last validation epoch), padding mask, training and total wall time."""
    header = ("| Decoder | Split | " + " | ".join(METRIC_LABELS[k] for k in COLUMNS)
              + " | Padding mask | Train time (s) | Wall time (s) |")
    lines = [header, "|" + "---|" * (len(COLUMNS) + 5)]
    for r in runs:
        name, mask = run_name(r["config"]), mask_label(r["config"])
        train_s = r.get("train_seconds_total")
        wall_s = r.get("wall_seconds")
        fmt = lambda x: f"{x:.0f}" if x is not None else ""  # noqa: E731
        lines.append(_row(name, "Test", r["test"], [mask, fmt(train_s), fmt(wall_s)]))
        if r["history"]:
            last = r["history"][-1]
            lines.append(_row(name, f"Validation (epoch {last['epoch']})", last["validation"], [mask, "", ""]))
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "(empty)"


def examples_table(predictions: List[dict], n: int = 10) -> str:
    lines = ["| Clip | Target | Prediction |", "|---|---|---|"]
    for p in predictions[:n]:
        lines.append(f"| {p['id']} | {_cell(p['target'])} | {_cell(p['prediction'])} |")
    return "\n".join(lines) + "\n"


def plot_history(history: List[dict], folder: Path) -> List[Path]:
    """``loss.png`` (train and validation) and one ``<metric>.png`` per similarity (validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    written = []
    series = {"loss": [("train", [h["train_loss"] for h in history]), ("validation", [h["validation"]["loss"] for h in history])]}
    for k in METRICS:
        series[k] = [("validation", [h["validation"][k] for h in history])]
    for key, lines in series.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, ys in lines:
            ax.plot(epochs, ys, marker="o", label=label)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(METRIC_LABELS[key])
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / f"{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_run(run_dir: Path, results: dict, *, examples: int = 10) -> None:
    run_dir = Path(run_dir)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "results.md").write_text(results_table([results]))
    (run_dir / "examples.md").write_text(examples_table(results["predictions"], examples))
    with open(run_dir / "predictions.tsv", "w", encoding="utf-8") as f:
        f.write("id\ttarget\tprediction\n")
        for p in results["predictions"]:
            f.write(f"{p['id']}\t{p['target']}\t{p['prediction']}\n")
    if results["history"]:
        plot_history(results["history"], run_dir / "plots")


def combine(run_dirs: Iterable[Path]) -> str:
    """One results table for several finished runs."""
    return results_table(json.loads((Path(d) / "results.json").read_text()) for d in run_dirs)
