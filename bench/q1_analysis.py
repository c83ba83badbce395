"""Question 1 (complexity): feature counts, how well Taylor attention tracks softmax, fitted exponents.

    python -m bench.q1_analysis                                   # reads bench/results/cpu_scaling.json
    python -m bench.q1_analysis --bench-json a.json --bench-json b.json --out bench/results/q1

Three parts, each a plot plus a section of ``q1_analysis.md``:

1. Feature count M of the Taylor map against head dim D and number of Taylor terms, full outer-product map
   (``Σ_{n<K} D^n``) against the symmetric one (``C(D+K-1, K-1)``), from ``linattn_cuda.feature_dim``;
   the seed report's wrong ``2D+1`` drawn for contrast.
2. Taylor attention against softmax attention as the logits grow: random ``q, k, v ~ N(0, 1)``,
   logits ``s = α · q·k/√D`` (so their standard deviation is α; α = 1 is the default scale), relative error
   of the outputs and total-variation distance between the rows of the two attention matrices.
3. Complexity exponents fitted on the scaling-suite measurements (time ∝ L^p): softmax and the quadratic form
   should show p ≈ 2, the linear (feature-map) forms p ≈ 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_JSON = os.path.join(HERE, "results", "cpu_scaling.json")
DEFAULT_OUT = os.path.join(HERE, "results", "q1")


# ---------------------------------------------------------------------------------------------------- 1. feature counts


def feature_counts(dims=range(1, 129), terms=(2, 3, 4)) -> dict:
    from linattn_cuda import feature_dim

    return {
        "dims": list(dims),
        "terms": list(terms),
        "symmetric": {t: [feature_dim(d, True, t) for d in dims] for t in terms},
        "full": {t: [feature_dim(d, False, t) for d in dims] for t in terms},
    }


def feature_count_table(dims=(4, 8, 16, 32, 64, 128), terms=(1, 2, 3, 4, 5)) -> list[dict]:
    from linattn_cuda import feature_dim

    return [dict(D=d, terms=t, symmetric=feature_dim(d, True, t), full=feature_dim(d, False, t)) for d in dims for t in terms]


# ---------------------------------------------------------------------------------------------------- 2. error vs softmax


def taylor_vs_softmax(alphas, *, length=256, dim=16, vdim=64, seeds=(0, 1, 2), causal=False) -> list[dict]:
    """Output relative error and row total-variation distance of Taylor vs softmax attention (float64)."""
    from linattn_cuda import taylor_attention

    rows = []
    for alpha in alphas:
        errs, tvs, tv_max = [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            q = torch.randn(1, 1, length, dim, generator=g, dtype=torch.float64)
            k = torch.randn(1, 1, length, dim, generator=g, dtype=torch.float64)
            v = torch.randn(1, 1, length, vdim, generator=g, dtype=torch.float64)
            scale = alpha / dim**0.5
            s = scale * q @ k.transpose(-1, -2)
            w = 1.0 + s + 0.5 * s * s
            if causal:
                mask = torch.ones(length, length, dtype=torch.bool).tril()
                s = s.masked_fill(~mask, float("-inf"))
                w = w.masked_fill(~mask, 0.0)
            p_soft = torch.softmax(s, dim=-1)
            p_tay = w / w.sum(-1, keepdim=True)
            o_soft = p_soft @ v
            o_tay = taylor_attention(q, k, v, causal=causal, scale=scale, backend="reference")
            # the library's output must be the row-normalized Taylor weights applied to v
            assert torch.allclose(o_tay, p_tay @ v, atol=1e-10), "taylor_attention disagrees with its definition"
            errs.append(((o_tay - o_soft).norm() / o_soft.norm()).item())
            tv = 0.5 * (p_tay - p_soft).abs().sum(-1)
            tvs.append(tv.mean().item())
            tv_max.append(tv.max().item())
        rows.append(dict(alpha=float(alpha), rel_err=float(np.mean(errs)), tv_mean=float(np.mean(tvs)),
                         tv_max=float(np.max(tv_max))))
    return rows


# ---------------------------------------------------------------------------------------------------- 3. exponents


def fitted_exponents(json_paths) -> tuple[list[dict], list]:
    """Fits from every existing benchmark JSON (bench.report.analyse), and the loaded data for plotting."""
    from bench import report

    fits, datas = [], []
    for path in json_paths:
        if not os.path.exists(path):
            continue
        data = report.load(path)
        device = (data.get("linattn_machine") or {}).get("device", "?")
        for f in report.analyse(data)["fits"]:
            if f["exponent"] is not None:
                fits.append(dict(f, source=os.path.basename(path), device=device))
        datas.append((path, data))
    return fits, datas


# ---------------------------------------------------------------------------------------------------- output


def _plots(out, counts, err_rows, err_rows_causal, datas) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench import report
    from linattn_cuda import feature_dim

    paths = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    dims = counts["dims"]
    for t in counts["terms"]:
        (line,) = ax1.plot(dims, counts["symmetric"][t], label=f"symmetric, {t} terms")
        ax1.plot(dims, counts["full"][t], ls="--", color=line.get_color(), label=f"full, {t} terms")
    ax1.plot(dims, [2 * d + 1 for d in dims], ls=":", color="grey", label="seed report's 2D+1 (wrong)")
    ax1.axvline(16, color="black", lw=0.6, alpha=0.5)
    ax1.annotate("D=16: M=153 (sym) / 273 (full)", (16, 153), fontsize=7, xytext=(20, 30), textcoords="offset points")
    ax1.set(xscale="log", yscale="log", xlabel="head dim D", ylabel="feature count M", title="M vs head dim")
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    ks = list(range(1, 7))
    for d in (4, 16, 64):
        (line,) = ax2.plot(ks, [feature_dim(d, True, k) for k in ks], marker="o", label=f"symmetric, D={d}")
        ax2.plot(ks, [feature_dim(d, False, k) for k in ks], marker="s", ls="--", color=line.get_color(), label=f"full, D={d}")
    ax2.set(yscale="log", xlabel="Taylor terms K (3 = second order)", ylabel="feature count M", title="M vs Taylor terms")
    ax2.legend(fontsize=7)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, "q1_feature_dim.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.8))
    a = [r["alpha"] for r in err_rows]
    ax.plot(a, [r["rel_err"] for r in err_rows], marker="o", label="relative output error, non-causal")
    ax.plot(a, [r["tv_mean"] for r in err_rows], marker="s", label="mean row TV distance, non-causal")
    ax.plot(a, [r["tv_max"] for r in err_rows], ls=":", label="max row TV distance, non-causal")
    ax.plot(a, [r["rel_err"] for r in err_rows_causal], marker="^", ls="--", label="relative output error, causal")
    ax.axvline(1.0, color="black", lw=0.6, alpha=0.5)
    ax.annotate("default scale 1/√D", (1.0, 0.02), xycoords=("data", "axes fraction"), fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="logit standard deviation α  (s = α·q·k/√D, q,k ~ N(0,1))",
           ylabel="Taylor vs softmax", title="Second-order Taylor attention against softmax attention")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, "q1_error_vs_scale.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if datas:
        path, data = datas[0]
        cv = report.curves(report.result_rows(data))
        fits = {(f["impl"], f["mode"], f["causal"], f["batch"]): f for f in report.analyse(data)["fits"]}
        keys = sorted(k for k in cv if k[0] == "fwd")
        if keys:
            fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False)
            for ax, key in zip(axes[0], keys):
                all_l = []
                for impl, pts in cv[key].items():
                    ls, ts = [p[0] for p in pts], [p[1] * 1e3 for p in pts]
                    all_l += ls
                    f = fits.get((impl, *key))
                    lab = impl + (f" (p={f['exponent']:.2f})" if f and f["exponent"] is not None else "")
                    ax.plot(ls, ts, marker="o", label=lab)
                if all_l:
                    lo, hi = min(all_l), max(all_l)
                    ymin = min(p[1] for pts in cv[key].values() for p in pts) * 1e3
                    for p, style in ((1, ":"), (2, "-.")):
                        ax.plot([lo, hi], [ymin, ymin * (hi / lo) ** p], color="grey", ls=style, lw=0.8,
                                label=f"slope {p} guide")
                ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward time (ms)",
                       title=f"forward, {'causal' if key[1] else 'non-causal'} (B={key[2]}, {os.path.basename(path)})")
                ax.legend(fontsize=7)
                ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            paths.append(os.path.join(out, "q1_exponents.png"))
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    return paths


def _markdown(counts_table, err_rows, err_rows_causal, fits, json_paths, length, dim) -> str:
    lines = ["# Question 1: complexity of softmax vs second-order Taylor attention", "",
             "Generated by `python -m bench.q1_analysis`.", "",
             "## 1. Feature count M", "",
             "The second-order map needs every monomial of degree ≤ 2: `M = C(D+K-1, K-1)` with the symmetric map "
             "(each pair a<b once) or `Σ_{n<K} D^n` with the full outer product; K = 3 terms is the second order. "
             "The seed report's `2D+1` (element-wise squares only) does not reproduce `(q·k)²`.", "",
             "| D | K=1 | K=2 | K=3 (second order) | K=4 | K=5 |", "|---|---|---|---|---|---|"]
    by = {}
    for r in counts_table:
        by.setdefault(r["D"], {})[r["terms"]] = r
    for d, row in by.items():
        lines.append(f"| {d} | " + " | ".join(f"{row[t]['symmetric']:,} / {row[t]['full']:,}" for t in sorted(row)) + " |")
    lines += ["", "Cells: symmetric / full. Linear-form cost per token ≈ `4·M·Dv` FLOPs against the quadratic "
              "form's `2·L·(D+Dv)`: the linear form pays off once L exceeds ≈ `2·M·Dv/(D+Dv)` "
              "(≈245 for D=16, Dv=64).", "",
              f"## 2. Taylor vs softmax as the logits grow (L={length}, D={dim}, q,k,v ~ N(0,1), float64, 3 seeds)", "",
              "| logit std α | rel. output error (non-causal) | mean row TV | max row TV | rel. output error (causal) |",
              "|---|---|---|---|---|"]
    for r, rc in zip(err_rows, err_rows_causal):
        lines.append(f"| {r['alpha']:.3g} | {r['rel_err']:.2e} | {r['tv_mean']:.2e} | {r['tv_max']:.2e} | {rc['rel_err']:.2e} |")
    lines += ["", "Taylor weights `1 + s + s²/2` match `exp(s)` to third order in s, so for small logits the error "
              "falls like α³; as α grows the polynomial under-weights large logits (it grows like s², not "
              "exponentially) and over-weights negative ones (`w ≥ 1/2` where `exp(s)` → 0), so attention "
              "rows become flatter than softmax's and the error approaches O(1). The relative output error is "
              "larger than the TV distance because with random values each output averages many v's and is "
              "small itself; the TV distance compares the attention rows directly.", "",
              "## 3. Fitted complexity exponents (time ∝ L^p)", ""]
    if fits:
        lines += ["| source | device | implementation | mode | causal | B | p | fit range | R² |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for f in fits:
            lines.append(f"| {f['source']} | {f['device']} | {f['impl']} | {f['mode']} | {f['causal']} | {f['batch']} | "
                         f"{f['exponent']:.2f} | {f['fit_lo']:.0f}–{f['fit_hi']:.0f} | {f['r2']:.3f} |")
        lines += ["", "Softmax attention and the quadratic Taylor form are O(L²·D) in time (p → 2 once the L² work "
                  "dominates overheads); the feature-map forms are O(L·M·Dv) (p → 1). Fits start at L = 1024; "
                  "smaller lengths are dominated by per-call overheads, which flatten every curve."]
    else:
        lines.append("No exponent could be fitted from " + ", ".join(json_paths) + " (missing, or fewer than 3 "
                     "lengths ≥ 1024): run `python -m bench.scaling` first.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.q1_analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-json", action="append", default=None, help=f"scaling JSON(s) (default {DEFAULT_JSON})")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--points", type=int, default=19, help="number of logit scales in [0.01, 10]")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    json_paths = args.bench_json or [DEFAULT_JSON]
    os.makedirs(args.out, exist_ok=True)

    counts = feature_counts()
    table = feature_count_table()
    alphas = np.logspace(-2, 1, args.points)
    err = taylor_vs_softmax(alphas, length=args.length, dim=args.dim)
    err_causal = taylor_vs_softmax(alphas, length=args.length, dim=args.dim, causal=True)
    fits, datas = fitted_exponents(json_paths)

    md_path = os.path.join(args.out, "q1_analysis.md")
    with open(md_path, "w") as f:
        f.write(_markdown(table, err, err_causal, fits, json_paths, args.length, args.dim))
    with open(os.path.join(args.out, "q1_analysis.json"), "w") as f:
        json.dump(dict(feature_counts=table, error_vs_scale=err, error_vs_scale_causal=err_causal, exponents=fits), f,
                  indent=1)
    paths = [md_path, os.path.join(args.out, "q1_analysis.json")]
    if not args.no_plots:
        paths += _plots(args.out, counts, err, err_causal, datas)
    for path in paths:
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
