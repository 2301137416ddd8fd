"""Figure 4: how the final convolutional layer's pre-activations evolve over 8600 steps,
as their 1st, 20th, 80th and 99th percentiles (paper Section 4.2).

The report tabulates the percentiles at the evaluations nearest 0, 1000, half-way and the
end, states each variant's spread over training, and draws one panel per variant in the
paper's order: no normalization, the standardization loss, batch norm.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from normbench import runner
from normbench.experiments import MNIST_NOTES, Experiment
from normbench.reporting import plots
from normbench.reporting.methods import AUXILIARY_LOSS, NORMALIZATION
from normbench.reporting.runs import load_percentiles, ok_only
from normbench.reporting.tables import fmt, is_missing, mean_sd, render_latex, render_markdown, seeds_note

FIGURE_STEM = "percentiles"
# Panel order (paper caption): none, standardization loss, batch norm; other methods after.
PANEL_ORDER = ((NORMALIZATION, "none"), (AUXILIARY_LOSS, "standardization"), (NORMALIZATION, "batch_norm"))
# 1st, 20th, 80th, 99th percentile: black, blue, green, red (paper Figure 4), Okabe-Ito.
PERCENTILE_COLORS = {1: "#000000", 20: "#0072B2", 80: "#009E73", 99: "#D55E00"}

_PERCENTILE_NOTE = (
    "Paper: \"20 epochs (roughly 8.6K steps)\". 8.6K steps of batch 128 are 20 epochs of 55,000 images "
    "(20 x 55,000 / 128 = 8,594; TensorFlow's old MNIST tutorial split held 5,000 of the 60,000 training images "
    "out for validation). normbench runs the paper's 8,600 steps, which are 18.3 epochs of its 60,000-image "
    "training set (20 normbench epochs would be 9,375 steps)."
)


def report(results) -> dict:
    experiment, metrics, status = results.experiment, results.metrics, results.status
    variant_order, title, methods = results.variant_order, results.title, results.methods
    colors = results.colors(variant_order)
    percentiles = ok_only(load_percentiles(results.out), status)
    ok = ok_only(metrics, status)
    panels = feature_panel_order(variant_order, methods)
    layer = next(iter(dict.fromkeys(percentiles.layer)), None)
    steps = sorted(percentiles.step.unique()) if len(percentiles) else []
    last = steps[-1] if steps else 0
    wanted = [0, 1000, last / 2, last]
    checkpoints = list(dict.fromkeys(min(steps, key=lambda s: abs(s - w)) for w in wanted)) if steps else []
    qs = sorted(percentiles.percentile.unique()) if len(percentiles) else list(runner.PERCENTILES)
    head = ["method", "backend", "step", "n", "test accuracy %"] + [f"{plots.ordinal(int(q))} pct." for q in qs]
    head += [f"{plots.ordinal(int(qs[-1]))} − {plots.ordinal(int(qs[0]))}"]
    rows, records, widths = [], [], []
    for variant in panels:
        for backend in plots.backend_order(status.backend.unique()):
            if not ((status.backend == backend) & (status.variant == variant)).any():
                continue
            p = percentiles[(percentiles.backend == backend) & (percentiles.variant == variant) & (percentiles.layer == layer)]
            widths_here = []
            for step in checkpoints:
                at = p[p.step == step]
                test = ok[(ok.backend == backend) & (ok.variant == variant) & (ok.split == "test") & (ok.step == step)]
                acc = mean_sd(100 * test.accuracy)
                per_q = {q: mean_sd(at[at.percentile == q].value) for q in qs}
                wide = at.pivot_table(index="seed", columns="percentile", values="value")
                width = mean_sd(wide[qs[-1]] - wide[qs[0]]) if len(wide) else (math.nan, math.nan)
                widths_here.append((int(step), width[0]))
                rows.append([variant, backend, str(int(step)), str(at.seed.nunique()), fmt(*acc),
                             *[fmt(*per_q[q], digits=2) for q in qs], fmt(*width, digits=2)])
                records.append({"variant": variant, "backend": backend, "step": int(step), "n": at.seed.nunique(),
                                "test_accuracy": acc[0], "test_accuracy_sd": acc[1],
                                **{f"p{int(q)}": per_q[q][0] for q in qs}, **{f"p{int(q)}_sd": per_q[q][1] for q in qs},
                                "width": width[0], "width_sd": width[1]})
            known = [(step, w) for step, w in widths_here if not is_missing(w)]
            if len(known) >= 2:
                # From the first checkpoint after training began (step 0 is only the initialization's scale).
                (s0, w0), (s1, w1) = known[1] if len(known) > 2 else known[0], known[-1]
                ratio = f" (× {w1 / w0:.2f} from step {s0} to step {s1})" if w0 else ""
                widths.append(f"{variant} ({backend}): " + " → ".join(f"{w:.2f}" for _, w in known) + ratio)
    table = pd.DataFrame(records)
    notes = [f"Percentiles of {layer} pre-activations on the test set (mean ± sd over seeds), at the evaluation steps "
             f"nearest 0, 1000, half-way and the end; the figure shows every evaluation.",
             (f"Spread over training, the {plots.ordinal(int(qs[-1]))} − {plots.ordinal(int(qs[0]))} percentile width "
              f"at steps {', '.join(str(int(c)) for c in checkpoints)}: " + "; ".join(widths) + ".") if widths else "",
             seeds_note(status, "the paper does not say how many runs Figure 4 shows"),
             *(experiment.notes if experiment else ())]
    figs = percentiles_figure(percentiles, variant_order, methods, colors, results.out / FIGURE_STEM, title)
    return {"table": table, "markdown": render_markdown(title, head, rows, notes),
            "latex": render_latex(title, head, rows, notes), "figures": figs}


def feature_panel_order(variants: list[str], methods: dict) -> list[str]:
    """Variants in the paper's panel order (PANEL_ORDER; others after, as given).
    methods: variant -> its Method (normbench.reporting.methods) or None."""
    rank = {key: i for i, key in enumerate(PANEL_ORDER)}
    key = lambda v: methods[v].key if methods.get(v) is not None else None
    return sorted(variants, key=lambda v: (rank.get(key(v), len(rank)), variants.index(v)))


def percentiles_figure(percentiles: pd.DataFrame, variant_order: list[str], methods: dict,
                       method_colors: dict[str, str], path_stem: Path, title: str) -> list[Path]:
    """Percentile curves of one layer's pre-activations against steps (mean ± sd over seeds).

    Rows: backends; columns: variants in the paper's order (none, standardization loss,
    batch norm). Each panel has its own y scale, as in the paper.
    """
    plt = plots.pyplot()
    backends_ = plots.backend_order(percentiles.backend.unique()) or ["(none)"]
    panels = feature_panel_order(variant_order, methods)
    layers = list(dict.fromkeys(percentiles.layer))
    layer = layers[0] if layers else "?"
    fig, axes = plt.subplots(len(backends_), len(panels), figsize=(3.9 * len(panels), 3.3 * len(backends_)),
                             squeeze=False, sharex=True)
    for row, backend in enumerate(backends_):
        for col, variant in enumerate(panels):
            ax = axes[row][col]
            d = percentiles[(percentiles.backend == backend) & (percentiles.variant == variant) & (percentiles.layer == layer)]
            for q in sorted(d.percentile.unique()):
                g = d[d.percentile == q].groupby("step").value.agg(["mean", "std"]).reset_index().fillna({"std": 0.0})
                color = PERCENTILE_COLORS.get(int(q), "0.5")
                ax.plot(g.step, g["mean"], color=color, linewidth=1.3, label=f"{plots.ordinal(int(q))} percentile")
                ax.fill_between(g.step, g["mean"] - g["std"], g["mean"] + g["std"], color=color, alpha=0.2, linewidth=0)
            n = d.seed.nunique()
            label = methods[variant].label if methods.get(variant) is not None else variant
            ax.set_title(f"{backend}: {label} (n={n})", color=method_colors.get(variant, "black"), fontsize=9)
            if row == len(backends_) - 1:
                ax.set_xlabel("training step (SGD updates)")
            if col == 0:
                ax.set_ylabel(f"{layer} pre-activation (dimensionless)")
            if d.empty:
                plots.no_data(ax)
    handles, labels = plots.legend_entries(axes.flat)
    return plots.finish(fig, path_stem, title, title_width=3.9 * len(panels), handles=handles, labels=labels)


EXPERIMENT = Experiment(
    name="mnist-cnn-features", spec="mnist-cnn-features", figure="Figure 4",
    title="3-layer CNN on MNIST, 8600 steps: percentiles of the final convolutional layer's pre-activations "
          "(paper Section 4.2, Figure 4)",
    notes=MNIST_NOTES + (
        _PERCENTILE_NOTE,
        "The paper tracks \"the final layer's activation\" / \"the final convolutional layer\" without saying "
        "on which data or where. normbench records conv3's pre-activations (the input of its ReLU; for batch "
        "norm after normalization and shift) over all 4 x 4 positions and 8 channels of the 10,000 test "
        "images, in inference mode (batch norm uses its running statistics), at every evaluation.",
        "The paper gives no numbers for Figure 4. Its claims: without normalization the distribution changes "
        "notably in shape and scale over training; batch norm and the standardization loss keep it stable, "
        "and evolve in qualitatively similar ways.",
    ),
    report=report,
)
