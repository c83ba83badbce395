"""Tables and plots from a scaling-suite JSON (pytest-benchmark's file plus the runner's header and skips).

    python -m bench.report bench/results/cpu_scaling.json      # rewrites the .md and .png files beside it

Writes ``<name>.md`` (machine header, targets, fitted exponents, crossovers, time and GFLOP/s tables,
what was not measured and why), ``<name>.png`` (log-log time vs L, fitted exponents, crossovers) and
``<name>_gflops.png`` (achieved GFLOP/s against the measured matmul peak).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from typing import Optional

from bench.fitting import find_crossover, fit_exponent
from bench.flops import BWD_FACTOR, flop_crossover
from bench.machine import format_machine_header

__all__ = ["load", "result_rows", "peak", "curves", "analyse", "write_markdown", "write_plots", "write_report"]

FIT_MIN = 1024  # lengths below this are dominated by call overhead; exponents are fitted from here up
TARGET_RANGE = (2048, 16384)  # the CPU exponent target: Taylor linear path <= 1.15 over this range
TARGET_EXPONENT = 1.15
MODES = ("fwd", "fwdbwd")
MODE_TITLE = {"fwd": "forward", "fwdbwd": "forward+backward"}
SOFTMAX = ("softmax_sdpa", "softmax_sdpa_padded")
LINEAR_FAMILIES = ("taylor-linear", "taylor-fused")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


STATS = ("median", "min", "mean")


def time_stat(data: dict) -> str:
    """Which pytest-benchmark statistic the tables, fits and plots use (``linattn_settings.stat``, default median)."""
    stat = (data.get("linattn_settings") or {}).get("stat") or "median"
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    return stat


def result_rows(data: dict) -> list[dict]:
    """One dict per timed case: its extra_info plus median/min seconds, rounds, and ``time_s`` (the chosen stat)."""
    stat = time_stat(data)
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        if info.get("kind") == "peak" or "length" not in info:
            continue
        stats = bench.get("stats") or {}
        info.update(median_s=stats.get("median"), min_s=stats.get("min"), measured_rounds=stats.get("rounds"),
                    time_s=stats.get(stat))
        rows.append(info)
    return rows


def peak(data: dict) -> Optional[dict]:
    """The measured matmul peak: {'gflops', 'n', 'dtype'} of the best round of any size, or None."""
    best = None
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        t = (bench.get("stats") or {}).get("min")
        if info.get("kind") == "peak" and t:
            cand = {"gflops": info["flops"] / t / 1e9, "n": info.get("n"), "dtype": info.get("dtype")}
            if best is None or cand["gflops"] > best["gflops"]:
                best = cand
    return best


def curves(rows: list[dict]) -> dict:
    """{(mode, causal, batch): {impl: [(L, time_s, row), ...] sorted by L}}."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[(r["mode"], bool(r["causal"]), r.get("batch", 1))][r["impl"]].append((r["length"], r["time_s"], r))
    for by_impl in out.values():
        for pts in by_impl.values():
            pts.sort(key=lambda p: p[0])
    return out


def _families(rows) -> dict:
    return {r["impl"]: r.get("family", "") for r in rows}


def crossover_pairs(impls: dict) -> list[tuple[str, str]]:
    """(a, b) pairs whose crossover is reported: b (linear/fused) overtaking a (quadratic/softmax)."""
    pairs = []
    if "taylor_ref_quadratic" in impls and "taylor_ref_featuremap" in impls:
        pairs.append(("taylor_ref_quadratic", "taylor_ref_featuremap"))
    fused = [name for name, fam in impls.items() if fam == "taylor-fused"]
    for s in SOFTMAX:
        if s in impls:
            pairs += [(s, f) for f in fused]
    if "taylor_ref_quadratic" in impls:
        pairs += [("taylor_ref_quadratic", f) for f in fused]
    if "fla_parallel_based" in impls and "fla_fused_chunk_based" in impls:
        pairs.append(("fla_parallel_based", "fla_fused_chunk_based"))
    return pairs


