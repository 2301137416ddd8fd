"""The shared report (Figures 1 and 3, and any results without an experiment of their own):
final test accuracy per backend and variant beside the paper's value and band, backend
agreement, and cross entropy and accuracy against steps (`curves.png` / `curves.pdf`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from normbench import stats
from normbench.reporting import plots
from normbench.reporting.runs import final_accuracy
from normbench.reporting.tables import (agreement_markdown, notes_markdown, paper_difference_notes, pm, seeds_note,
                                        with_latex_notes)

FIGURE_STEM = "curves"


def summary_table(metrics: pd.DataFrame, status: pd.DataFrame, experiment, variant_order: list[str]) -> pd.DataFrame:
    """Final test accuracy, mean ± sd over seeds, per variant and backend (and the paper's
    value and band where `experiment` states one)."""
    finals = final_accuracy(metrics, status)
    rows = []
    for variant in variant_order:
        for backend in plots.backend_order(status.backend.unique()):
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


def table_markdown(table: pd.DataFrame, title: str) -> str:
    has_paper = "paper_mean" in table
    head = ["method", "backend", "test accuracy % (mean ± sd)", "n", "diverged"]
    if has_paper:
        head += ["paper %", "paper ± 2 sd band", "within band"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        cells = [r.variant, r.backend, pm(r.mean, r.sd), str(r.n), str(r.diverged)]
        if has_paper:
            if isinstance(getattr(r, "paper_mean"), float) and not math.isnan(r.paper_mean):
                cells += [pm(r.paper_mean, r.paper_sd), f"[{r.band_low:.1f}, {r.band_high:.1f}]", "yes" if r.within_band else "**no**"]
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
        cells = [r.variant.replace("_", "\\_"), r.backend, pm(r.mean, r.sd).replace("±", "$\\pm$"), str(r.n), str(r.diverged)]
        if has_paper:
            has = isinstance(r.paper_mean, float) and not math.isnan(r.paper_mean)
            cells += [pm(r.paper_mean, r.paper_sd).replace("±", "$\\pm$") if has else "--", ("yes" if r.within_band else "no") if has else "--"]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def curves_figure(metrics: pd.DataFrame, status: pd.DataFrame, variant_order: list[str], colors: dict[str, str],
                  path_stem: Path, title: str) -> list[Path]:
    """Cross entropy and accuracy against steps, train and test, mean ± sd over seeds; one column per backend."""
    plt = plots.pyplot()
    ok = status[status.status == "ok"][["backend", "variant", "seed"]]
    data = metrics.merge(ok, on=["backend", "variant", "seed"])
    backends_ = plots.backend_order(status.backend.unique())  # also a backend whose every run diverged
    # Shared y per row: backends side by side are read against one scale.
    fig, axes = plt.subplots(2, len(backends_), figsize=(4.6 * len(backends_), 6.4), squeeze=False, sharex=True, sharey="row")
    for col, backend in enumerate(backends_):
        for row, (metric, label) in enumerate([("cross_entropy", "cross entropy (nats)"), ("accuracy", "accuracy (%)")]):
            ax = axes[row][col]
            for variant in variant_order:
                for split, marker in plots.SPLIT_MARKERS.items():
                    d = data[(data.backend == backend) & (data.variant == variant) & (data.split == split)]
                    if d.empty:
                        continue
                    scale = 100.0 if metric == "accuracy" else 1.0
                    g = d.groupby("step")[metric].agg(["mean", "std"]).reset_index()
                    ax.errorbar(g.step, g["mean"] * scale, yerr=g["std"].fillna(0) * scale, color=colors[variant],
                                marker=marker, markersize=3.5, linewidth=1.1, capsize=1.5,
                                linestyle="-" if split == "test" else ":", label=f"{variant} ({split})",
                                markerfacecolor="white" if split == "train" else colors[variant])
            if col == 0:  # the y scale is shared along the row
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(backend)
            if row == 1:
                ax.set_xlabel("training step (SGD updates)")
        # Diverged runs are not drawn (their curves end in NaN) but always said, per method.
        mine = status[status.backend == backend]
        diverged = [f"{v}: {int(((mine.variant == v) & (mine.status == 'diverged')).sum())} of {int((mine.variant == v).sum())}"
                    for v in variant_order if ((mine.variant == v) & (mine.status == "diverged")).any()]
        if diverged:
            axes[0][col].text(0.98, 0.98, "diverged, not drawn:\n" + "\n".join(diverged), transform=axes[0][col].transAxes,
                              ha="right", va="top", fontsize=7, color="#B00000",
                              bbox=dict(facecolor="white", alpha=0.85, edgecolor="#B00000", linewidth=0.6))
    handles, labels = plots.legend_entries(axes.flat)  # every panel: a backend may lack a method; none when all diverged
    return plots.finish(fig, path_stem, title, title_width=4.6 * len(backends_), handles=handles, labels=labels,
                        max_columns=3, bottom=0.08, top=0.97, title_size=10)


def report(results) -> dict:
    """Table (with backend agreement when several backends ran) and the curves figure."""
    experiment, metrics, status = results.experiment, results.metrics, results.status
    table = summary_table(metrics, status, experiment, results.variant_order)
    diffs = [{"variant": r.variant, "backend": r.backend, "mean": r.mean, "sd": r.sd,
              "paper": experiment.paper_test_accuracy.get(r.variant) if experiment else None} for r in table.itertuples()]
    notes = [seeds_note(status), *paper_difference_notes(diffs), *(experiment.notes if experiment else ())]
    markdown = table_markdown(table, results.title) + notes_markdown(notes)
    if status.backend.nunique() > 1:  # do the backends' seed distributions agree? (issue: cross-backend statistics)
        agreement = stats.backend_agreement(final_accuracy(metrics, status), results.variant_order)
        agreement.to_csv(results.out / "agreement.csv", index=False, float_format="%.6g")
        markdown += agreement_markdown(agreement)
    latex = with_latex_notes(table_latex(table, results.title), notes)
    figures = curves_figure(metrics, status, results.variant_order, results.colors(results.variant_order),
                            results.out / FIGURE_STEM, results.title)
    return {"table": table, "markdown": markdown, "latex": latex, "figures": figures}
