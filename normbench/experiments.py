"""Named paper experiments for `normbench reproduce`: which spec, which backends, and
the paper's published values to print beside ours (cited from the paper, never ours)."""

from __future__ import annotations

import dataclasses


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
    figure: str  # which paper figure this reproduces
    # variant name -> the paper's final test accuracy, where the paper states one
    paper_test_accuracy: dict[str, PaperValue] = dataclasses.field(default_factory=dict)
    default_backends: tuple[str, ...] = ("torch",)


EXPERIMENTS: dict[str, Experiment] = {
    "mnist-cnn": Experiment(
        name="mnist-cnn", spec="mnist-cnn", figure="Figure 1",
        title="3-layer CNN on MNIST, 1000 SGD steps at learning rate 1e-3 (paper Section 4.1, Figure 1)",
        paper_test_accuracy={
            "none": PaperValue(24.6, 6.5, "Section 4.1"),
            "batch_norm": PaperValue(85.6, 1.1, "Section 4.1"),
            "standardization_loss": PaperValue(75.2, 2.6, "Section 4.1"),
        },
    ),
}


def names() -> list[str]:
    return list(EXPERIMENTS)


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose from {', '.join(names())}")
    return EXPERIMENTS[name]