def analyse(data: dict) -> dict:
    """Exponent fits, crossovers and target verdicts, as plain data (also stored back into the JSON)."""
    rows = result_rows(data)
    fams = _families(rows)
    cv = curves(rows)
    device = (data.get("linattn_machine") or {}).get("device") or (rows[0]["device"] if rows else "cpu")
    fits, crossings, targets = [], [], []
    for (mode, causal, batch), by_impl in sorted(cv.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1], kv[0][2])):
        d = next(iter(by_impl.values()))[0][2]
        for impl, pts in by_impl.items():
            ls, ts = [p[0] for p in pts], [p[1] for p in pts]
            main = fit_exponent(ls, ts, lo=FIT_MIN, min_points=3)
            tgt = fit_exponent(ls, ts, lo=TARGET_RANGE[0], hi=TARGET_RANGE[1], min_points=3)
            fits.append(dict(mode=mode, causal=causal, batch=batch, impl=impl, family=fams.get(impl),
                             exponent=main.exponent if main else None, r2=main.r2 if main else None,
                             fit_lo=main.lo if main else None, fit_hi=main.hi if main else None,
                             coef=main.coef if main else None,
                             target_exponent=tgt.exponent if tgt else None, target_n=tgt.n if tgt else 0))
        for a, b in crossover_pairs({i: fams.get(i) for i in by_impl}):
            pa, pb = by_impl[a], by_impl[b]
            c = find_crossover([p[0] for p in pa], [p[1] for p in pa], [p[0] for p in pb], [p[1] for p in pb])
            crossings.append(dict(mode=mode, causal=causal, batch=batch, a=a, b=b, kind=c.kind, length=c.length,
                                  below=c.below, above=c.above, n=c.n, text=c.describe(),
                                  flop_crossover=flop_crossover(d["dim"], d["vdim"], causal=causal)))
    if device == "cpu":
        for f in fits:
            if f["family"] in LINEAR_FAMILIES:
                e = f["target_exponent"]
                verdict = "n/a (fewer than 3 lengths in range)" if e is None else ("pass" if e <= TARGET_EXPONENT else "FAIL")
                targets.append(dict(
                    target=f"{f['impl']} {f['mode']} {'causal' if f['causal'] else 'non-causal'} B{f['batch']}: "
                           f"exponent over L∈[{TARGET_RANGE[0]}, {TARGET_RANGE[1]}] ≤ {TARGET_EXPONENT}",
                    measured=None if e is None else round(e, 3), verdict=verdict))
        for c in crossings:
            if c["a"] in SOFTMAX and fams.get(c["b"]) == "taylor-fused":
                ok = c["kind"] in ("interpolated", "below_range")
                verdict = "n/a (fewer than 3 common lengths)" if c["n"] < 3 else ("pass" if ok else "FAIL")
                targets.append(dict(
                    target=f"{c['b']} beats {c['a']} from the measured crossover on ({c['mode']}, "
                           f"{'causal' if c['causal'] else 'non-causal'}, B{c['batch']})",
                    measured=c["text"], verdict=verdict))
    return dict(fits=fits, crossovers=crossings, targets=targets, peak=peak(data))


# ---------------------------------------------------------------------------------------------------- markdown


def _fmt_len(n) -> str:
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _fmt_ms(s) -> str:
    if s is None:
        return "—"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _skip_summary(data: dict) -> list[tuple[str, str, int]]:
    """(implementation or case group, reason, count), reasons with numbers generalized for grouping."""
    groups: dict = defaultdict(int)
    examples: dict = {}
    for s in data.get("linattn_skipped", []):
        m = re.search(r"\[(.*)\]", s["nodeid"])
        cid = m.group(1) if m else s["nodeid"]
        parts = cid.split("-")
        if "test_matmul_peak" in s["nodeid"]:
            impl = "matmul_peak"
        else:
            impl = parts[0] if cid.endswith("-unavailable") else (parts[2] if len(parts) >= 5 else cid)
        kind = re.sub(r"[\d.,]+", "#", s["reason"])[:90]
        groups[(impl, kind)] += 1
        examples.setdefault((impl, kind), (cid, s["reason"]))
    return [(impl, examples[(impl, kind)], n) for (impl, kind), n in sorted(groups.items())]


