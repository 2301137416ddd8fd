"""Auxiliary losses, one file each; this folder is their registry.

An auxiliary loss reads the output of every normalization slot (the input of the
layer's activation, before a variant's `affine` scale and shift) and adds
`weight * value` to the task loss. Any variant may use any number of them:

    auxiliary_losses = [{ name = "standardization", weight = 1.0 }]

A plugin file defines one subclass of `AuxiliaryLoss` bound to `LOSS`, written once
against the backend primitives. Its value on the evaluation sets is reported in
`metrics.csv` (column `metric_column`), computed exactly across evaluation chunks from
the statistics it declares.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from normbench.options import Option
from normbench.plugins import FolderRegistry

WEIGHT = Option("weight", "number", help="multiplies the loss in the training objective", low=0.0, low_open=True)


class AuxiliaryLoss:
    name: str = ""
    label: str = ""
    color: str | None = None
    summary: str = ""
    metric_column: str = ""  # metrics.csv column of its value on the evaluation sets
    options: tuple[Option, ...] = (WEIGHT,)
    # Legacy `normalization = "<shorthand>"` strings meaning "no normalization plus this loss",
    # with the variant field that held the weight.
    normalization_shorthands: dict[str, str] = {}
    legacy_table: str | None = None  # see normbench.identity
    legacy_table_fields: tuple[str, ...] = ()
    always_reported = False  # evaluated for every run (metrics.csv), trained with or not
    literature: str = ""
    # normbench.parity compares the loss's value ('<name>_loss') relative to
    # `parity_magnitude`, within this float32 tolerance (None: parity's shared bound for
    # auxiliary losses).
    parity_float32_tolerance: float | None = None

    def __init__(self, **options: Any):
        for option in self.options:
            setattr(self, option.name, options.get(option.name, option.default))

    def canonical(self) -> dict[str, Any]:
        return {"name": self.name, **{o.name: getattr(self, o.name) for o in self.options}}

    def describe(self) -> str:
        return f"{self.name}(weight={self.weight:g})"

    def check_batch(self, batch_size: int, slot) -> str | None:
        return None

    def value(self, ops, taps: dict):
        """The loss (a backend scalar) from every slot's output, by layer name."""
        raise NotImplementedError

    # ---- evaluation: exact over chunks
    def chunk_statistics(self, ops, tap) -> tuple:
        """Statistics of one evaluation chunk's slot output, each an average over the
        chunk's values per channel (combined across chunks by `combine`)."""
        raise NotImplementedError

    def combine(self, parts: list[tuple[tuple, int]]) -> tuple:
        """Statistics of the union of chunks from [(chunk statistics, value count)] (NumPy)."""
        raise NotImplementedError

    def value_from_statistics(self, statistics: dict[str, tuple]) -> float:
        """The loss in float64 NumPy from every layer's combined statistics."""
        raise NotImplementedError

    @classmethod
    def parity_magnitude(cls, moments: dict[str, tuple[np.ndarray, np.ndarray]], log_epsilon: float) -> float | None:
        """The size of the numbers rounded to compute the value, from every slot's
        per-channel (mean, var), for parity's relative error; None: the value's own size.
        A loss whose terms cancel (to ~0 at its optimum) needs it."""
        return None


def _collect(module):
    loss = getattr(module, "LOSS", None)
    return [] if loss is None else [(loss.name, loss)]


REGISTRY = FolderRegistry(__name__, "auxiliary loss", _collect)


def names() -> list[str]:
    return REGISTRY.names()


def get(name: str) -> type[AuxiliaryLoss]:
    return REGISTRY.get(name)


def always_reported() -> type[AuxiliaryLoss]:
    """The loss whose value every run reports (the standardization loss: the paper's subject)."""
    found = [cls for cls in REGISTRY._scan().values() if cls.always_reported]
    if len(found) != 1:
        raise RuntimeError(f"exactly one auxiliary loss must set always_reported, found {[c.name for c in found]}")
    return found[0]


def normalization_shorthands() -> dict[str, tuple[str, str]]:
    """Legacy normalization strings -> (loss name, variant field holding its weight)."""
    return {short: (name, field) for name, cls in REGISTRY.items() for short, field in cls.normalization_shorthands.items()}


def combine_moments(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and biased variance of a union of chunks from per-chunk (mean, var, count)."""
    counts = np.array([n for _, _, n in parts], dtype=np.float64)
    means = np.stack([np.asarray(m, np.float64) for m, _, _ in parts])
    variances = np.stack([np.asarray(v, np.float64) for _, v, _ in parts])
    total = counts.sum()
    shape = (-1,) + (1,) * (means.ndim - 1)
    mean = (counts.reshape(shape) * means).sum(0) / total
    second = (counts.reshape(shape) * (variances + means**2)).sum(0) / total
    return mean, np.maximum(second - mean**2, 0.0)
