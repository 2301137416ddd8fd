"""Figures of the paper's experiments beyond Figure 1's curves (which live in report.py):
Figure 2 top (cross entropy against accuracy), Figure 2 bottom (accuracy against the
standardization-loss weight) and Figure 4 (percentiles of a layer's pre-activations).

Every function takes tidy data already restricted to runs that finished without
diverging (diverged runs are counted by the caller and drawn only where said), writes
`<stem>.png` and `<stem>.pdf`, and returns their paths. Colours are Okabe-Ito
(colour-blind safe) in the paper's roles: none black, standardization loss red
(vermillion), batch norm blue; Figure 4's percentile curves are black, blue, green
and red as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# 1st, 20th, 80th, 99th percentile: black, blue, green, red (paper Figure 4), Okabe-Ito.
PERCENTILE_COLORS = {1: "#000000", 20: "#0072B2", 80: "#009E73", 99: "#D55E00"}
REFERENCE_BAND_ALPHA = 0.15
NORMALIZATION_LABELS = {"none": "no normalization", "batch_norm_shift": "batch norm",
                        "batch_norm_scale_shift": "batch norm (scale and shift)",
                        "standardization_loss": "standardization loss"}
# Figure 4's panel order (paper caption): none, standardization loss, batch norm.
FEATURE_PANEL_ORDER = ("none", "standardization_loss", "batch_norm_shift", "batch_norm_scale_shift")


BACKEND_ORDER = ("torch", "jax", "tensorflow")


def backend_order(names) -> list[str]:
    """Backends in one fixed order (torch, jax, tensorflow, then any other), so columns line up across figures."""
    names = set(names)
    return [b for b in BACKEND_ORDER if b in names] + sorted(names - set(BACKEND_ORDER))


def legend_entries(axes) -> tuple[list, list[str]]:
    """Legend handles and labels of all panels, each label once (a backend may lack a method)."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    return handles, labels


