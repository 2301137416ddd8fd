"""Named paper experiments for `normbench reproduce`, one file each; this folder is their registry.

An experiment file binds `EXPERIMENT = Experiment(...)`: which bundled spec it runs
(`normbench/specs/<spec>.toml`), which backends by default, the paper's published values
to print beside ours (cited from the paper, never ours), notes on what the paper says and
where normbench differs, and its report function when it needs tables and figures of its
own (Figure 2's analyses, Figure 4's percentiles); without one, the shared curves report
(`normbench.reporting.curves`: Figures 1 and 3) is used.

Every experiment writes into results/<name>/ and its report is rebuilt from stored
metrics alone (`normbench report results/<name>`). Experiments are listed in the paper's
order: by figure number, a figure's top panel before its bottom one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from normbench.plugins import FolderRegistry, UnknownName, single


@dataclasses.dataclass(frozen=True)
class PaperValue:
    mean: float  # percent
    sd: float  # percent, over the paper's 10 runs
    where: str  # where in the paper the number is stated

    def band(self, k: float = 2.0) -> tuple[float, float]:
        return self.mean - k * self.sd, self.mean + k * self.sd


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    spec: str  # bundled spec name
    title: str
    figure: str  # which paper figure this reproduces: "Figure 2 (top)"
    # variant name -> the paper's final test accuracy, where the paper states one
    paper_test_accuracy: dict[str, PaperValue] = dataclasses.field(default_factory=dict)
    default_backends: tuple[str, ...] = ("torch",)
    # What the paper says (in words, where it gives no number) and where normbench
    # differs from it; printed under the table.
    notes: tuple[str, ...] = ()
    # report(results: normbench.reporting.Results) -> {"table", "markdown", "latex", "figures"};
    # None: the shared curves report.
    report: Callable | None = None
    # Seeds per backend where they differ from the spec's (e.g. 5 on torch, 2 elsewhere:
    # enough to check backend agreement without tripling the cost); --seeds overrides it.
    seeds_by_backend: dict[str, int] = dataclasses.field(default_factory=dict)

    def seeds_for(self, backend: str, spec_seeds: int) -> int:
        return self.seeds_by_backend.get(backend, spec_seeds)


# Said of every MNIST experiment; printed under each table.
MNIST_NOTES = (
    "normbench trains on MNIST's full 60,000-image training set, so 1000 steps of batch 128 are 2.13 epochs, "
    "as the paper states (Appendix A.1). \"Test\" is MNIST's 10,000 test images (the paper's \"cross-validated\" "
    "or \"validation\" data); \"train\" is a fixed subset of 10,000 training images, evaluated in inference mode.",
)

PAPER_STEPS = 1000  # the budget of every number the paper states for MNIST (Section 4.1)

REGISTRY = FolderRegistry(__name__, "experiment", single("EXPERIMENT"))

_PANELS = ("(top)", "(bottom)")  # a figure's panels in the paper's reading order


def _paper_order(experiment: Experiment) -> tuple:
    match = re.match(r"\s*(\D*?)\s*(\d+)", experiment.figure)
    what, number = (match.group(1), int(match.group(2))) if match else (experiment.figure, 0)
    panel = next((i for i, p in enumerate(_PANELS) if p in experiment.figure), -1)
    # The paper's figures, then its tables, each in its order; comparisons beyond the paper after them.
    return not experiment.figure.startswith(("Figure", "Table")), what, number, panel, experiment.name


def by_name() -> dict[str, Experiment]:
    """Every experiment, in the paper's order."""
    return {e.name: e for e in sorted((e for _, e in REGISTRY.items()), key=_paper_order)}


def names() -> list[str]:
    return list(by_name())


def get(name: str) -> Experiment:
    if name not in REGISTRY:
        raise UnknownName(f"unknown experiment {name!r}; choose from {', '.join(names())} (or all)")
    return REGISTRY.get(name)


__all__ = ["Experiment", "MNIST_NOTES", "PAPER_STEPS", "PaperValue", "REGISTRY", "by_name", "get", "names"]
