"""The paper's headline metric: how many fewer steps a method needs to reach an accuracy.

Section 4.3 defines the speed-up as "the number of training steps required to achieve a
given accuracy, for the baseline model compared to the normalization model", with the
accuracy set at the best the unnormalized baseline reaches. Here, per backend:

- a *curve* is a variant's test accuracy against steps, the mean over its seeds that
  finished without diverging (and, for the per-seed spread, each seed's own curve);
- the *target* defaults to the highest point of the baseline's mean curve over its budget
  (a fixed target may be given instead, one for every backend);
- a curve *reaches* a level at its first evaluated step whose accuracy is at least the
  level; the true crossing lies after the evaluation before it, so the step is known to
  within that gap (the *resolution*, reported with every step);
- speed-up = baseline steps / method steps on the mean curves; its spread over seeds is
  baseline steps / each seed's steps; the time speed-up uses the training wall-clock at
  those steps (evaluations excluded, each method's own per-step cost included);
- a curve that never reaches the level is "not reached within N steps", never N (in the
  table: NaN steps and speed-up).

The speed-up *curve* (the paper's Figures 5 and 6) repeats this at accuracy levels from
the baseline's first evaluation after step 0 up to the target.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normbench import datasets
from normbench.reporting import plots
from normbench.reporting.runs import ok_only
from normbench.reporting.tables import fmt, is_missing, render_latex, render_markdown, seeds_note

FIGURE_STEM = "speedup_curve"
CURVE_LEVELS = 25  # accuracy levels of the speed-up curve
# A step read off a curve whose resolution is coarser than this fraction of it gets a note.
COARSE_RESOLUTION = 0.10


def test_curves(metrics: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """Test-split rows of the runs that finished without diverging: backend, variant, seed,
    step, accuracy, wall_time_s."""
    test = metrics[metrics.split == "test"][["backend", "variant", "seed", "step", "accuracy", "wall_time_s"]]
    return ok_only(test, status).sort_values(["backend", "variant", "seed", "step"]).reset_index(drop=True)


def mean_curve(curves: pd.DataFrame, backend: str, variant: str) -> pd.DataFrame:
    """step, accuracy (mean over seeds), wall_time_s (mean over seeds), seeds: one row per
    evaluated step; empty when the variant has no finished run on this backend."""
    d = curves[(curves.backend == backend) & (curves.variant == variant)]
    g = d.groupby("step").agg(accuracy=("accuracy", "mean"), wall_time_s=("wall_time_s", "mean"), seeds=("seed", "nunique"))
    # A step some seeds lack (one that diverged after it) would mix populations: keep the
    # steps every counted seed evaluated.
    return g[g.seeds == d.seed.nunique()].reset_index() if not d.empty else g.reset_index()


def first_reach(curve: pd.DataFrame, level: float) -> tuple[int, float, int] | None:
    """(step, wall_time_s, resolution) of the first evaluation at or above `level`, or None.
    The resolution is the gap to the evaluation before it: the crossing lies in that gap."""
    steps, accuracy, times = curve.step.to_numpy(), curve.accuracy.to_numpy(), curve.wall_time_s.to_numpy()
    hits = np.flatnonzero(accuracy >= level - 1e-12)
    if not len(hits):
        return None
    i = int(hits[0])
    return int(steps[i]), float(times[i]), int(steps[i] - steps[i - 1]) if i > 0 else 0


def baseline_target(curves: pd.DataFrame, backend: str, baseline: str) -> float:
    """The best accuracy of the baseline's mean curve on `backend` (NaN without runs)."""
    curve = mean_curve(curves, backend, baseline)
    return float(curve.accuracy.max()) if len(curve) else math.nan


def _ratio(numerator, denominator) -> float:
    return numerator / denominator if numerator is not None and denominator else math.nan


