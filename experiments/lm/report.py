"""Run outputs and the comparison of several runs: tables (mean ± spread over seeds) and curve plots.

A run folder gets ``results.json`` and ``results.md`` (:func:`write_run`). ``python -m experiments.lm report
RUN... --out DIR`` writes ``DIR/results.md`` (one row per run, then one row per configuration with the mean
and sample standard deviation over its seeds, and the seeds' values, and the gap to the softmax baseline paired by seed) and ``DIR/curves.png`` (training loss,
a 50-step moving average in bits/char, and the validation curve of every run).

A configuration is everything in the run's config except the seed and how it was executed (run dir,
threads, progress, device, resume).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

__all__ = ["write_run", "load_runs", "label", "runs_table", "summary_table", "plot_curves", "combine"]

_EXECUTION = {"run_dir", "threads", "progress", "device", "resume", "stop_after", "seed", "checkpoint_every",
              "eval_batch_size"}
ATTENTION_ORDER = {"softmax": 0, "taylor": 1, "hybrid": 2}
_MODEL_DEFAULTS = {"width": 128, "layers": 2, "heads": 4, "mlp_ratio": 4, "context": 256, "pos": "learned",
                   "tie_head": True, "backend": "auto"}


def write_run(run_dir: Path, results: dict) -> None:
    run_dir = Path(run_dir)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "results.md").write_text(runs_table([results]))


def load_runs(run_dirs: Iterable[Path]) -> List[dict]:
    runs = []
    for d in run_dirs:
        if not (Path(d) / "results.json").exists():
            print(f"[report: skipping {d}: no results.json (unfinished run?)]", file=sys.stderr)
            continue
        r = json.loads((Path(d) / "results.json").read_text())
        r["_dir"] = str(d)
        runs.append(r)
    return runs


def _config_key(r: dict) -> str:
    c = {k: v for k, v in r["config"].items() if k not in _EXECUTION}
    m = dict(c["model"])
    if m["attention"] != "hybrid":
        m.pop("hybrid", None)
    if m["attention"] == "softmax":
        m.pop("feature_dim", None)
        m.pop("backend", None)
    else:
        m.pop("qk_dim", None)
    c["model"] = m
    return json.dumps(c, sort_keys=True)


def label(r: dict) -> str:
    """A short name: kind, its attention options, lr, and any setting off the experiment's defaults."""
    m = r["config"]["model"]
    parts = [m["attention"]]
    if m["attention"] == "softmax" and m.get("qk_dim"):
        parts.append(f"qk_dim={m['qk_dim']}")
    if m["attention"] in ("taylor", "hybrid"):
        parts.append(f"fd={m.get('feature_dim') or 'head'}")
    if m["attention"] == "hybrid":
        options = dict(m.get("hybrid", {}))
        parts.append(f"window={options.pop('window', '?')}")
        if options.pop("conv_size", 0):
            parts.append(f"conv={m['hybrid']['conv_size']}")
        if options.pop("learn_scale", False):
            parts.append("learn_scale")
        parts.extend(f"{k}={v}" for k, v in sorted(options.items()))
    parts.extend(f"{k}={m[k]}" for k, v in _MODEL_DEFAULTS.items() if k in m and m[k] != v)
    parts.append(f"lr={r['config']['lr']:g}")
    return " ".join(parts)