def wrap_title(title: str, width_inches: float) -> str:
    import textwrap

    return textwrap.fill(title, width=max(40, int(width_inches * 16)))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def _save(fig, path_stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = [Path(path_stem).with_suffix(".png"), Path(path_stem).with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _no_data(ax, text: str = "no finished runs") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


# ----------------------------------------------------------------------------- Figure 2 top


def regularization_figure(data: pd.DataFrame, variant_order: list[str], colors: dict[str, str],
                          common_steps: int | None, path_stem: Path, title: str) -> list[Path]:
    """Cross entropy against accuracy, one point per evaluation (mean ± sd over seeds).

    Columns: test, train; rows: backends. A variant trained longer than `common_steps`
    gets its point at `common_steps` ringed, so "same budget" and "5x the budget" can
    both be read off.
    """
    plt = _pyplot()
    backends_ = backend_order(data.backend.unique())
    splits = [("test", "s"), ("train", "o")]
    fig, axes = plt.subplots(len(backends_), 2, figsize=(9.2, 3.9 * len(backends_)), squeeze=False)
    for row, backend in enumerate(backends_):
        for col, (split, marker) in enumerate(splits):
            ax = axes[row][col]
            for variant in variant_order:
                d = data[(data.backend == backend) & (data.variant == variant) & (data.split == split)]
                if d.empty:
                    continue
                g = d.groupby("step").agg(ce=("cross_entropy", "mean"), ce_sd=("cross_entropy", "std"),
                                          acc=("accuracy", "mean"), acc_sd=("accuracy", "std")).reset_index()
                g = g.fillna({"ce_sd": 0.0, "acc_sd": 0.0})
                color = colors[variant]
                ax.errorbar(g.ce, 100 * g.acc, xerr=g.ce_sd, yerr=100 * g.acc_sd, color=color, marker=marker,
                            markersize=3.5, linewidth=1.0, capsize=1.2, elinewidth=0.6,
                            markerfacecolor=color if split == "test" else "white",
                            label=f"{variant} ({int(g.step.max())} steps)")
                last = g.iloc[-1]
                ax.annotate(f"{int(last.step)}", (last.ce, 100 * last.acc), textcoords="offset points",
                            xytext=(4, -9), fontsize=7, color=color)
                if common_steps is not None and g.step.max() > common_steps and (g.step == common_steps).any():
                    at = g[g.step == common_steps].iloc[0]
                    ax.plot(at.ce, 100 * at.acc, marker="o", markersize=10, markerfacecolor="none",
                            markeredgecolor=color, markeredgewidth=1.2, linestyle="none")
                    ax.annotate(f"{common_steps} steps", (at.ce, 100 * at.acc), textcoords="offset points",
                                xytext=(7, 4), fontsize=7, color=color)
            ax.set_xlabel(f"{split} cross entropy (nats)")
            ax.set_ylabel(f"{split} accuracy (%)")
            ax.set_title(f"{backend}: {split}")
            if not ax.has_data():
                _no_data(ax)
    handles, labels = legend_entries(axes.flat)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False,
                   bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(wrap_title(title, 9.2), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return _save(fig, path_stem)


# ----------------------------------------------------------------------------- Figure 2 bottom


def weight_sweep_figure(finals: pd.DataFrame, references: pd.DataFrame, diverged: pd.DataFrame,
                        onsets: dict[str, float | None], steps: int | None, colors: dict[str, str],
                        path_stem: Path, title: str, paper_points: dict[float, tuple[float, float]] | None = None) -> list[Path]:
    """Final test accuracy against the standardization-loss weight; one column per backend.

    finals:     one row per finished standardization-loss run: backend, weight, seed, accuracy_pct
    references: one row per finished reference run: backend, variant, accuracy_pct (drawn as
                a horizontal line at the mean with a ± sd band)
    diverged:   backend, weight, count of diverged runs (drawn as x on the bottom edge)
    onsets:     backend -> the weight where the collapse starts (a vertical dotted line), or None
    paper_points: weight -> (mean, sd) the paper states (open grey diamonds)
    """
    plt = _pyplot()
    backends_ = backend_order(set(finals.backend) | set(references.backend) | set(diverged.backend))
    width = max(6.0, 5.0 * len(backends_))
    fig, axes = plt.subplots(1, len(backends_), figsize=(width, 4.2), squeeze=False, sharey=True)
    red = colors.get("standardization_loss", "#D55E00")
    all_weights = sorted(set(finals.weight) | set(diverged.weight))
    for col, backend in enumerate(backends_):
        ax = axes[0][col]
        d = finals[finals.backend == backend]
        for variant, r in references[references.backend == backend].groupby("variant", sort=False):
            mean, sd = r.accuracy_pct.mean(), r.accuracy_pct.std(ddof=1) if len(r) > 1 else 0.0
            color = colors.get(variant, "0.4")
            ax.axhline(mean, color=color, linewidth=1.3, label=f"{variant} (reference: mean ± sd band)")
            ax.axhspan(mean - sd, mean + sd, color=color, alpha=REFERENCE_BAND_ALPHA, linewidth=0)
        if not d.empty:
            rng = np.random.default_rng(0)
            jitter = np.exp(rng.uniform(-0.06, 0.06, len(d)))
            ax.scatter(d.weight * jitter, d.accuracy_pct, s=9, color=red, alpha=0.35, linewidths=0,
                       label="standardization loss, single runs")
            g = d.groupby("weight").accuracy_pct.agg(["mean", "std", "count"]).reset_index().fillna({"std": 0.0})
            ax.errorbar(g.weight, g["mean"], yerr=g["std"], color=red, marker="s", markersize=4.5, linewidth=1.3,
                        capsize=2, label="standardization loss (mean ± sd)")
        for w, (mean, sd) in (paper_points or {}).items():
            ax.errorbar([w], [mean], yerr=[sd], color="0.35", marker="D", markersize=6, markerfacecolor="none",
                        capsize=2, linestyle="none", label="paper, Section 4.1 (mean ± sd)")
        dv = diverged[(diverged.backend == backend) & (diverged["count"] > 0)]
        for r in dv.itertuples():
            ax.plot(r.weight, 0.02, marker="x", color=red, markersize=7, transform=ax.get_xaxis_transform(),
                    clip_on=False, linestyle="none")
            # Two short lines: neighbouring weights are half a decade apart, too close for one long label.
            ax.annotate(f"{r.count}\ndiverged", (r.weight, 0.05), xycoords=("data", "axes fraction"), fontsize=6.5,
                        color=red, ha="center", va="bottom", linespacing=1.0)
        onset = onsets.get(backend)
        if onset is not None:
            ax.axvline(onset, color="0.3", linestyle=":", linewidth=1.2)
            ax.annotate("collapse starts", (onset, 0.97), xycoords=("data", "axes fraction"), fontsize=7,
                        color="0.25", ha="right", va="top", rotation=90, xytext=(-3, 0), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(0, 100)  # the whole range: a collapse towards chance (10%) stays in view
        if all_weights:
            ax.set_xticks(all_weights)
            ax.set_xticklabels([f"{w:g}" for w in all_weights], rotation=45)
            ax.minorticks_off()
        ax.set_xlabel("standardization-loss weight (dimensionless, log scale)")
        if col == 0:
            ax.set_ylabel(f"test accuracy after {steps} steps (%)" if steps else "final test accuracy (%)")
        ax.set_title(backend)
        if not ax.has_data():
            _no_data(ax)
    handles, labels = legend_entries(axes[0])
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(wrap_title(title, width), fontsize=9)
    fig.tight_layout(rect=(0, 0.13, 1, 0.95))
    return _save(fig, path_stem)


# ----------------------------------------------------------------------------- Figure 4


def feature_panel_order(variants: list[str], normalizations: dict[str, str]) -> list[str]:
    rank = {n: i for i, n in enumerate(FEATURE_PANEL_ORDER)}
    return sorted(variants, key=lambda v: (rank.get(normalizations.get(v, v), len(rank)), variants.index(v)))


def percentiles_figure(percentiles: pd.DataFrame, variant_order: list[str], normalizations: dict[str, str],
                       method_colors: dict[str, str], path_stem: Path, title: str) -> list[Path]:
    """Percentile curves of one layer's pre-activations against steps (mean ± sd over seeds).

    Rows: backends; columns: variants in the paper's order (none, standardization loss,
    batch norm). Each panel has its own y scale, as in the paper.
    """
    plt = _pyplot()
    backends_ = backend_order(percentiles.backend.unique()) or ["(none)"]
    panels = feature_panel_order(variant_order, normalizations)
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
                ax.plot(g.step, g["mean"], color=color, linewidth=1.3, label=f"{ordinal(int(q))} percentile")
                ax.fill_between(g.step, g["mean"] - g["std"], g["mean"] + g["std"], color=color, alpha=0.2, linewidth=0)
            n = d.seed.nunique()
            label = NORMALIZATION_LABELS.get(normalizations.get(variant, ""), variant)
            ax.set_title(f"{backend}: {label} (n={n})", color=method_colors.get(variant, "black"), fontsize=9)
            if row == len(backends_) - 1:
                ax.set_xlabel("training step (SGD updates)")
            if col == 0:
                ax.set_ylabel(f"{layer} pre-activation (dimensionless)")
            if d.empty:
                _no_data(ax)
    handles, labels = legend_entries(axes.flat)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(wrap_title(title, 3.9 * len(panels)), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return _save(fig, path_stem)
