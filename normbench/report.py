"""Tables and figures from a results directory's stored metrics (never from training).

`build_report(out_dir)` reads every finished run under <out>/runs/, and writes
    table.md / table.tex / table.csv   final test accuracy, mean ± sd over seeds, per backend
                                       and variant, beside the paper's value and band
    curves.png / curves.pdf            cross entropy and accuracy against steps (Figure 1 style)
Diverged runs are counted and listed, never averaged into a mean.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from normbench import experiments, runner, stats
from normbench import spec as spec_module

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
    from normbench.figures import backend_order

    finals = final_accuracy(metrics, status)
    rows = []
    for variant in variant_order:
        for backend in backend_order(status.backend.unique()):
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
    from normbench import figures as figures_module

    backends_ = figures_module.backend_order(status.backend.unique())  # also a backend whose every run diverged
    norms = dict(zip(metrics.variant, metrics.normalization))
    colors = variant_colors(variant_order, norms)
    # Shared y per row: backends side by side are read against one scale.
    fig, axes = plt.subplots(2, len(backends_), figsize=(4.6 * len(backends_), 6.4), squeeze=False, sharex=True, sharey="row")
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
    handles, labels = figures_module.legend_entries(axes.flat)  # every panel: a backend may lack a method
    if labels:  # none when every run diverged
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(figures_module.wrap_title(title, 4.6 * len(backends_)), fontsize=10)
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
    variant_order = list(dict.fromkeys([*metrics.variant, *status.variant]))  # status: also runs with no finite row
    spec_path = out / "spec.toml"
    if spec_path.exists():
        ran = spec_module.load(spec_path)  # the resolved spec the runs were made with
        declared = [v.name for v in ran.variants]
        variant_order = [v for v in declared if v in set(variant_order)] + [v for v in variant_order if v not in declared]
        if experiment is not None:
            experiment = _with_budget_override(experiment, ran)
    title = experiment.title if experiment else f"results in {out.name}"
    runner.collect(out)
    kind = experiment.kind if experiment else "curves"
    if kind in KIND_REPORTS:  # Figures 2 and 4: their own tables and figures
        built = KIND_REPORTS[kind](out, experiment, metrics, status, variant_order, title)
        (out / "table.md").write_text(built["markdown"])
        (out / "table.tex").write_text(built["latex"])
        built["table"].to_csv(out / "table.csv", index=False, float_format="%.4f")
        return {**built, "status": status}
    table = summary_table(metrics, status, experiment, variant_order)
    diffs = [{"variant": r.variant, "backend": r.backend, "mean": r.mean, "sd": r.sd,
              "paper": experiment.paper_test_accuracy.get(r.variant) if experiment else None} for r in table.itertuples()]
    notes = [seeds_note(status), *paper_difference_notes(diffs), *(experiment.notes if experiment else ())]
    markdown = table_markdown(table, title) + notes_markdown(notes)
    if status.backend.nunique() > 1:  # do the backends' seed distributions agree? (issue: cross-backend statistics)
        agreement = stats.backend_agreement(final_accuracy(metrics, status), variant_order)
        agreement.to_csv(out / "agreement.csv", index=False, float_format="%.6g")
        markdown += agreement_markdown(agreement)
    (out / "table.md").write_text(markdown)
    (out / "table.tex").write_text(_with_latex_notes(table_latex(table, title), notes))
    table.to_csv(out / "table.csv", index=False, float_format="%.4f")
    figures = curves_figure(metrics, status, variant_order, out / "curves", title)
    return {"table": table, "markdown": markdown, "figures": figures, "status": status}


def _with_budget_override(experiment, ran):
    """`experiment` as the runs in `ran` (their resolved spec) can honestly be reported:
    when `--steps` changed the training budget, the title says so and the paper's
    numbers, all stated for the experiment's own budget, are not compared."""
    planned = spec_module.load(experiment.spec)
    budgets = lambda s: [s.steps_for(v) for v in s.variants]
    if budgets(ran) == budgets(planned):
        return experiment
    note = (f"**Training budget overridden** (`--steps {ran.steps}`): these runs are not the experiment's "
            f"{planned.steps}-step budget, so its title's step count does not apply and the paper's numbers are not "
            "compared; run without `--steps` to reproduce the paper's setting.")
    return dataclasses.replace(experiment, title=f"{experiment.title} [budget overridden: {ran.steps} steps]",
                               paper_test_accuracy={}, notes=(note, *experiment.notes))


def _agreement_verdict(agree) -> str:
    if agree is None or (isinstance(agree, float) and math.isnan(agree)):
        return "n/a (needs 2 runs a side)"
    return "yes" if agree else "**no**"


def agreement_markdown(agreement: pd.DataFrame) -> str:
    lines = ["", f"**Backend agreement**: final test accuracy, two-sided Welch t-test per method and backend pair; "
             f"the backends agree when p >= {stats.AGREEMENT_ALPHA:g}.", "",
             "| method | backends | means (%) | n | Welch t | p | agree |", "|---|---|---|---|---|---|---|"]
    for r in agreement.itertuples():
        lines.append(f"| {r.variant} | {r.pair} | {r.mean_left:.2f} vs {r.mean_right:.2f} | {r.n_left} vs {r.n_right} | "
                     f"{r.welch_t:.3g} | {r.p_value:.3g} | {_agreement_verdict(r.agree)} |")
    return "\n".join(lines) + "\n"


