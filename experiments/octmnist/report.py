"""Results JSON, the course-style markdown tables and the plots of a run folder."""
from __future__ import annotations

import json
import os

VARIANT_TITLES = {"maxpool": "CNN with max-pooling", "no_maxpool": "CNN without max-pooling (strided convs)"}


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Best configuration per variant and overall ("all"): highest final validation accuracy
    (ties: lower final training loss)."""
    def key(r):
        return (r["final"]["val_acc"], -r["final"]["train_loss"])

    best = {}
    for r in runs:
        for k in (r["variant"], "all"):
            if k not in best or key(r) > key(best[k]):
                best[k] = r
    return best


def write_json(path: str, payload: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def markdown_tables(runs: list[dict]) -> str:
    """One table per variant, one row per learning rate, in the course's layout (final epoch values)."""
    lines = []
    variants = [v for v in VARIANT_TITLES if any(r["variant"] == v for r in runs)]
    for v in variants:
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: -r["lr"])
        ep = rs[0]["final"]["epoch"]
        sub = rs[0]["course_subset_size"]
        n_test = rs[0]["config"]["n_test"]
        lines += [f"### {VARIANT_TITLES[v]}", "",
                  f"| Learning rate | Training loss (course: cumulative mean) | Training loss (epoch {ep} mean) "
                  f"| Validation accuracy | Test accuracy (course subset, {sub}) | Test accuracy (full, {n_test}) "
                  f"| Trainable parameters |",
                  "|---|---|---|---|---|---|---|"]
        for r in rs:
            f = r["final"]
            lines.append(f"| {r['lr']:g} | {f['train_loss_cumulative']:.4f} | {f['train_loss']:.4f} | "
                         f"{f['val_acc']:.4f} | {r['test_acc_course529']:.4f} | {r['test_acc']:.4f} | "
                         f"{r['trainable_parameters']:,} |")
        lines.append("")
    best = best_runs(runs)
    if "all" in best:
        lines.append("Best configuration (highest final validation accuracy): "
                     + ", ".join(f"{k}: {b['name']} (val {b['final']['val_acc']:.4f})" for k, b in best.items()))
        lines.append("")
    lines.append("Training loss: mean NLL over the epoch's batches (mean of batch means). The course printed "
                 "the cumulative mean over all batches since epoch 1, shown as 'course: cumulative mean'.")
    return "\n".join(lines) + "\n"


def _plot(path, epochs, series, ylabel, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series:
        ax.plot(epochs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(r: dict, plots_dir: str, prefix: str | None = None) -> list[str]:
    prefix = prefix or r["name"]
    ep = [h["epoch"] for h in r["history"]]
    title = f"{VARIANT_TITLES[r['variant']]}, lr {r['lr']:g}"
    if prefix.startswith("best_"):
        title = "Best: " + title
    p1 = os.path.join(plots_dir, f"{prefix}_train_loss.png")
    _plot(p1, ep, [("epoch mean", [h["train_loss"] for h in r["history"]]),
                   ("cumulative mean (course)", [h["train_loss_cumulative"] for h in r["history"]])],
          "Training loss (NLL)", title)
    p2 = os.path.join(plots_dir, f"{prefix}_val_acc.png")
    _plot(p2, ep, [("validation", [h["val_acc"] for h in r["history"]])], "Validation accuracy", title)
    return [p1, p2]


def write_plots(runs: list[dict], plots_dir: str) -> list[str]:
    os.makedirs(plots_dir, exist_ok=True)
    paths = []
    for r in runs:
        paths += plot_run(r, plots_dir)
    for k, b in best_runs(runs).items():
        paths += plot_run(b, plots_dir, prefix=f"best_{k}")
    for v in VARIANT_TITLES:
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: -r["lr"])
        if not rs:
            continue
        ep = [h["epoch"] for h in rs[0]["history"]]
        p = os.path.join(plots_dir, f"{v}_all_lrs_val_acc.png")
        _plot(p, ep, [(f"lr {r['lr']:g}", [h["val_acc"] for h in r["history"]]) for r in rs],
              "Validation accuracy", VARIANT_TITLES[v])
        paths.append(p)
    return paths