def speedup_table(metrics: pd.DataFrame, status: pd.DataFrame, baseline: str, variants: list[str],
                  target: float | None = None) -> pd.DataFrame:
    """One row per backend and variant (the baseline included, at speed-up 1): the target
    (fraction), steps and time to reach it on the mean curve with the step resolution,
    the speed-up in steps and in time, and the per-seed spread."""
    curves = test_curves(metrics, status)
    rows = []
    for backend in plots.backend_order(status.backend.unique()):
        level = target if target is not None else baseline_target(curves, backend, baseline)
        base_curve = mean_curve(curves, backend, baseline)
        base = first_reach(base_curve, level) if len(base_curve) and not math.isnan(level) else None
        for variant in variants:
            curve = mean_curve(curves, backend, variant)
            if curve.empty:
                continue
            reach = first_reach(curve, level) if not math.isnan(level) else None
            seeds = curves[(curves.backend == backend) & (curves.variant == variant)]
            per_seed = {int(s): first_reach(g, level) for s, g in seeds.groupby("seed")}
            seed_speedups = [_ratio(base[0], r[0]) for r in per_seed.values() if r is not None and base is not None]
            runs = status[(status.backend == backend) & (status.variant == variant)]
            rows.append({
                "backend": backend, "variant": variant, "target": level, "budget": int(curve.step.max()),
                "steps": reach[0] if reach else None, "resolution": reach[2] if reach else None,
                "time_s": reach[1] if reach else None,
                "speedup": _ratio(base[0] if base else None, reach[0] if reach else None),
                "time_speedup": _ratio(base[1] if base else None, reach[1] if reach else None),
                "seed_speedup_median": float(np.median(seed_speedups)) if seed_speedups else math.nan,
                "seed_speedup_min": min(seed_speedups) if seed_speedups else math.nan,
                "seed_speedup_max": max(seed_speedups) if seed_speedups else math.nan,
                "seeds_reached": sum(r is not None for r in per_seed.values()), "seeds": len(per_seed),
                "runs": len(runs),
            })
    return pd.DataFrame(rows)


def speedup_curve(metrics: pd.DataFrame, status: pd.DataFrame, baseline: str, variants: list[str],
                  target: float | None = None, levels: int = CURVE_LEVELS) -> pd.DataFrame:
    """backend, variant, level, speedup: the speed-up at accuracy levels from the baseline's
    first evaluation after step 0 up to the target (NaN where the method does not reach it)."""
    curves = test_curves(metrics, status)
    rows = []
    for backend in plots.backend_order(status.backend.unique()):
        base_curve = mean_curve(curves, backend, baseline)
        top = target if target is not None else baseline_target(curves, backend, baseline)
        started = base_curve[base_curve.step > 0]
        if started.empty or math.isnan(top):
            continue
        low = float(started.accuracy.iloc[0])
        for level in np.linspace(min(low, top), top, levels):
            base = first_reach(base_curve, level)
            for variant in variants:
                reach = first_reach(mean_curve(curves, backend, variant), level)
                rows.append({"backend": backend, "variant": variant, "level": float(level),
                             "speedup": _ratio(base[0] if base else None, reach[0] if reach else None)})
    return pd.DataFrame(rows, columns=["backend", "variant", "level", "speedup"])


def _steps_cell(r) -> str:
    if is_missing(r.steps):
        return f"not reached within {r.budget}"
    return f"{int(r.steps)} (±{int(r.resolution)})" if r.resolution else f"{int(r.steps)}"


def _speedup_cell(value) -> str:
    return "—" if is_missing(value) else f"{value:.2f}×"


def _spread_cell(r) -> str:
    if math.isnan(r.seed_speedup_median):
        return "—"
    return f"{r.seed_speedup_median:.2f}× [{r.seed_speedup_min:.2f}, {r.seed_speedup_max:.2f}]"


def table_rows(table: pd.DataFrame, paper: dict[str, float] | None = None) -> tuple[list[str], list[list[str]]]:
    """(head, rows) of the speed-up table; `paper`: variant -> the paper's speed-up."""
    head = ["method", "backend", "target acc. %", "steps to target (resolution)", "time to target (s)",
            "speed-up", "per-seed speed-up: median [min, max]", "seeds reached", "speed-up in time"]
    if paper:
        head.append("paper speed-up")
    rows = []
    for r in table.itertuples():
        row = [r.variant, r.backend, fmt(100 * r.target, digits=2), _steps_cell(r),
               "—" if is_missing(r.time_s) else f"{r.time_s:.1f}",
               _speedup_cell(r.speedup), _spread_cell(r), f"{r.seeds_reached} of {r.seeds}", _speedup_cell(r.time_speedup)]
        if paper:
            row.append(f"{paper[r.variant]:.1f}×" if r.variant in paper else "—")
        rows.append(row)
    return head, rows


