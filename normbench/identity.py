"""The identity of a run: its run key, and the names older results recorded it under.

A run key hashes everything that determines a run's result (the resolved spec fields that
matter, the variant, the seed, the backend), so a results directory can tell a finished
run it may reuse from a different one at the same place.

Runs written before normalization methods became plugins hashed the spec as it was then
written: method names such as "batch_norm_shift", a `standardization_loss_weight`, and
top-level [batch_norm] / [standardization_loss] tables. A variant those specs could
express gets that same key, computed from the plugins' declared shorthands and legacy
tables, so the published results are reused, never retrained; any other variant gets a
key over its resolved plugins and their options.
"""

from __future__ import annotations

import hashlib
import json

from normbench import auxiliary_losses, normalizations
from normbench.spec import ExperimentSpec, PluginSpec, VariantSpec


def _hash(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _shared(spec: ExperimentSpec, variant: VariantSpec) -> dict:
    shared = spec.to_dict()
    for field in ("name", "description", "seeds", "variants", "track_percentiles", "plugin_defaults"):
        shared.pop(field)
    shared["steps"] = spec.steps_for(variant)
    shared["model"] = spec.model_for(variant)
    shared["batch_size"] = spec.batch_size_for(variant)
    return shared


def run_key(spec: ExperimentSpec, variant: VariantSpec, seed: int, backend: str) -> str:
    """Identity of one run: everything that determines its result except the device."""
    legacy = legacy_record(spec, variant)
    if legacy is not None:
        shared, old_variant = legacy
        return _hash({"spec": shared, "variant": old_variant, "seed": seed, "backend": backend,
                      "track": list(spec.track_percentiles)})
    return _hash({"spec": _shared(spec, variant), "variant": {"name": variant.name, "normalization": variant.normalization.canonical(),
                  "affine": variant.affine, "auxiliary_losses": [p.canonical() for p in variant.auxiliary_losses],
                  "steps": variant.steps},
                  "seed": seed, "backend": backend, "track": list(spec.track_percentiles)})


def _matches(plugin: PluginSpec, cls, given: dict) -> bool:
    """Every option is as `given` says, or a legacy-table field, or at its default."""
    for option in cls.options:
        value = plugin.option(option.name)
        if option.name in given:
            if value != given[option.name]:
                return False
        elif option.name not in cls.legacy_table_fields and option.name != "weight" and value != option.default:
            return False
    return True


def legacy_columns(variant: VariantSpec) -> tuple[str, float] | None:
    """(the `normalization` string, the standardization-loss weight) older specs wrote for
    this variant, or None when they could not express it."""
    if variant.affine or len(variant.auxiliary_losses) > 1 or variant.model is not None or variant.batch_size is not None:
        return None
    if variant.auxiliary_losses:
        loss = variant.auxiliary_losses[0]
        cls = auxiliary_losses.get(loss.name)
        if not cls.normalization_shorthands or variant.normalization != VariantSpec.__dataclass_fields__["normalization"].default:
            return None
        if not _matches(loss, cls, {}):
            return None
        return next(iter(cls.normalization_shorthands)), float(loss.option("weight"))
    cls = normalizations.get(variant.normalization.name)
    for short, options in cls.shorthands.items():
        if _matches(variant.normalization, cls, options):
            return short, 0.0
    return None


def legacy_record(spec: ExperimentSpec, variant: VariantSpec) -> tuple[dict, dict] | None:
    """(shared spec fields, variant) as a run key hashed them before plugins, or None."""
    columns = legacy_columns(variant)
    if columns is None:
        return None
    normalization, weight = columns
    shared = _shared(spec, variant)
    tables = dict(spec.plugin_defaults)
    used = {variant.normalization.name: variant.normalization, **{p.name: p for p in variant.auxiliary_losses}}
    for registry in (normalizations, auxiliary_losses):
        for name, cls in registry.REGISTRY.items():
            if not cls.legacy_table:
                continue
            written = dict(tables.get(cls.legacy_table, ())) | dict(tables.get(name, ()))
            values = {}
            for field in cls.legacy_table_fields:
                default = next(o.default for o in cls.options if o.name == field)
                values[field] = used[name].option(field) if name in used else written.get(field, default)
                if isinstance(values[field], int) and not isinstance(values[field], bool) and isinstance(default, float):
                    values[field] = float(values[field])
            shared[cls.legacy_table] = values
    weight_field = next((f for cls in auxiliary_losses.REGISTRY._scan().values() for f in cls.normalization_shorthands.values()), None)
    old_variant = {"name": variant.name, "normalization": normalization, "steps": variant.steps}
    if weight_field:
        old_variant[weight_field] = weight
    return shared, old_variant