# ============================================================================= experiment reports
# Figures 2 and 4 (and the notes, provenance and index shared by every experiment).
# `build_report` dispatches here on the experiment's `kind`; figure drawing lives in
# normbench/figures.py.

FIGURE_STEMS = {"curves": "curves", "regularization": "cross_entropy_vs_accuracy",
                "weight_sweep": "accuracy_vs_weight", "features": "percentiles"}
# Collapse of the weight sweep, fixed before any sweep was run (and stated in its table).
COLLAPSE_RULE = ("a weight has *collapsed* when the mean test accuracy of its runs that finished is below the mean of the "
                 "no-normalization variant (the loss then does worse than no normalization at all), or when more than "
                 "half of its runs diverged; the collapse *starts* at the smallest weight above the best weight (highest "
                 "mean) that has collapsed")
PAPER_STEPS = 1000  # the budget of every number the paper states for MNIST (Section 4.1)
PAPER_MAX_WEIGHT = 10.0  # the largest standardization-loss weight the paper swept (Section 4.1)
DROP_POINTS = 10.0  # a second, looser reading: the first weight above the best whose mean is this far below the best
INDEX_NAME = "README.md"


def _is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(mean, sd=None, digits: int = 1) -> str:
    if _is_missing(mean):
        return "n/a"
    if sd is None or _is_missing(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _mean_sd(values) -> tuple[float, float]:
    values = pd.Series(values, dtype=float).dropna()
    return (values.mean() if len(values) else math.nan), (values.std(ddof=1) if len(values) > 1 else math.nan)


def _latex_escape(text: str) -> str:
    text = str(text)
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("~", "\\textasciitilde{}"), ("^", "\\textasciicircum{}")):
        text = text.replace(a, b)
    text = text.replace("**", "").replace("*", "").replace("`", "")
    return (text.replace("±", "$\\pm$").replace("≥", "$\\geq$").replace("≤", "$\\leq$").replace("×", "$\\times$")
            .replace("Δ", "$\\Delta$").replace("—", "--").replace("→", "$\\rightarrow$").replace("−", "$-$")
            .replace("…", "\\ldots{}"))