def write_markdown(data: dict, analysis: dict, path: str, title: str) -> None:
    rows = result_rows(data)
    cv = curves(rows)
    settings = data.get("linattn_settings") or {}
    machine = data.get("linattn_machine") or {}
    pk = analysis.get("peak")
    lines = [f"# {title}", "", format_machine_header(machine) if machine else "", ""]
    facts = []
    if settings:
        facts.append(
            f"Shape: B={','.join(map(str, settings.get('batch', [])))}, H={settings.get('heads')}, "
            f"D={settings.get('dim')}, Dv={settings.get('vdim')}, {settings.get('dtype')}, device {settings.get('device')}; "
            f"preset `{settings.get('preset')}`; time = **{time_stat(data)}** over the rounds pytest-benchmark ran "
            f"({settings.get('min_rounds', 1)}–{settings.get('max_rounds')} per case within the budgets, after warm-up)."
        )
    if pk:
        facts.append(f"Measured matmul peak ({pk['n']}³ {pk['dtype']} matmul, best round): **{pk['gflops']:,.1f} GFLOP/s**.")
    if data.get("linattn_runtime_s"):
        facts.append(f"Suite wall time: {data['linattn_runtime_s']:.0f} s.")
    lines += [f"- {x}" for x in facts] + [""]

    if analysis["targets"]:
        lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured'] if t['measured'] is not None else '—'} | {t['verdict']} |"
                  for t in analysis["targets"]]
        lines.append("")

    lines += [f"## Fitted exponents (time ∝ L^p, least squares on log-log, L ≥ {FIT_MIN})", ""]
    keys = sorted({(f["mode"], f["causal"], f["batch"]) for f in analysis["fits"]},
                  key=lambda k: (MODES.index(k[0]), k[1], k[2]))
    if not keys:
        lines += ["No timings.", ""]
    if keys:
        head = [f"{MODE_TITLE[m]} {'causal' if c else 'non-causal'}" + (f" B{b}" if len({k[2] for k in keys}) > 1 else "")
                for m, c, b in keys]
        lines += ["| implementation | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        by = {(f["impl"], f["mode"], f["causal"], f["batch"]): f for f in analysis["fits"]}
        for impl in dict.fromkeys(f["impl"] for f in analysis["fits"]):
            cells = []
            for k in keys:
                f = by.get((impl, *k))
                if f is None or f["exponent"] is None:
                    cells.append("—")
                else:
                    cells.append(f"{f['exponent']:.2f} ({_fmt_len(f['fit_lo'])}–{_fmt_len(f['fit_hi'])})")
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        lines.append("")

    if analysis["crossovers"]:
        lines += ["## Crossovers (from which length the second is faster at every measured length)", "",
                  "| case | slower at short L | faster at long L | measured crossover L | FLOP crossover L |",
                  "|---|---|---|---|---|"]
        for c in analysis["crossovers"]:
            case = f"{c['mode']} {'causal' if c['causal'] else 'non-causal'} B{c['batch']}"
            lines.append(f"| {case} | {c['a']} | {c['b']} | {c['text']} | ≈{c['flop_crossover']:.0f} |")
        lines.append("")

    for (mode, causal, batch), by_impl in sorted(cv.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1], kv[0][2])):
        lengths = sorted({p[0] for pts in by_impl.values() for p in pts})
        lines += [f"## {MODE_TITLE[mode]}, {'causal' if causal else 'non-causal'}, B={batch}: {time_stat(data)} ms "
                  "(GFLOP/s in parentheses)", "",
                  "| implementation | " + " | ".join(_fmt_len(n) for n in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for impl, pts in by_impl.items():
            at = {p[0]: p for p in pts}
            cells = []
            for n in lengths:
                if n not in at:
                    cells.append("—")
                    continue
                _, t, r = at[n]
                gf = r["flops"] / t / 1e9 if t else None
                cells.append(f"{_fmt_ms(t)} ({gf:.3g})" if gf else _fmt_ms(t))
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        errs = {impl: max((p[2].get("max_rel_err") or 0.0) for p in pts)
                for impl, pts in by_impl.items() if any("max_rel_err" in p[2] for p in pts)}
        if errs:
            lines.append("")
            lines.append("Output check against the quadratic reference (max relative error at the checked lengths): "
                         + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ".")
        lines.append("")

    skips = _skip_summary(data)
    if skips:
        lines += ["## Not measured", "", "| implementation | cases | reason (example) |", "|---|---|---|"]
        for impl, (cid, reason), n in skips:
            lines.append(f"| {impl} | {n} | {reason.replace('|', '/')} (`{cid}`) |")
        lines.append("")

    notes = {r["impl"]: r.get("note", "") for r in rows}
    lines += ["## Implementations", ""] + [f"- `{k}`: {v}" for k, v in notes.items() if v] + [""]
    lines += [
        "## Conventions", "",
        "- FLOPs (bench/flops.py): quadratic Taylor and softmax `2·Lq·Lk·(D+Dv)`, half when causal; linear form "
        "`4·L·M·Dv` with `M = 1 + D + D(D+1)/2`, plus `2·L·C·(D+Dv)` for the causal chunked form's C×C tiles (C = 64); "
        f"forward+backward = {BWD_FACTOR:g} × forward; element-wise work not counted. Fused backends are credited with "
        "the cheaper form's count; SDPA on padded inputs with the padded width.",
        "- Exponents: slope of log(time) on log(L); overheads flatten it at short lengths, so fits start at "
        f"L = {FIT_MIN}. The CPU target uses L ∈ [{TARGET_RANGE[0]}, {TARGET_RANGE[1]}].",
        "- Crossover: the length (log-log interpolated) from which the second implementation is faster at every "
        "measured length; `≤` when it is faster everywhere measured.",
        "- Skipped cases were estimated (memory, or time extrapolated from the previous length) to exceed the suite's "
        "limits; nothing was crashed to find out.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------------- plots


def _style(impls: list[str]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    markers = "osD^v<>phX*"
    return {impl: (cmap(n % 10), markers[n % len(markers)]) for n, impl in enumerate(impls)}


def _plot_batch(cv: dict) -> Optional[int]:
    batches = sorted({k[2] for k in cv})
    return batches[-1] if batches else None


def write_plots(data: dict, analysis: dict, stem: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result_rows(data)
    cv = curves(rows)
    if not cv:
        return []
    batch = _plot_batch(cv)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    style = _style(impls)
    fits = {(f["impl"], f["mode"], f["causal"], f["batch"]): f for f in analysis["fits"]}
    paths = []

    for kind in ("time", "gflops"):
        fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), squeeze=False)
        for i, mode in enumerate(MODES):
            for j, causal in enumerate((False, True)):
                ax = axes[i][j]
                by_impl = cv.get((mode, causal, batch), {})
                ax.set_title(f"{MODE_TITLE[mode]}, {'causal' if causal else 'non-causal'}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                ax.set_xlabel("sequence length L")
                if not by_impl:
                    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
                    continue
                for impl, pts in by_impl.items():
                    color, marker = style[impl]
                    ls = [p[0] for p in pts]
                    if kind == "time":
                        ys = [p[1] * 1e3 for p in pts]
                        f = fits.get((impl, mode, causal, batch))
                        label = impl + (f" (p={f['exponent']:.2f})" if f and f["exponent"] is not None else "")
                        ax.plot(ls, ys, marker=marker, color=color, label=label, lw=1.4, ms=5)
                        if f and f["exponent"] is not None:
                            xs = [f["fit_lo"], f["fit_hi"]]
                            ax.plot(xs, [f["coef"] * x ** f["exponent"] * 1e3 for x in xs], ls="--", color=color,
                                    lw=0.9, alpha=0.7)
                    else:
                        ys = [p[2]["flops"] / p[1] / 1e9 for p in pts]
                        ax.plot(ls, ys, marker=marker, color=color, label=impl, lw=1.4, ms=5)
                if kind == "time":
                    ax.set_ylabel("time per call (ms)")
                    marked = set()
                    for c in analysis["crossovers"]:
                        if (c["mode"], c["causal"], c["batch"]) != (mode, causal, batch) or c["length"] is None:
                            continue
                        if c["kind"] != "interpolated":
                            continue
                        ref = c["a"] == "taylor_ref_quadratic" and c["b"] == "taylor_ref_featuremap"
                        if not ref and not (c["a"] == "softmax_sdpa"):
                            continue
                        color = "black" if ref else style.get(c["b"], ("grey",))[0]
                        ax.axvline(c["length"], color=color, ls=":", lw=1.2)
                        txt = "quadratic→linear" if ref else f"{c['b']} < softmax"
                        if (txt, round(c["length"])) not in marked:
                            ax.annotate(f"{txt}\nL≈{c['length']:,.0f}", (c["length"], 0.97), xycoords=("data", "axes fraction"),
                                        fontsize=7, ha="left", va="top", rotation=0, color=color)
                            marked.add((txt, round(c["length"])))
                    d = next(iter(by_impl.values()))[0][2]
                    fc = flop_crossover(d["dim"], d["vdim"], causal=causal)
                    ax.axvline(fc, color="grey", ls="-.", lw=0.8, alpha=0.6)
                    ax.annotate(f"FLOP crossover\nL≈{fc:.0f}", (fc, 0.03), xycoords=("data", "axes fraction"),
                                fontsize=7, color="grey", va="bottom")
                else:
                    ax.set_ylabel("achieved GFLOP/s")
                    pk = analysis.get("peak")
                    if pk:
                        ax.axhline(pk["gflops"], color="black", ls="--", lw=1)
                        ax.annotate(f"matmul peak {pk['gflops']:,.0f} GFLOP/s ({pk['dtype']})", (0.01, pk["gflops"]),
                                    xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
                ax.legend(fontsize=7, loc="best")
        suffix = "" if kind == "time" else "_gflops"
        what = "time vs sequence length (dashed: fitted power law)" if kind == "time" else "achieved GFLOP/s vs sequence length"
        fig.suptitle(f"{title}: {what} — B={batch}", fontsize=11)
        fig.tight_layout()
        path = f"{stem}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(json_path: str, title: Optional[str] = None, stat: Optional[str] = None) -> list[str]:
    """Analyse ``json_path`` and write the .md and .png files beside it; returns their paths."""
    data = load(json_path)
    if stat:
        data.setdefault("linattn_settings", {})["stat"] = stat
    analysis = analyse(data)
    stem = os.path.splitext(json_path)[0]
    device = (data.get("linattn_machine") or {}).get("device", "cpu")
    title = title or f"Scaling of Taylor attention on {device.upper()}"
    write_markdown(data, analysis, stem + ".md", title)
    paths = [stem + ".md"] + write_plots(data, analysis, stem, title)
    data["linattn_analysis"] = analysis
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="results JSON written by python -m bench.scaling")
    p.add_argument("--title", default=None)
    p.add_argument("--stat", default=None, choices=STATS, help="statistic of the rounds to report (default: the run's)")
    args = p.parse_args(argv)
    for path in write_report(args.json, args.title, args.stat):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

