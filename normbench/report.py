"""Tables and figures from a results directory's stored metrics (never from training).

`build_report(out_dir)` reads every finished run under <out>/runs/, and writes
    table.md / table.tex / table.csv   final test accuracy, mean ± sd over seeds, per backend
                                       and variant, beside the paper's value and band
    curves.png / curves.pdf            cross entropy and accuracy against steps (Figure 1 style)
Diverged runs are counted and listed, never averaged into a mean.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from normbench import experiments, runner

# Okabe-Ito colours (colour-blind safe) in the paper's roles: none black,
# standardization loss red (vermillion), batch norm blue.
METHOD_COLORS = {"none": "#000000", "standardization_loss": "#D55E00", "batch_norm": "#0072B2",
                 "batch_norm_scale_shift": "#56B4E9"}
EXTRA_COLORS = ["#009E73", "#CC79A7", "#E69F00", "#F0E442", "#999999"]
SPLIT_MARKERS = {"train": "o", "test": "s"}


def load_runs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics of all finished runs, one row of status per run)."""
    frames, status = [], []
    for run_dir in runner.finished_run_dirs(out):
        record = json.loads((run_dir / "provenance.json").read_text())
        frames.append(pd.read_csv(run_dir / "metrics.csv"))
        status.append({"backend": record["backend"], "variant": record["variant"]["name"], "seed": record["seed"],
                       "status": record["status"], "diverged_at_step": record.get("diverged_at_step"),
                       "train_time_s": record.get("train_time_s"), "device": record.get("device"),
                       "git_commit": record.get("git_commit")})
    if not frames:
        raise FileNotFoundError(f"{out}: no finished runs under {out}/runs; run `normbench run` or `normbench reproduce` first")
    return pd.concat(frames, ignore_index=True), pd.DataFrame(status)