def resolution_notes(table: pd.DataFrame) -> list[str]:
    """A note when some step was read at a resolution coarser than COARSE_RESOLUTION of it."""
    coarse = [f"{r.variant} ({r.backend}): ±{int(r.resolution)} at step {int(r.steps)}" for r in table.itertuples()
              if not is_missing(r.steps) and r.resolution and r.resolution > COARSE_RESOLUTION * r.steps]
    if not coarse:
        return []
    return [f"Coarse step resolution (more than {COARSE_RESOLUTION:.0%} of the step; evaluate more often, e.g. "
            f"`eval_resolution` in the spec): " + "; ".join(coarse) + "."]


def definition_note(baseline: str, target: float | None) -> str:
    what = (f"a fixed target of {100 * target:.2f}% test accuracy" if target is not None else
            f"the target is the best test accuracy of {baseline}'s mean curve over its budget, per backend")
    return (f"Speed-up = {baseline}'s steps to the target / the method's ({what}), read on mean-over-seeds test curves at "
            "the first evaluation at or above the target; (±n) is the gap to the evaluation before it, within which the "
            "true crossing lies. The per-seed spread divides the same baseline steps by each seed's own steps. Time is "
            "training wall-clock at that step (evaluations excluded), on the machine as loaded when each run ran (see "
            "the runs' provenance): compare steps across runs, and time only between runs that had the machine alone. "
            "\"Not reached\" means no evaluation within the budget reached the target.")


def render(table: pd.DataFrame, title: str, baseline: str, target: float | None, paper: dict[str, float] | None = None,
           notes: list[str] = ()) -> tuple[str, str]:
    """(markdown, latex) of the speed-up table with its definition and resolution notes."""
    head, rows = table_rows(table, paper)
    all_notes = [definition_note(baseline, target), *resolution_notes(table), *notes]
    return render_markdown(title, head, rows, all_notes), render_latex(title, head, rows, all_notes)


def curve_figure(curve: pd.DataFrame, variants: list[str], colors: dict[str, str], path_stem, title: str) -> list:
    """Speed-up against accuracy level, one line per method, one panel per backend."""
    plt = plots.pyplot()
    backends = [b for b in plots.backend_order(curve.backend.unique())]
    fig, axes = plt.subplots(1, max(len(backends), 1), figsize=(4.6 * max(len(backends), 1), 3.6), squeeze=False, sharey=True)
    for ax, backend in zip(axes[0], backends):
        for variant in variants:
            d = curve[(curve.backend == backend) & (curve.variant == variant)]
            if d.empty:
                continue
            ax.plot(100 * d.level, d.speedup, marker="o", markersize=3, linewidth=1.2, color=colors[variant], label=variant)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(backend)
        ax.set_xlabel("test accuracy level (%)")
    axes[0][0].set_ylabel("speed-up over the baseline (×)")
    handles, labels = plots.legend_entries(axes.flat)
    return plots.finish(fig, path_stem, title, title_width=4.6 * max(len(backends), 1), handles=handles, labels=labels,
                        max_columns=4, bottom=0.2, top=0.88, title_size=10)


def groups_by_prefix(variants: list[str], baseline_method: str) -> dict[str, list[str]]:
    """{baseline variant: its group's variants} for variants named `<network>-<method>`
    (mnist-norms' convention): each network's baseline is `<network>-<baseline_method>`."""
    out: dict[str, list[str]] = {}
    for variant in variants:
        network = variant.partition("-")[0]
        out.setdefault(f"{network}-{baseline_method}", []).append(variant)
    return {base: members for base, members in out.items() if base in members}


def claims_backend(table: pd.DataFrame) -> str:
    """The backend an experiment's claims are checked on: the one with the most seeds
    (ties: the usual backend order). Fixed before the runs, so no backend is picked for
    its result."""
    counts = table.groupby("backend").seeds.max()
    return max(plots.backend_order(counts.index), key=lambda b: counts[b])


def speedup_text(value: float) -> str:
    return "not reached" if math.isnan(value) else f"{value:.2f}×"


