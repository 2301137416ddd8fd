"""Which method each variant of a results directory ran, for colours, labels and roles.

A run's `normalization` column (metrics.csv) holds either a string older specs could
write ("batch_norm_shift", "standardization_loss", ...: mapped to their plugin through
the plugins' declared shorthands) or, for newer variants, the variant's label (then the
variant is looked up in the resolved spec the runs were made with, `<out>/spec.toml`).
A variant's *method* is its normalization plugin, or, when it keeps the default (no)
normalization and adds auxiliary losses, its first auxiliary loss. No method is named
here: everything comes from the registries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from normbench import auxiliary_losses, normalizations
from normbench.spec import ExperimentSpec, VariantSpec

NORMALIZATION, AUXILIARY_LOSS = "normalization", "auxiliary_loss"


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str  # NORMALIZATION | AUXILIARY_LOSS
    plugin: type  # the registered class: name, label, color, summary
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return self.plugin.name

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.plugin.name

    @property
    def label(self) -> str:
        return self.plugin.label or self.plugin.name

    @property
    def color(self) -> str | None:
        return self.plugin.color

    def is_(self, kind: str, name: str) -> bool:
        return self.key == (kind, name)


def from_column(column: str) -> Method | None:
    """The method a metrics.csv `normalization` string older specs wrote stands for, or None."""
    shorthands = normalizations.shorthands()
    if column in shorthands:
        name, options = shorthands[column]
        return Method(NORMALIZATION, normalizations.get(name), tuple(sorted(options.items())))
    losses = auxiliary_losses.normalization_shorthands()
    if column in losses:
        return Method(AUXILIARY_LOSS, auxiliary_losses.get(losses[column][0]))
    return None


def from_variant(variant: VariantSpec) -> Method:
    """The method of a resolved spec variant."""
    default = VariantSpec.__dataclass_fields__["normalization"].default
    if variant.auxiliary_losses and variant.normalization == default:
        loss = variant.auxiliary_losses[0]
        return Method(AUXILIARY_LOSS, auxiliary_losses.get(loss.name), loss.options)
    return Method(NORMALIZATION, normalizations.get(variant.normalization.name), variant.normalization.options)


def variant_methods(columns: dict[str, str], spec: ExperimentSpec | None = None) -> dict[str, Method | None]:
    """variant -> its Method (None when neither its column nor the spec says), from
    variant -> `normalization` column and the resolved spec the runs were made with."""
    declared = {v.name: v for v in spec.variants} if spec is not None else {}
    out = {}
    for variant, column in columns.items():
        method = from_column(column) if isinstance(column, str) else None
        if method is None and variant in declared:
            method = from_variant(declared[variant])
        out[variant] = method
    return out
