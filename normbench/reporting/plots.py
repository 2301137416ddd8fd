"""Shared figure helpers: the backend order, the palette, legends, titles and saving.

Colours are Okabe-Ito (colour-blind safe). A method's colour is its plugin's `color`
(`normbench.normalizations` / `normbench.auxiliary_losses`); variants whose method has
none, or whose method an earlier variant already shows, take the next of `EXTRA_COLORS`.
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

EXTRA_COLORS = ["#009E73", "#CC79A7", "#E69F00", "#F0E442", "#999999"]
SPLIT_MARKERS = {"train": "o", "test": "s"}
BACKEND_ORDER = ("torch", "jax", "tensorflow")


def backend_order(names) -> list[str]:
    """Backends in one fixed order (torch, jax, tensorflow, then any other), so columns line up across figures."""
    names = set(names)
    return [b for b in BACKEND_ORDER if b in names] + sorted(names - set(BACKEND_ORDER))


def variant_colors(variants: list[str], methods: dict) -> dict[str, str]:
    """variant -> colour: the first variant of each method gets the method's colour, the rest
    (and variants of no known method) the next extra colour. methods: variant -> Method or None."""
    colors, shown, extra = {}, set(), itertools.cycle(EXTRA_COLORS)
    for v in variants:
        method = methods.get(v)
        if method is not None and method.color and method.key not in shown:
            colors[v] = method.color
        else:
            colors[v] = next(extra)
        if method is not None:
            shown.add(method.key)
    return colors


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
    return textwrap.fill(title, width=max(40, int(width_inches * 16)))


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def pyplot():
    """matplotlib.pyplot (Agg) with the report style."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def save(fig, path_stem: Path) -> list[Path]:
    """Write `<stem>.png` and `<stem>.pdf`, close the figure, return their paths."""
    import matplotlib.pyplot as plt

    paths = [Path(path_stem).with_suffix(".png"), Path(path_stem).with_suffix(".pdf")]
    for p in paths:
        # No creation date in PDFs: a rebuilt report is byte-identical when nothing changed.
        metadata = {"CreationDate": None} if p.suffix == ".pdf" else None
        fig.savefig(p, dpi=150, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return paths


def finish(fig, path_stem: Path, title: str, *, title_width: float, handles=(), labels=None, max_columns: int | None = None,
           legend_y: float = -0.01, bottom: float = 0.06, top: float = 0.95, title_size: int = 9) -> list[Path]:
    """The common end of every report figure: one legend below the panels (`handles`, with
    `labels` or their own), the wrapped title above them, a layout that leaves room for
    both (`bottom`, `top`: figure fractions), then `save`."""
    handles = list(handles)
    if handles:
        count = len(handles)
        legend = dict(loc="lower center", ncol=min(count, max_columns or count), frameon=False,
                      bbox_to_anchor=(0.5, legend_y))
        if labels is None:
            fig.legend(handles=handles, **legend)
        else:
            fig.legend(handles, labels, **legend)
    fig.suptitle(wrap_title(title, title_width), fontsize=title_size)
    fig.tight_layout(rect=(0, bottom, 1, top))
    return save(fig, path_stem)


def no_data(ax, text: str = "no finished runs") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