def method_verdicts(table: pd.DataFrame, *, network: str, where: str, paper: dict[str, float],
                    paper_steps: dict[str, str], baseline: str) -> list[str]:
    """One sentence per method with a published speed-up: the paper's claim that it speeds
    `network` up over `baseline` (its speed-up and steps, on `where`) against this table,
    on `claims_backend`. Holds when the method reaches the target faster (speed-up > 1)."""
    backend = claims_backend(table)
    mine = table[table.backend == backend].set_index("variant")
    out = []
    for method, value in paper.items():
        if method not in mine.index:
            continue
        seen = mine.loc[method].speedup
        holds = not math.isnan(seen) and seen > 1
        out.append(f"Paper: {method} speeds {network} up over no normalization ({value}×, {paper_steps[method]} vs "
                   f"{paper_steps[baseline]} steps on {where}). Here ({backend}): {speedup_text(seen)}: "
                   f"**{'holds' if holds else 'does not hold'}**.")
    return out


def comparable_verdict(table: pd.DataFrame, method: str, reference: str, paper: dict[str, float],
                       least_fraction: float) -> list[str]:
    """The paper's claim that `method` speeds training up comparably to `reference` (Table
    1: "comparable to BN"), read as: its speed-up is at least `least_fraction` of the
    reference's (the rule is fixed before the runs; a method not reaching the target
    fails it)."""
    backend = claims_backend(table)
    mine = table[table.backend == backend].set_index("variant")
    if not {method, reference} <= set(mine.index):
        return []
    ours, theirs = mine.loc[method].speedup, mine.loc[reference].speedup
    holds = not math.isnan(ours) and not math.isnan(theirs) and ours >= least_fraction * theirs
    return [f"Paper: {method} speeds training up comparably to {reference} ({paper[method]}× vs {paper[reference]}×); "
            f"read here as at least {least_fraction:.0%} of its speed-up. Here ({backend}): {speedup_text(ours)} vs "
            f"{speedup_text(theirs)}: **{'holds' if holds else 'does not hold'}**."]


def against_one_baseline(results, baseline: str, *, paper: dict[str, float], scale_note: str, examples: str,
                         verdicts) -> dict:
    """`report` of an experiment measuring every variant against one `baseline`, with the
    notes the paper-analogue experiments share: `scale_note` (what the paper ran and what
    was scaled down), the budget and test set (`examples`: "images", "clouds"), the seeds
    and the experiment's own notes."""
    spec = results.spec
    budget = []
    if spec:
        tested = (f"the first {spec.test_examples}" if spec.test_examples else
                  f"all {datasets.info(spec.dataset).test_examples}")
        budget = ["Budget: " + ", ".join(f"{v.name} {spec.steps_for(v)} steps" for v in spec.variants) +
                  f" at batch {spec.batch_size}; test accuracy on {tested} test {examples}."]
    notes = [scale_note, *budget, seeds_note(results.status, "the paper states one run per method"),
             *(results.experiment.notes if results.experiment else ())]
    return report(results, {baseline: list(results.variant_order)}, paper=paper, notes=notes, verdicts=verdicts)


def report(results, groups: dict[str, list[str]], *, paper: dict[str, float] | None = None, notes: list[str] = (),
           verdicts=None) -> dict:
    """The speed-up report of an experiment: for each group (a baseline variant and the
    variants measured against it) the speed-up table and the speed-up curve figure
    (`speedup_curve[_<baseline>].png`). `verdicts(table) -> [sentences]` states the
    experiment's claims against its table."""
    metrics, status = results.metrics, results.status
    tables, curves, figures = [], [], []
    for baseline, members in groups.items():
        table = speedup_table(metrics, status, baseline, members)
        tables.append(table.assign(baseline=baseline))
        curve = speedup_curve(metrics, status, baseline, [m for m in members if m != baseline])
        curves.append(curve.assign(baseline=baseline))
        stem = FIGURE_STEM if len(groups) == 1 else f"{FIGURE_STEM}_{baseline}"
        figures += curve_figure(curve, [m for m in members if m != baseline], results.colors(members),
                                results.out / stem, f"{results.title}: speed-up over {baseline}")
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if curves:
        pd.concat(curves, ignore_index=True).to_csv(results.out / "speedup_curve.csv", index=False, float_format="%.6g")
    said = list(verdicts(table)) if verdicts and not table.empty else []
    markdown, latex = render(table, results.title, "the baseline", None, paper, [*said, *notes])
    return {"table": table, "markdown": markdown, "latex": latex, "figures": figures}