def runs_table(runs: Sequence[dict]) -> str:
    lines = ["| Run | Attention | Seed | Params | Val bits/char | Final train loss (50-step mean, bits/char) | ms/step |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        tail = r["train_loss"][-50:]
        train_bpc = sum(tail) / len(tail) / math.log(2) if tail else float("nan")
        name = Path(r.get("_dir", r["config"]["run_dir"])).name
        lines.append(f"| {name} | {label(r)} | {r['config']['seed']} | {r['parameters']['total']:,} | "
                     f"{r['val_bits_per_char']:.4f} | {train_bpc:.4f} | {r['ms_per_step']:.0f} |")
    return "\n".join(lines) + "\n"


def _groups(runs: Sequence[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for r in runs:
        groups.setdefault(_config_key(r), []).append(r)
    return groups


def _reference(groups: Dict[str, List[dict]]):
    """The softmax configuration with the most seeds (then the lowest mean): the baseline of the gap column."""
    soft = [g for g in groups.values() if g[0]["config"]["model"]["attention"] == "softmax"]
    if not soft:
        return None
    return min(soft, key=lambda g: (-len(g), statistics.mean(r["val_bits_per_char"] for r in g)))


def summary_table(runs: Sequence[dict]) -> str:
    """One row per configuration: seeds, mean ± sample std of val bits/char, min..max, per-seed values, and the
    gap to the reference softmax configuration (:func:`_reference`) as the mean of per-seed differences over the
    seeds both have (same seed = same batches), ± their sample std."""
    groups = dict(sorted(_groups(runs).items(), key=lambda kv: (ATTENTION_ORDER.get(kv[1][0]["config"]["model"]["attention"], 9),
                                                                 label(kv[1][0]))))
    ref = _reference(groups)
    ref_by_seed = {r["config"]["seed"]: r["val_bits_per_char"] for r in ref} if ref else {}
    lines = ["| Configuration | Params | Seeds | Val bits/char mean ± std | min .. max | Per seed | "
             "Δ vs softmax (paired seeds) |", "|---|---|---|---|---|---|---|"]
    for group in groups.values():
        is_ref = group is ref
        group = sorted(group, key=lambda r: r["config"]["seed"])
        vals = [r["val_bits_per_char"] for r in group]
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        spread = f"{statistics.mean(vals):.4f} ± {std:.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"
        per_seed = ", ".join(f"{r['config']['seed']}: {v:.4f}" for r, v in zip(group, vals))
        diffs = [r["val_bits_per_char"] - ref_by_seed[r["config"]["seed"]] for r in group if r["config"]["seed"] in ref_by_seed]
        if is_ref:
            gap = "(reference)"
        elif len(diffs) > 1:
            gap = f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} (n={len(diffs)})"
        elif diffs:
            gap = f"{diffs[0]:+.4f} (n=1)"
        else:
            gap = ""
        lines.append(f"| {label(group[0])} | {group[0]['parameters']['total']:,} | {len(vals)} | {spread} | "
                     f"{min(vals):.4f} .. {max(vals):.4f} | {per_seed} | {gap} |")
    return "\n".join(lines) + "\n"


def _moving_average(xs: List[float], n: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= n:
            acc -= xs[i - n]
        out.append(acc / min(i + 1, n))
    return out


def plot_curves(runs: Sequence[dict], path: Path, *, smooth: int = 50) -> Path:
    """Training loss (moving average, bits/char) and validation bits/char per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = _groups(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] if len(groups) <= 10 else list(plt.get_cmap("tab20").colors)
    styles = ["-", "--", ":", "-."]
    train_finals, train_lowest, val_finals, val_lowest = [], [], [], []
    for i, group in enumerate(groups.values()):
        color = colors[i % len(colors)]
        for j, r in enumerate(sorted(group, key=lambda r: r["config"]["seed"])):
            name = f"{label(r)} s{r['config']['seed']}"
            train = _moving_average([x / math.log(2) for x in r["train_loss"]], smooth)
            if train:
                train_finals.append(train[-1])
                train_lowest.append(min(train))
            if r["validation"]:
                val_finals.append(r["validation"][-1]["bits_per_char"])
                val_lowest.append(min(v["bits_per_char"] for v in r["validation"]))
            ax_train.plot(range(1, len(train) + 1), train, color=color, ls=styles[j % len(styles)], lw=1, label=name)
            steps = [v["step"] for v in r["validation"]]
            ax_val.plot(steps, [v["bits_per_char"] for v in r["validation"]], color=color, ls=styles[j % len(styles)],
                        marker="o", ms=3, lw=1, label=name)
    ax_train.set_title(f"training loss ({smooth}-step moving average)")
    ax_val.set_title("validation (fixed windows)")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("step")
        ax.set_ylabel("bits/char")
        ax.grid(True, alpha=0.3)
    for ax, finals, lowest in ((ax_train, train_finals, train_lowest), (ax_val, val_finals, val_lowest)):
        if finals:  # from just below the best value to a bit above the worst final value: the end of training
            ax.set_ylim(min(lowest) - 0.05, max(finals) + 1.0)
    ax_val.legend(fontsize=6, loc="upper right", ncol=1 if len(runs) <= 12 else 2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def combine(run_dirs: Iterable[Path], out_dir: Path = None) -> str:
    """The per-run and per-configuration tables of finished runs (and, with ``out_dir``, results.md + curves.png there)."""
    runs = load_runs(run_dirs)
    machine = sorted({f"{r['machine']['cpu']}, {r['machine']['threads']} thread(s), torch {r['machine']['torch']}" for r in runs})
    text = ("## Per configuration (mean ± sample std over seeds)\n\n" + summary_table(runs) +
            "\n## Per run\n\n" + runs_table(runs) + "\nMachine: " + "; ".join(machine) + "\n")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.md").write_text(text)
        plot_curves(runs, out_dir / "curves.png")
    return text