def final_accuracy(metrics: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy (percent) of every run that finished without diverging."""
    ok = status[status.status == "ok"][["backend", "variant", "seed"]]
    test = metrics[metrics.split == "test"]
    last = test.loc[test.groupby(["backend", "variant", "seed"]).step.idxmax()]
    last = last.merge(ok, on=["backend", "variant", "seed"])
    return last.assign(accuracy_pct=100 * last.accuracy)[["backend", "variant", "seed", "step", "accuracy_pct"]]


def summary_table(metrics: pd.DataFrame, status: pd.DataFrame, experiment: experiments.Experiment | None,
                  variant_order: list[str]) -> pd.DataFrame:
    finals = final_accuracy(metrics, status)
    rows = []
    for variant in variant_order:
        for backend in sorted(status.backend.unique()):
            runs = status[(status.backend == backend) & (status.variant == variant)]
            if runs.empty:
                continue
            acc = finals[(finals.backend == backend) & (finals.variant == variant)].accuracy_pct
            row = {"variant": variant, "backend": backend, "n": len(acc), "diverged": int((runs.status == "diverged").sum()),
                   "mean": acc.mean() if len(acc) else math.nan, "sd": acc.std(ddof=1) if len(acc) > 1 else math.nan}
            paper = experiment.paper_test_accuracy.get(variant) if experiment else None
            if paper:
                low, high = paper.band()
                row.update(paper_mean=paper.mean, paper_sd=paper.sd, band_low=low, band_high=high,
                           within_band=bool(low <= row["mean"] <= high) if len(acc) else False)
            rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean, sd) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.1f} ± {sd:.1f}" if not math.isnan(sd) else f"{mean:.1f}"


def table_markdown(table: pd.DataFrame, title: str) -> str:
    has_paper = "paper_mean" in table
    head = ["method", "backend", "test accuracy % (mean ± sd)", "n", "diverged"]
    if has_paper:
        head += ["paper %", "paper ± 2 sd band", "within band"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        cells = [r.variant, r.backend, _pm(r.mean, r.sd), str(r.n), str(r.diverged)]
        if has_paper:
            if isinstance(getattr(r, "paper_mean"), float) and not math.isnan(r.paper_mean):
                cells += [_pm(r.paper_mean, r.paper_sd), f"[{r.band_low:.1f}, {r.band_high:.1f}]", "yes" if r.within_band else "**no**"]
            else:
                cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_latex(table: pd.DataFrame, title: str) -> str:
    has_paper = "paper_mean" in table
    cols = "llrrr" + ("rr" if has_paper else "")
    head = ["Method", "Backend", "Test acc. (\\%)", "$n$", "Diverged"] + (["Paper (\\%)", "In band"] if has_paper else [])
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{title}}}", f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
             " & ".join(head) + " \\\\", "\\midrule"]
    for r in table.itertuples():
        cells = [r.variant.replace("_", "\\_"), r.backend, _pm(r.mean, r.sd).replace("±", "$\\pm$"), str(r.n), str(r.diverged)]
        if has_paper:
            has = isinstance(r.paper_mean, float) and not math.isnan(r.paper_mean)
            cells += [_pm(r.paper_mean, r.paper_sd).replace("±", "$\\pm$") if has else "--", ("yes" if r.within_band else "no") if has else "--"]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def variant_colors(variants: list[str], normalizations: dict[str, str]) -> dict[str, str]:
    colors, extra = {}, iter(EXTRA_COLORS)
    for v in variants:
        norm = normalizations.get(v, v)
        role = {"none": "none", "standardization_loss": "standardization_loss", "batch_norm_shift": "batch_norm",
                "batch_norm_scale_shift": "batch_norm_scale_shift"}.get(norm)
        colors[v] = METHOD_COLORS.get(v) or (METHOD_COLORS.get(role) if role and role not in [normalizations.get(u) for u in colors] else None) or next(extra)
    return colors


def curves_figure(metrics: pd.DataFrame, status: pd.DataFrame, variant_order: list[str], path_stem: Path, title: str) -> list[Path]:
    """Cross entropy and accuracy against steps, train and test, mean ± sd over seeds; one column per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    ok = status[status.status == "ok"][["backend", "variant", "seed"]]
    data = metrics.merge(ok, on=["backend", "variant", "seed"])
    backends_ = sorted(data.backend.unique())
    norms = dict(zip(metrics.variant, metrics.normalization))
    colors = variant_colors(variant_order, norms)
    fig, axes = plt.subplots(2, len(backends_), figsize=(4.6 * len(backends_), 6.4), squeeze=False, sharex=True)
    for col, backend in enumerate(backends_):
        for row, (metric, label) in enumerate([("cross_entropy", "cross entropy (nats)"), ("accuracy", "accuracy (%)")]):
            ax = axes[row][col]
            for variant in variant_order:
                for split, marker in SPLIT_MARKERS.items():
                    d = data[(data.backend == backend) & (data.variant == variant) & (data.split == split)]
                    if d.empty:
                        continue
                    scale = 100.0 if metric == "accuracy" else 1.0
                    g = d.groupby("step")[metric].agg(["mean", "std"]).reset_index()
                    ax.errorbar(g.step, g["mean"] * scale, yerr=g["std"].fillna(0) * scale, color=colors[variant],
                                marker=marker, markersize=3.5, linewidth=1.1, capsize=1.5,
                                linestyle="-" if split == "test" else ":", label=f"{variant} ({split})",
                                markerfacecolor="white" if split == "train" else colors[variant])
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(backend)
            if row == 1:
                ax.set_xlabel("training step (SGD updates)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def build_report(out: str | Path, experiment_name: str | None = None) -> dict:
    """Rebuild tables and figures of a results directory from its stored metrics."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such results directory")
    meta_path = out / "experiment.json"
    if experiment_name is None and meta_path.exists():
        experiment_name = json.loads(meta_path.read_text()).get("experiment")
    experiment = experiments.EXPERIMENTS.get(experiment_name) if experiment_name else None
    metrics, status = load_runs(out)
    variant_order = list(dict.fromkeys(metrics.variant))
    spec_path = out / "spec.toml"
    if spec_path.exists():
        from normbench import spec as spec_module
        declared = [v.name for v in spec_module.load(spec_path).variants]
        variant_order = [v for v in declared if v in set(metrics.variant)] + [v for v in variant_order if v not in declared]
    title = experiment.title if experiment else f"results in {out.name}"
    table = summary_table(metrics, status, experiment, variant_order)
    runner.collect(out)
    (out / "table.md").write_text(table_markdown(table, title))
    (out / "table.tex").write_text(table_latex(table, title))
    table.to_csv(out / "table.csv", index=False, float_format="%.4f")
    figures = curves_figure(metrics, status, variant_order, out / "curves", title)
    return {"table": table, "markdown": table_markdown(table, title), "figures": figures, "status": status}