def render_markdown(title: str, head: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n" + notes_markdown(notes)


def render_latex(title: str, head: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_latex_escape(title)}}}",
             f"\\begin{{tabular}}{{l{'r' * (len(head) - 1)}}}", "\\toprule",
             " & ".join(_latex_escape(h) for h in head) + " \\\\", "\\midrule"]
    lines += [" & ".join(_latex_escape(c) for c in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [_latex_notes(notes), "\\end{table}"] if notes else ["\\end{table}"]
    return "\n".join(lines) + "\n"


def notes_markdown(notes) -> str:
    notes = [n for n in notes if n]
    return ("\n" + "\n".join(f"- {n}" for n in notes) + "\n") if notes else ""


def _latex_notes(notes) -> str:
    notes = [n for n in notes if n]
    return "\\par\\smallskip\\footnotesize\n" + "\n".join(f"{_latex_escape(n)}\\par" for n in notes) if notes else ""


def _with_latex_notes(latex: str, notes) -> str:
    block = _latex_notes(notes)
    return latex.replace("\\end{table}", block + "\n\\end{table}") if block else latex


def seeds_note(status: pd.DataFrame, paper_runs: str = "the paper's Section 4.1 numbers are over 10 runs") -> str:
    """How many seeds each variant and backend ran, stated (never implied)."""
    counts = status.groupby(["backend", "variant"]).seed.nunique()
    seeds = sorted(status.seed.unique())
    if len(seeds) == 1:
        span = f"seed {seeds[0]}"
    else:
        span = f"seeds {seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else f"seeds {seeds}"
    if counts.nunique() == 1:
        n = int(counts.iloc[0])
        how_many = f"{n} seed{'s' if n != 1 else ''} per variant and backend ({span})"
    else:
        how_many = "seeds per variant and backend: " + ", ".join(f"{b}/{v} {int(n)}" for (b, v), n in counts.items())
    diverged = int((status.status == "diverged").sum())
    return (f"{how_many}; {paper_runs}. n counts the runs that finished without diverging; "
            f"diverged runs ({diverged} here) are counted, never averaged.")


def paper_difference_notes(rows: list[dict]) -> list[str]:
    """Plain sentences for every number outside the paper's ± 2 sd band."""
    out = []
    for r in rows:
        paper = r.get("paper")
        if paper is None:
            continue
        low, high = paper.band()
        if _is_missing(r["mean"]):
            out.append(f"**Differs from the paper:** {r['variant']} on {r['backend']} has no finished run; the paper "
                       f"reports {_fmt(paper.mean, paper.sd)}% ({paper.where}).")
        elif not low <= r["mean"] <= high:
            side = "above" if r["mean"] > high else "below"
            out.append(f"**Differs from the paper:** {r['variant']} on {r['backend']}: {_fmt(r['mean'], r['sd'])}% "
                       f"against the paper's {_fmt(paper.mean, paper.sd)}% ({paper.where}), {side} the paper's "
                       f"± 2 sd band [{low:.1f}, {high:.1f}].")
    return out


def _paper_cells(paper, mean) -> list[str]:
    if paper is None:
        return ["—", "—"]
    low, high = paper.band()
    inside = not _is_missing(mean) and low <= mean <= high
    return [f"{_fmt(paper.mean, paper.sd)} ({paper.where})", "yes" if inside else "**no**"]


def load_percentiles(out: Path, status: pd.DataFrame) -> pd.DataFrame:
    """Percentile rows of every finished run that tracked layers (diverged runs included)."""
    frames = [pd.read_csv(d / "percentiles.csv") for d in runner.finished_run_dirs(out) if (d / "percentiles.csv").exists()]
    columns = runner.PERCENTILE_COLUMNS
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _ok_only(frame: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    ok = status[status.status == "ok"][["backend", "variant", "seed"]]
    return frame.merge(ok, on=["backend", "variant", "seed"])


def _at_step(metrics: pd.DataFrame, split: str, step: int | None = None) -> pd.DataFrame:
    """One row per run: its evaluation at `step` (default: its last evaluation)."""
    d = metrics[metrics.split == split]
    if step is None:
        return d.loc[d.groupby(["backend", "variant", "seed"]).step.idxmax()]
    return d[d.step == step]


def _reference_curve(metrics: pd.DataFrame, backend: str, variant: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A variant's mean test trajectory as (cross entropy, accuracy %) sorted by cross entropy."""
    d = metrics[(metrics.backend == backend) & (metrics.variant == variant) & (metrics.split == "test")]
    if d.empty:
        return None
    g = d.groupby("step")[["cross_entropy", "accuracy"]].mean().sort_values("cross_entropy")
    return g.cross_entropy.to_numpy(), 100 * g.accuracy.to_numpy()


def accuracy_at_equal_cross_entropy(curve, cross_entropy: float) -> float:
    """Accuracy (%) of a reference trajectory at the given test cross entropy (linear
    interpolation); NaN outside the range the reference trajectory covers."""
    if curve is None or _is_missing(cross_entropy):
        return math.nan
    ce, acc = curve
    if not ce.min() <= cross_entropy <= ce.max():
        return math.nan
    return float(np.interp(cross_entropy, ce, acc))


# ----------------------------------------------------------------------------- Figure 2 top

# The paper's reading of Figure 2 (top), Section 4.1: the standardization loss's points lie
# "a slight upward shift with respect to BN but not the baseline model".
PAPER_UPWARD_SHIFT = {"batch_norm": True, "none": False}


def _shift_direction(mean: float, sd: float) -> str:
    """'upward' / 'downward' when the mean shift is larger than its seed-to-seed sd, else 'none'."""
    if _is_missing(mean):
        return "unknown"
    spread = 0.0 if _is_missing(sd) else sd
    return "upward" if mean > spread else "downward" if mean < -spread else "none"


def regularization_verdicts(table: pd.DataFrame, references: dict) -> list[str]:
    """One sentence per backend: the standardization loss's shift at equal cross entropy
    against each reference, beside the paper's reading, and whether they agree."""
    if table.empty:
        return []
    out = []
    sl = table[table.variant.map(lambda v: "standardization" in v or v.startswith("std_loss"))]
    for r in sl.itertuples():
        parts, differs = [], False
        for role, ref in references.items():
            if ref is None or not hasattr(r, f"delta_vs_{ref}"):
                continue
            mean, sd = getattr(r, f"delta_vs_{ref}"), getattr(r, f"delta_vs_{ref}_sd")
            seen = _shift_direction(mean, sd)
            expected = "upward" if PAPER_UPWARD_SHIFT[role] else "none"
            differs |= seen != expected
            parts.append(f"vs {ref} {_fmt(mean, sd)} points ({seen}; paper: {expected})")
        if parts:
            verdict = "**Differs from the paper**" if differs else "Agrees with the paper"
            out.append(f"{verdict} on {r.backend}: the standardization loss's shift at equal test cross entropy, "
                       + "; ".join(parts) + ". A shift counts when its mean exceeds its sd over runs.")
    return out


def regularization_report(out: Path, experiment, metrics: pd.DataFrame, status: pd.DataFrame,
                          variant_order: list[str], title: str) -> dict:
    from normbench import figures

    ok = _ok_only(metrics, status)
    norms = dict(zip(metrics.variant, metrics.normalization))
    colors = variant_colors(variant_order, norms)
    final_steps = ok.groupby("variant").step.max()
    common = int(final_steps.min()) if len(final_steps) else None
    references = {role: next((v for v in variant_order if norms.get(v) == n), None)
                  for role, n in (("none", "none"), ("batch_norm", "batch_norm_shift"))}
    refs = [(role, v) for role, v in references.items() if v is not None]
    head = ["method", "backend", "steps", "n", "diverged", "test cross entropy (nats)", "test accuracy %",
            "train cross entropy (nats)", "train accuracy %"]
    head += [f"Δ test accuracy vs {v} at equal test CE (points)" for _, v in refs]
    head += ["paper test accuracy %", "within paper ± 2 sd"]
    rows, records, diffs = [], [], []
    for variant in variant_order:
        last = int(final_steps.get(variant, 0)) if variant in final_steps else None
        checkpoints = [s for s in (common, last) if s is not None]
        for backend in figures.backend_order(status.backend.unique()):
            runs = status[(status.backend == backend) & (status.variant == variant)]
            if runs.empty:
                continue
            for step in dict.fromkeys(checkpoints):
                if step is None or (step != last and step != common):
                    continue
                mine = ok[(ok.backend == backend) & (ok.variant == variant)]
                test, train = _at_step(mine, "test", step), _at_step(mine, "train", step)
                te_ce, te_acc = _mean_sd(test.cross_entropy), _mean_sd(100 * test.accuracy)
                tr_ce, tr_acc = _mean_sd(train.cross_entropy), _mean_sd(100 * train.accuracy)
                record = {"variant": variant, "backend": backend, "step": step, "n": len(test),
                          "diverged": int((runs.status == "diverged").sum()),
                          "test_cross_entropy": te_ce[0], "test_cross_entropy_sd": te_ce[1],
                          "test_accuracy": te_acc[0], "test_accuracy_sd": te_acc[1],
                          "train_cross_entropy": tr_ce[0], "train_cross_entropy_sd": tr_ce[1],
                          "train_accuracy": tr_acc[0], "train_accuracy_sd": tr_acc[1]}
                cells = [variant, backend, str(step), str(len(test)), str(record["diverged"]), _fmt(*te_ce, digits=3),
                         _fmt(*te_acc), _fmt(*tr_ce, digits=3), _fmt(*tr_acc)]
                for _, ref in refs:
                    if ref == variant:
                        cells.append("—")
                        continue
                    curve = _reference_curve(ok[ok.backend == backend], backend, ref)
                    shifts = [100 * r.accuracy - accuracy_at_equal_cross_entropy(curve, r.cross_entropy) for r in test.itertuples()]
                    shift = _mean_sd(shifts)
                    in_range = sum(not _is_missing(x) for x in shifts)
                    record[f"delta_vs_{ref}"], record[f"delta_vs_{ref}_sd"] = shift
                    record[f"delta_vs_{ref}_n"] = in_range
                    if _is_missing(shift[0]):
                        cells.append("outside its range")
                    else:  # say when only some runs' cross entropies fall inside the reference's range
                        cells.append(_fmt(*shift) + (f" ({in_range} of {len(shifts)} runs in range)" if in_range < len(shifts) else ""))
                # The paper's numbers (Section 4.1) are for 1000 steps: shown only beside 1000-step rows.
                paper = experiment.paper_test_accuracy.get(variant) if experiment and step == PAPER_STEPS else None
                cells += _paper_cells(paper, te_acc[0])
                if paper is not None:
                    record.update(paper_mean=paper.mean, paper_sd=paper.sd)
                    diffs.append({"variant": f"{variant} at {step} steps", "backend": backend, "mean": te_acc[0],
                                  "sd": te_acc[1], "paper": paper})
                rows.append(cells)
                records.append(record)
    table = pd.DataFrame(records)
    verdicts = regularization_verdicts(table, references)
    notes = [
        *verdicts,
        "Δ test accuracy at equal test CE (cross entropy): each run's accuracy minus the reference's mean test trajectory "
        "(linearly interpolated) at the run's own test cross entropy, mean ± sd over the runs whose cross entropy the "
        "reference's trajectory reaches (how many, when not all). Positive = more accuracy for the same cross entropy, "
        "i.e. a regularization effect; \"outside its range\" = the reference never reached that cross entropy.",
        seeds_note(status), *paper_difference_notes(diffs), *(experiment.notes if experiment else ()),
    ]
    figs = figures.regularization_figure(ok, variant_order, colors, common, out / FIGURE_STEMS["regularization"], title)
    return {"table": table, "markdown": render_markdown(title, head, rows, notes),
            "latex": render_latex(title, head, rows, notes), "figures": figs}


# ----------------------------------------------------------------------------- Figure 2 bottom


def collapse_analysis(points: pd.DataFrame, baseline_mean: float) -> dict:
    """Apply COLLAPSE_RULE to one backend's sweep.

    points: one row per weight with columns weight, mean (NaN if no run finished),
    n (finished runs) and diverged (diverged runs).
    """
    points = points.sort_values("weight").reset_index(drop=True)
    finite = points.dropna(subset=["mean"])
    if finite.empty:
        return {"best_weight": None, "best_mean": math.nan, "onset": None, "drop_onset": None, "collapsed": {}}
    best = finite.loc[finite["mean"].idxmax()]
    mostly_diverged = points.diverged > (points.n + points.diverged) / 2
    below = points["mean"].isna() | (points["mean"] < baseline_mean) if not _is_missing(baseline_mean) else points["mean"].isna()
    above = points.weight > best.weight
    # Only weights above the best can collapse: a small weight below the baseline is too weak to help, not a collapse.
    collapsed = (below | mostly_diverged) & above
    dropped = (points["mean"].isna() | (points["mean"] < best["mean"] - DROP_POINTS) | mostly_diverged) & above
    onset = points.weight[collapsed]
    drop_onset = points.weight[dropped]
    return {"best_weight": float(best.weight), "best_mean": float(best["mean"]),
            "onset": float(onset.iloc[0]) if len(onset) else None,
            "drop_onset": float(drop_onset.iloc[0]) if len(drop_onset) else None,
            "collapsed": dict(zip(points.weight.astype(float), collapsed.astype(bool)))}


def weight_sweep_report(out: Path, experiment, metrics: pd.DataFrame, status: pd.DataFrame,
                        variant_order: list[str], title: str) -> dict:
    from normbench import figures

    norms = dict(zip(metrics.variant, metrics.normalization))
    weights = dict(zip(metrics.variant, metrics.std_loss_weight))
    sweep = sorted((v for v in variant_order if norms.get(v) == "standardization_loss"), key=lambda v: weights[v])
    reference = [v for v in variant_order if v not in sweep]
    colors = variant_colors(reference, norms)
    colors["standardization_loss"] = METHOD_COLORS["standardization_loss"]
    finals = _at_step(_ok_only(metrics, status), "test").assign(accuracy_pct=lambda d: 100 * d.accuracy)
    final_step = int(finals.step.max()) if len(finals) else None
    none_variant = next((v for v in reference if norms.get(v) == "none"), None)
    head = ["method", "backend", "weight", "n", "diverged", "test accuracy % (mean ± sd)", "Δ from best (points)",
            "collapsed (rule below)", "paper test accuracy %", "within paper ± 2 sd"]
    rows, records, diffs, summaries, onsets = [], [], [], [], {}
    for backend in figures.backend_order(status.backend.unique()):
        mine = finals[finals.backend == backend]
        runs = status[status.backend == backend]
        baseline = mine[mine.variant == none_variant].accuracy_pct.mean() if none_variant else math.nan
        points = pd.DataFrame([{"weight": float(weights[v]), "variant": v,
                                "mean": mine[mine.variant == v].accuracy_pct.mean() if (mine.variant == v).any() else math.nan,
                                "sd": mine[mine.variant == v].accuracy_pct.std(ddof=1) if (mine.variant == v).sum() > 1 else math.nan,
                                "n": int((mine.variant == v).sum()),
                                "diverged": int(((runs.variant == v) & (runs.status == "diverged")).sum())}
                               for v in sweep if (runs.variant == v).any()])
        analysis = collapse_analysis(points, baseline) if len(points) else collapse_analysis(
            pd.DataFrame(columns=["weight", "mean", "n", "diverged"]), baseline)
        onsets[backend] = analysis["onset"]
        for v in reference:
            r = mine[mine.variant == v].accuracy_pct
            if not (runs.variant == v).any():
                continue
            mean, sd = _mean_sd(r)
            # The paper's numbers (Section 4.1) are for 1000 steps: compared only after 1000 steps.
            paper = experiment.paper_test_accuracy.get(v) if experiment and final_step == PAPER_STEPS else None
            rows.append([v, backend, "—", str(len(r)), str(int(((runs.variant == v) & (runs.status == "diverged")).sum())),
                         _fmt(mean, sd), "—", "—", *_paper_cells(paper, mean)])
            records.append({"variant": v, "backend": backend, "weight": math.nan, "n": len(r), "mean": mean, "sd": sd})
            diffs.append({"variant": v, "backend": backend, "mean": mean, "sd": sd, "paper": paper})
        for p in points.itertuples():
            paper = experiment.paper_test_accuracy.get(p.variant) if experiment and final_step == PAPER_STEPS else None
            delta = p.mean - analysis["best_mean"]
            is_collapsed = analysis["collapsed"].get(float(p.weight), False)
            rows.append([p.variant, backend, f"{p.weight:g}", str(p.n), str(p.diverged), _fmt(p.mean, p.sd),
                         _fmt(delta) if not _is_missing(delta) else "n/a", "**yes**" if is_collapsed else "no",
                         *_paper_cells(paper, p.mean)])
            records.append({"variant": p.variant, "backend": backend, "weight": p.weight, "n": p.n, "diverged": p.diverged,
                            "mean": p.mean, "sd": p.sd, "delta_from_best": delta, "collapsed": is_collapsed})
            diffs.append({"variant": p.variant, "backend": backend, "mean": p.mean, "sd": p.sd, "paper": paper})
        if analysis["best_weight"] is None:
            summaries.append(f"**{backend}:** no standardization-loss run finished.")
            continue
        text = (f"**{backend}:** best weight {analysis['best_weight']:g} ({_fmt(analysis['best_mean'])}%); "
                f"no-normalization mean {_fmt(baseline)}%. ")
        if analysis["onset"] is not None:
            at = points[points.weight == analysis["onset"]].iloc[0]
            total = int(at.n + at.diverged)
            what = (f"all {total} runs diverged" if int(at.n) == 0 else
                    f"mean {_fmt(at['mean'])}%, {int(at.diverged)} of {total} runs diverged")
            text += f"**The collapse starts at weight {analysis['onset']:g}** ({what}). "
            if analysis["onset"] > PAPER_MAX_WEIGHT:
                text += (f"That is beyond the paper's range [0.001, {PAPER_MAX_WEIGHT:g}], within which it reports the "
                         "collapse (read literally); within that range, accuracy does not collapse here. ")
        else:
            text += "No weight above the best collapsed (by the rule below). "
            if analysis["best_weight"] is not None and len(points):
                text += (f"**Differs from the paper:** it reports that \"beyond a particular weighting the predictive "
                         f"performance collapsed\"; here accuracy holds up to the largest weight tried, "
                         f"{points.weight.max():g}. ")
        text += (f"A drop of more than {DROP_POINTS:g} points below the best starts at weight {analysis['drop_onset']:g}."
                 if analysis["drop_onset"] is not None else f"No weight above the best drops more than {DROP_POINTS:g} points below it.")
        summaries.append(text)
    table = pd.DataFrame(records)
    notes = [*summaries, f"Collapse rule: {COLLAPSE_RULE}.", seeds_note(status), *paper_difference_notes(diffs),
             *(experiment.notes if experiment else ())]
    std_runs = finals[finals.variant.isin(sweep)].assign(weight=lambda d: d.variant.map(weights).astype(float))
    ref_runs = finals[finals.variant.isin(reference)]
    div = status[status.variant.isin(sweep)].assign(weight=lambda d: d.variant.map(weights).astype(float),
                                                    count=lambda d: (d.status == "diverged").astype(int))
    div = div.groupby(["backend", "weight"], as_index=False)["count"].sum()
    paper_points = {float(weights[v]): (pv.mean, pv.sd) for v, pv in (experiment.paper_test_accuracy.items() if experiment else ())
                    if v in sweep and final_step == PAPER_STEPS}
    figs = figures.weight_sweep_figure(std_runs, ref_runs, div, onsets, final_step, colors,
                                       out / FIGURE_STEMS["weight_sweep"], title, paper_points)
    return {"table": table, "markdown": render_markdown(title, head, rows, notes),
            "latex": render_latex(title, head, rows, notes), "figures": figs}


# ----------------------------------------------------------------------------- Figure 4


def features_report(out: Path, experiment, metrics: pd.DataFrame, status: pd.DataFrame,
                    variant_order: list[str], title: str) -> dict:
    from normbench import figures

    norms = dict(zip(metrics.variant, metrics.normalization))
    colors = variant_colors(variant_order, norms)
    percentiles = _ok_only(load_percentiles(out, status), status)
    ok = _ok_only(metrics, status)
    panels = figures.feature_panel_order(variant_order, norms)
    layer = next(iter(dict.fromkeys(percentiles.layer)), None)
    steps = sorted(percentiles.step.unique()) if len(percentiles) else []
    last = steps[-1] if steps else 0
    wanted = [0, 1000, last / 2, last]
    checkpoints = list(dict.fromkeys(min(steps, key=lambda s: abs(s - w)) for w in wanted)) if steps else []
    qs = sorted(percentiles.percentile.unique()) if len(percentiles) else list(runner.PERCENTILES)
    head = ["method", "backend", "step", "n", "test accuracy %"] + [f"{figures.ordinal(int(q))} pct." for q in qs]
    head += [f"{figures.ordinal(int(qs[-1]))} − {figures.ordinal(int(qs[0]))}"]
    rows, records, widths = [], [], []
    for variant in panels:
        for backend in figures.backend_order(status.backend.unique()):
            if not ((status.backend == backend) & (status.variant == variant)).any():
                continue
            p = percentiles[(percentiles.backend == backend) & (percentiles.variant == variant) & (percentiles.layer == layer)]
            widths_here = []
            for step in checkpoints:
                at = p[p.step == step]
                test = ok[(ok.backend == backend) & (ok.variant == variant) & (ok.split == "test") & (ok.step == step)]
                acc = _mean_sd(100 * test.accuracy)
                per_q = {q: _mean_sd(at[at.percentile == q].value) for q in qs}
                wide = at.pivot_table(index="seed", columns="percentile", values="value")
                width = _mean_sd(wide[qs[-1]] - wide[qs[0]]) if len(wide) else (math.nan, math.nan)
                widths_here.append((int(step), width[0]))
                rows.append([variant, backend, str(int(step)), str(at.seed.nunique()), _fmt(*acc),
                             *[_fmt(*per_q[q], digits=2) for q in qs], _fmt(*width, digits=2)])
                records.append({"variant": variant, "backend": backend, "step": int(step), "n": at.seed.nunique(),
                                "test_accuracy": acc[0], "test_accuracy_sd": acc[1],
                                **{f"p{int(q)}": per_q[q][0] for q in qs}, **{f"p{int(q)}_sd": per_q[q][1] for q in qs},
                                "width": width[0], "width_sd": width[1]})
            known = [(step, w) for step, w in widths_here if not _is_missing(w)]
            if len(known) >= 2:
                # From the first checkpoint after training began (step 0 is only the initialization's scale).
                (s0, w0), (s1, w1) = known[1] if len(known) > 2 else known[0], known[-1]
                ratio = f" (× {w1 / w0:.2f} from step {s0} to step {s1})" if w0 else ""
                widths.append(f"{variant} ({backend}): " + " → ".join(f"{w:.2f}" for _, w in known) + ratio)
    table = pd.DataFrame(records)
    notes = [f"Percentiles of {layer} pre-activations on the test set (mean ± sd over seeds), at the evaluation steps "
             f"nearest 0, 1000, half-way and the end; the figure shows every evaluation.",
             (f"Spread over training, the {figures.ordinal(int(qs[-1]))} − {figures.ordinal(int(qs[0]))} percentile width "
              f"at steps {', '.join(str(int(c)) for c in checkpoints)}: " + "; ".join(widths) + ".") if widths else "",
             seeds_note(status, "the paper does not say how many runs Figure 4 shows"),
             *(experiment.notes if experiment else ())]
    figs = figures.percentiles_figure(percentiles, variant_order, norms, colors, out / FIGURE_STEMS["features"], title)
    return {"table": table, "markdown": render_markdown(title, head, rows, notes),
            "latex": render_latex(title, head, rows, notes), "figures": figs}


KIND_REPORTS = {"regularization": regularization_report, "weight_sweep": weight_sweep_report,
                "features": features_report}


# ----------------------------------------------------------------------------- results index


def run_records(out: Path) -> list[dict]:
    return [json.loads((d / "provenance.json").read_text()) for d in runner.finished_run_dirs(out)]


def _parse_time(text: str | None):
    import datetime as dt
    try:
        return dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s"


def compute_summary(records: list[dict]) -> str:
    """How long the runs took, and on which machine (from each run's provenance)."""
    if not records:
        return "No finished runs."
    walls, starts, ends = [], [], []
    for r in records:
        a, b = _parse_time(r.get("started")), _parse_time(r.get("finished"))
        if a and b:
            walls.append((b - a).total_seconds())
            starts.append(a)
            ends.append(b)
    train = sum(float(r.get("train_time_s") or 0.0) for r in records)
    per_backend = pd.Series([r["backend"] for r in records]).value_counts().sort_index()
    machines = sorted({f"{r.get('hostname', '?')}: {r.get('cpu', '?')}, {r.get('cpu_count', '?')} cores, "
                       f"device {r.get('device', '?')}" for r in records})
    text = (f"{len(records)} runs ({', '.join(f'{b} {n}' for b, n in per_backend.items())}); "
            f"{_duration(sum(walls))} of run wall time (each run's start to finish, evaluations included; "
            f"{_duration(train)} in training steps alone)")
    if starts:
        text += f", run between {min(starts):%Y-%m-%d %H:%M} and {max(ends):%Y-%m-%d %H:%M} UTC"
    text += f", on {'; '.join(machines)}."
    text += " Wall-clock times on that machine as loaded at the time: a record of cost, not a benchmark of the methods."
    return text


def provenance_summary(records: list[dict]) -> str:
    if not records:
        return ""
    commits = sorted({(r.get("git_commit") or "unknown")[:12] + (" with uncommitted changes" if r.get("git_dirty") else "")
                      for r in records})
    versions = {}
    for r in records:
        for k, v in (r.get("framework_versions") or {}).items():
            versions.setdefault(k, set()).add(v)
    for key in ("normbench_version", "python", "numpy"):
        versions.setdefault(key.replace("_version", ""), set()).update({r.get(key)} - {None})
    spec_hashes = sorted({r.get("spec_hash") for r in records} - {None})
    data = {}
    for r in records:
        data.update(r.get("data_files") or {})
    parts = [f"git commit {', '.join(commits)}",
             ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(versions.items()) if v),
             f"spec hash {', '.join(spec_hashes)}"]
    if data:
        parts.append("data " + ", ".join(f"{name} (sha256 {digest[:12]}…)" for name, digest in sorted(data.items())))
    return "; ".join(parts) + ". Every run's full record: `runs/<backend>/<variant>/seed-<n>/provenance.json`."


def recorded_overrides(folder: Path) -> dict[str, str] | None:
    """--seeds / --steps of the last `normbench reproduce` into `folder` (its experiment.json),
    or None when no command is recorded."""
    try:
        tokens = str(json.loads((Path(folder) / "experiment.json").read_text())["command"]).split()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    found = {}
    for i, token in enumerate(tokens):
        for flag in ("--seeds", "--steps"):
            if token == flag and i + 1 < len(tokens):
                found[flag] = tokens[i + 1]
            elif token.startswith(flag + "="):
                found[flag] = token.split("=", 1)[1]
    return found


def regenerate_command(name: str, records: list[dict], recorded: dict[str, str] | None = None) -> tuple[str, int | None]:
    """(the command that regenerates these results, how many runs it makes).

    Backends come from the runs; --seeds / --steps from the recorded command, or, when
    none is recorded, inferred from the runs against the experiment's spec."""
    from normbench import figures

    backends_ = figures.backend_order({r["backend"] for r in records})
    flags = "".join(f" --backend {b}" for b in backends_)
    try:
        spec = spec_module.load(experiments.get(name).spec)
    except Exception:  # an unknown experiment or a spec that no longer loads: no flags beyond the backends
        return f"normbench reproduce {name}{flags}", None
    seeds = sorted({r["seed"] for r in records})
    if recorded is None:
        recorded = {}
        if seeds != list(spec.seeds) and seeds == list(range(len(seeds))):
            recorded["--seeds"] = str(len(seeds))  # these results used fewer or more seeds than the spec
        declared_steps = {v.name: spec.steps_for(v) for v in spec.variants}
        done = [r for r in records if r.get("status") == "ok" and r["variant"]["name"] in declared_steps
                and r.get("steps_completed") is not None]
        if done and any(r["steps_completed"] != declared_steps[r["variant"]["name"]] for r in done):
            recorded["--steps"] = str(max(r["steps_completed"] for r in done))  # a shortened run (--steps)
    flags += "".join(f" {k} {v}" for k, v in recorded.items())
    n_seeds = int(recorded["--seeds"]) if recorded.get("--seeds", "").isdigit() else len(spec.seeds)
    return f"normbench reproduce {name}{flags}", len(spec.variants) * n_seeds * len(backends_)


def is_results_root(path: str | Path) -> bool:
    """A folder of experiment folders (results/), rather than one experiment's results."""
    path = Path(path)
    return path.is_dir() and not (path / "runs").is_dir() and any((path / n / "runs").is_dir() for n in experiments.names())


def update_index(out: str | Path) -> Path | None:
    """Rewrite the index beside an experiment folder named after its experiment (results/<name>)."""
    out = Path(out)
    if out.name in experiments.EXPERIMENTS:
        return write_index(out.parent)
    return None


def build_all(root: str | Path) -> list[dict]:
    """Rebuild every experiment's report under `root` from stored metrics, then the index."""
    root = Path(root)
    built = [build_report(root / n, n) for n in experiments.names() if runner.finished_run_dirs(root / n)]
    write_index(root)
    return built


def write_index(root: str | Path) -> Path:
    """results/README.md: every experiment with its figures, table, cost and provenance.
    Generated from the folders' files; no number in it is typed by hand."""
    root = Path(root)
    lines = ["# normbench results", "",
             "<!-- Generated by `normbench report " + root.name + "` (and by every `normbench reproduce`). "
             "Do not edit: edits are overwritten. -->", "",
             "Reproductions of the MNIST experiments of *Accelerating Training of Deep Neural Networks with a "
             "Standardization Loss* (Section 4.1, 4.2; Appendix A.1, A.2). Each section below is one folder: "
             "its figures (PNG here, PDF beside them), its table (also as `table.tex` and `table.csv`), what it cost and "
             "where it ran, and its provenance. The paper's numbers stand beside ours where the paper states them; "
             "where ours differ, the notes under each table say so.", "",
             "`normbench reproduce all` regenerates everything (it trains only runs that are missing); "
             f"`normbench report {root.name}` rebuilds every table, figure and this index from stored metrics "
             "without training.", "", "| paper | experiment | status |", "|---|---|---|"]
    sections = []
    for name, e in experiments.EXPERIMENTS.items():
        folder = root / name
        records = run_records(folder) if (folder / "runs").is_dir() else []
        command, expected = regenerate_command(name, records, recorded_overrides(folder)) if records else (None, None)
        if not records:
            status = "not run yet"
        elif expected and len(records) < expected:
            status = f"{len(records)} of {expected} runs: **incomplete**"
        else:
            status = f"{len(records)} runs"
        lines.append(f"| {e.figure} | [{name}](#{name}) | {status} |")
        sec = ["", f"## {name}", "", f"**{e.figure}** · {e.title}", ""]
        if not records:
            sec += [f"Not run yet. Command: `normbench reproduce {name}`."]
            sections += sec
            continue
        if expected and len(records) < expected:
            sec += [f"**Incomplete:** {len(records)} of the {expected} runs of this command have finished; the "
                    "table and figures show those.", ""]
        sec += [f"**Regenerate:** `{command}` (trains missing runs, then reports) · "
                f"**rebuild from stored metrics:** `normbench report {root.name}/{name}`", ""]
        for png in sorted(folder.glob("*.png")):
            pdf = png.with_suffix(".pdf")
            sec.append(f"![{name}: {png.stem}]({name}/{png.name})")
            sec.append("")
            sec.append(f"[{png.name}]({name}/{png.name})" + (f" · [{pdf.name}]({name}/{pdf.name})" if pdf.exists() else ""))
            sec.append("")
        table_md = folder / "table.md"
        sec += [table_md.read_text().rstrip() if table_md.exists() else "(no table yet: run `normbench report` on the folder)", ""]
        sec += [f"**Compute.** {compute_summary(records)}", "", f"**Provenance.** {provenance_summary(records)}"]
        sections += sec
    text = "\n".join(lines + sections) + "\n"
    path = root / INDEX_NAME
    runner._atomic_write_text(path, text)
    return path
