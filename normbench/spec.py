"""Experiment specs: a framework-agnostic, human-editable description of an experiment.

A spec is a TOML file (comments allowed, standard library parser). It names the model,
the data set, the optimizer and schedule, the budget, the seeds and a list of
normalization *variants* to compare. Every numerical convention that frameworks
disagree on (batch-norm momentum, epsilon, running-variance estimator, the
log-variance epsilon of the standardization loss) is an explicit field here, so no
backend default can leak into a result.

Loading validates everything before anything runs: unknown keys, wrong types,
impossible values and inconsistent combinations raise `SpecError`, whose message is
one line naming the file, the field and what is allowed.

The bundled spec library lives in ``normbench/specs/``; `bundled_specs()` lists it and
`resolve_spec_path()` accepts either a path or a bundled name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from normbench.options import REQUIRED
from normbench.options import check as check_option

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

DTYPES = ("float32", "float64")
OPTIMIZERS = ("sgd", "rmsprop", "adam")
SCHEDULES = ("constant", "step_decay", "piecewise")
RUNNING_VARIANCE = ("biased", "unbiased")
MAX_SEEDS = 10000  # an integer `seeds` expands to a tuple: keep a typo from allocating millions

# Keys each table accepts. Optimizer and schedule fields depend on the chosen name, so a
# hyperparameter of another optimizer is rejected instead of silently ignored.
TOP_LEVEL_KEYS = ("name", "description", "model", "dataset", "dtype", "batch_size", "steps", "eval_every",
                  "eval_resolution", "train_eval_examples", "test_examples", "seeds", "track_percentiles", "augmentations",
                  "optimizer", "schedule", "variant")
# Besides these, a top-level table named after a normalization method or auxiliary loss
# ([batch_norm], [standardization]) or one of their legacy shorthands' tables
# ([standardization_loss]) gives option defaults for every variant that uses the plugin.
OPTIMIZER_KEYS = {
    "sgd": ("name", "learning_rate", "reference_batch_size", "weight_decay", "momentum", "nesterov"),
    "rmsprop": ("name", "learning_rate", "reference_batch_size", "weight_decay", "decay", "momentum", "epsilon"),
    "adam": ("name", "learning_rate", "reference_batch_size", "weight_decay", "beta1", "beta2", "epsilon"),
}
SCHEDULE_KEYS = {
    "constant": ("name", "warmup_steps"),
    "step_decay": ("name", "warmup_steps", "decay_rate", "decay_every", "decay_every_epochs"),
    "piecewise": ("name", "warmup_steps", "boundaries", "multipliers"),
}
VARIANT_KEYS = ("name", "model", "normalization", "affine", "auxiliary_losses", "standardization_loss_weight", "steps",
                "batch_size")


class SpecError(ValueError):
    """A spec is malformed. The message is a single line: `<file>: <field>: <problem>`."""

    def __init__(self, message: str):
        # One line, always: a value quoted into a message can never break it up.
        super().__init__(" ".join(str(message).splitlines()))


# ----------------------------------------------------------------------------- dataclasses


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    learning_rate: float = 1e-3
    # The linear scaling rule (Goyal et al. 2017, which the paper follows for MobileNet):
    # with this set, learning_rate is the rate at this batch size and a run at batch b
    # uses learning_rate * b / reference_batch_size. None: learning_rate at every batch.
    reference_batch_size: int | None = None
    # L2 penalty 0.5 * weight_decay * sum(kernel**2), added to the loss. Kernels only
    # (not biases or batch-norm shifts), as the paper's TensorFlow regularizers did.
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd: heavy-ball coefficient; rmsprop: momentum on the update
    nesterov: bool = False  # sgd only
    decay: float = 0.9  # rmsprop: decay of the squared-gradient average
    beta1: float = 0.9  # adam
    beta2: float = 0.999  # adam
    epsilon: float = 1e-8  # rmsprop and adam: added outside the square root


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """Learning-rate multiplier per step; the optimizer's learning_rate is the peak."""

    name: str = "constant"
    warmup_steps: int = 0  # linear ramp from 0 to the peak over this many steps
    decay_rate: float = 1.0  # step_decay: multiply by this ...
    decay_every: int = 1  # ... every this many steps (after warm-up)
    # ... or every this many epochs of the variant's own batch size (a batch-size sweep's
    # variants then decay after the same examples); set instead of decay_every.
    decay_every_epochs: float | None = None
    boundaries: tuple[int, ...] = ()  # piecewise: step boundaries ...
    multipliers: tuple[float, ...] = ()  # ... and len(boundaries) + 1 multipliers


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """A normalization method or auxiliary loss with every option resolved (the variant's
    value, else the spec's top-level table for the plugin, else the option's default).
    A `method`-kind option (weight standardization's `then`) holds a PluginSpec."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def settings(self) -> dict[str, Any]:
        return dict(self.options)

    def canonical(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v.canonical() if isinstance(v, PluginSpec) else v for k, v in self.options}}


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    name: str
    normalization: PluginSpec = PluginSpec("none")
    affine: bool = False  # a learned per-channel scale and shift after each slot's method
    auxiliary_losses: tuple[PluginSpec, ...] = ()
    steps: int | None = None  # overrides the experiment's steps for this variant
    model: str | None = None  # overrides the experiment's model (one spec comparing methods on several networks)
    batch_size: int | None = None  # overrides the experiment's batch size (one spec sweeping batch sizes)

    def auxiliary_loss(self, name: str) -> PluginSpec | None:
        return next((loss for loss in self.auxiliary_losses if loss.name == name), None)

    @property
    def label(self) -> str:
        """What the variant computes, in one phrase: 'batch_norm(scale=False) + standardization'."""
        parts = [_describe(self.normalization)] + [_describe(loss) for loss in self.auxiliary_losses]
        return " + ".join(parts) + (" + affine" if self.affine else "")


def _describe(plugin: PluginSpec) -> str:
    return plugin.name if not plugin.options else f"{plugin.name}({', '.join(f'{k}={_describe(v) if isinstance(v, PluginSpec) else v}' for k, v in plugin.options)})"


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    model: str
    dataset: str
    batch_size: int
    steps: int
    eval_every: int
    seeds: tuple[int, ...]
    variants: tuple[VariantSpec, ...]
    description: str = ""
    dtype: str = "float32"
    train_eval_examples: int = 10000  # fixed training subset evaluated alongside the test set
    # Steps-to-accuracy readings (the speed-up metric) need evaluations dense where the
    # curves cross a target, which may be step 30 or step 3000. With a resolution r, the
    # test set is also evaluated on a geometric grid (ratio 1 + r) below eval_every / r, so
    # every first step at which a curve reaches a level is known to within a fraction r
    # (and one step). None: the multiples of eval_every only.
    eval_resolution: float | None = None
    # The first N test examples only (smoke runs of networks whose evaluation is costly);
    # None: the whole test set, as every published experiment uses.
    test_examples: int | None = None
    # Layers whose pre-activation percentiles (1, 20, 80, 99) are recorded at every
    # evaluation (Figure 4). Empty: none.
    track_percentiles: tuple[str, ...] = ()
    # Training-batch augmentations (normbench.augmentations), applied in order on the host
    # to each step's batch, drawn from the run's augmentation stream
    # (data_order.augmentation_stream): every backend trains on the same augmented batch.
    # Evaluation sees the data as stored. Empty: none, and left out of the hash.
    augmentations: tuple[PluginSpec, ...] = ()
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    # Top-level plugin tables as written ([batch_norm], [standardization_loss], ...):
    # option defaults, already folded into every variant; kept to write the spec back.
    plugin_defaults: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    # Where the spec was read from: for messages only, not part of equality or the hash.
    source: str = dataclasses.field(default="<memory>", compare=False)

    def steps_for(self, variant: VariantSpec) -> int:
        return variant.steps if variant.steps is not None else self.steps

    def model_for(self, variant: VariantSpec) -> str:
        return variant.model if variant.model is not None else self.model

    def batch_size_for(self, variant: VariantSpec) -> int:
        return variant.batch_size if variant.batch_size is not None else self.batch_size

    def learning_rate_for(self, variant: VariantSpec) -> float:
        """The optimizer's peak learning rate at the variant's batch size (linear rule)."""
        reference = self.optimizer.reference_batch_size
        rate = self.optimizer.learning_rate
        return rate if reference is None else rate * self.batch_size_for(variant) / reference

    def variant(self, name: str) -> VariantSpec:
        for v in self.variants:
            if v.name == name:
                return v
        raise SpecError(f"{self.source}: variant: no variant named {name!r}; have {[v.name for v in self.variants]}")

    def evaluation_steps(self, variant: VariantSpec) -> tuple[tuple[int, bool], ...]:
        """(step, full) for every evaluation of a run of `variant`, ascending, from step 0
        to its last step. `full` evaluations (0, the multiples of eval_every, the last step)
        cover the test set and the training subset; those the resolution grid adds cover
        the test set only: the curves the speed-up is read from, at half the cost."""
        steps = self.steps_for(variant)
        full = {0, steps, *range(self.eval_every, steps + 1, self.eval_every)}
        extra = set()
        if self.eval_resolution is not None:
            point, limit = 1.0, min(steps, self.eval_every / self.eval_resolution)
            while point <= limit:
                extra.add(int(math.ceil(point - 1e-9)))
                point = max(point * (1.0 + self.eval_resolution), point + 1.0)
        return tuple((s, s in full) for s in sorted(full | extra))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        for optional in ("eval_resolution", "test_examples"):
            if out[optional] is None:
                # Unset, it is left out: the hashes of specs written before it existed stay as they were.
                out.pop(optional)
        if not out["augmentations"]:
            out.pop("augmentations")  # likewise
        if out["optimizer"]["reference_batch_size"] is None:
            out["optimizer"].pop("reference_batch_size")  # likewise
        if out["schedule"]["decay_every_epochs"] is None:
            out["schedule"].pop("decay_every_epochs")  # likewise
        for variant in out["variants"]:
            if variant["batch_size"] is None:
                variant.pop("batch_size")  # likewise
        return out

    def hash(self) -> str:
        """Content hash of everything that influences a result (not the file name)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "ExperimentSpec":
        """A copy with top-level fields changed, re-validated as if it had been loaded."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "source"]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise SpecError(f"{self.source}: {unknown[0]}: unknown field; fields: {', '.join(fields)}")
        data = self.to_dict()
        data.update({k: _plain(v) for k, v in changes.items()})
        return from_dict(_to_toml_shape(data), source=self.source)


# ----------------------------------------------------------------------------- validation

_REQUIRED = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _plain(value: Any) -> Any:
    """Spec dataclasses (as `replace` may receive them) -> the dicts `to_dict` holds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _check_name(c: "_Checker", field: str, name: str) -> None:
    # Names become directory names (runs/<name>, <out>/runs/<backend>/<variant>): no
    # separators, no leading dot ("..", hidden files), nothing a shell needs quoted.
    if not name or not name[0].isalnum() or not all(ch.isalnum() or ch in "-_." for ch in name):
        c.fail(field, f"must start with a letter or digit and use letters, digits, '-', '_' or '.' only, got {name!r}")


class _Checker:
    """Pops validated fields out of one TOML table, reporting problems as SpecError."""

    def __init__(self, source: str, prefix: str, table: Any):
        self.source, self.prefix = source, prefix
        if not isinstance(table, dict):
            self.fail("", f"expected a table, got {type(table).__name__}")
        self.table = dict(table)

    def fail(self, field: str, message: str):
        where = f"{self.prefix}{field}" if field else self.prefix.rstrip(".") or "spec"
        raise SpecError(f"{self.source}: {where}: {message}")

    def only(self, allowed: tuple[str, ...], context: str = "", elsewhere: dict[str, str] | None = None) -> None:
        """Reject any key outside `allowed`, naming what is allowed (and where a key belongs)."""
        for key in sorted(self.table, key=str):
            if key in allowed:
                continue
            if elsewhere and key in elsewhere:
                problem = f"does not apply{context}; {elsewhere[key]}"
            else:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                problem = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            self.fail(str(key), f"{problem}; allowed here: {', '.join(allowed)}")

    def _take(self, field: str, default: Any) -> Any:
        if field in self.table:
            return self.table.pop(field)
        if default is _REQUIRED:
            self.fail(field, "is required")
        return default

    def string(self, field, default=_REQUIRED, choices=None) -> str:
        v = self._take(field, default)
        if not isinstance(v, str):
            self.fail(field, f"expected a string, got {v!r}")
        if choices is not None and v not in choices:
            self.fail(field, f"unknown value {v!r}; allowed: {', '.join(choices)}")
        return v

    def integer(self, field, default=_REQUIRED, minimum=None) -> int:
        v = self._take(field, default)
        if not _is_int(v):
            self.fail(field, f"expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            self.fail(field, f"must be >= {minimum}, got {v}")
        return v

    def number(self, field, default=_REQUIRED, low=None, high=None, low_open=False, high_open=False) -> float:
        v = self._take(field, default)
        if not _is_number(v):
            self.fail(field, f"expected a finite number, got {v!r}")
        if low is not None and (v < low or (low_open and v == low)):
            self.fail(field, f"must be {'>' if low_open else '>='} {low}, got {v}")
        if high is not None and (v > high or (high_open and v == high)):
            self.fail(field, f"must be {'<' if high_open else '<='} {high}, got {v}")
        return float(v)

    def boolean(self, field, default=_REQUIRED) -> bool:
        v = self._take(field, default)
        if not isinstance(v, bool):
            self.fail(field, f"expected true or false, got {v!r}")
        return v

    def int_list(self, field, default=_REQUIRED, minimum=None) -> tuple[int, ...]:
        v = self._take(field, default)
        if not isinstance(v, (list, tuple)) or not all(_is_int(x) for x in v):
            self.fail(field, f"expected a list of integers, got {v!r}")
        if minimum is not None and any(x < minimum for x in v):
            self.fail(field, f"every entry must be >= {minimum}, got {list(v)}")
        return tuple(v)

    def number_list(self, field, default=_REQUIRED) -> tuple[float, ...]:
        v = self._take(field, default)
        if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
            self.fail(field, f"expected a list of numbers, got {v!r}")
        return tuple(float(x) for x in v)

    def string_list(self, field, default=_REQUIRED) -> tuple[str, ...]:
        v = self._take(field, default)
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            self.fail(field, f"expected a list of strings, got {v!r}")
        if len(set(v)) != len(v):
            self.fail(field, f"entries must be distinct, got {list(v)}")
        return tuple(v)

    def done(self):
        if self.table:
            key = sorted(self.table, key=str)[0]
            self.fail(str(key), "unknown key (check the spelling; see `normbench specs --format`)")


def _optimizer(source: str, table: Any) -> OptimizerSpec:
    c = _Checker(source, "optimizer.", table)
    name = c.string("name", choices=OPTIMIZERS)
    c.only(OPTIMIZER_KEYS[name], f" to optimizer {name!r}", _belongs_to(OPTIMIZER_KEYS, "optimizer"))
    fields = dict(
        name=name,
        learning_rate=c.number("learning_rate", low=0.0, low_open=True),
        reference_batch_size=c.integer("reference_batch_size", None, minimum=1) if "reference_batch_size" in c.table else None,
        weight_decay=c.number("weight_decay", 0.0, low=0.0),
    )
    # Only the fields an optimizer uses are accepted, so a typo'd or misplaced
    # hyperparameter cannot be silently ignored.
    if name == "sgd":
        fields["momentum"] = c.number("momentum", 0.0, low=0.0, high=1.0, high_open=True)
        fields["nesterov"] = c.boolean("nesterov", False)
        if fields["nesterov"] and fields["momentum"] == 0.0:
            c.fail("nesterov", "Nesterov momentum needs momentum > 0")
    elif name == "rmsprop":
        fields["decay"] = c.number("decay", 0.9, low=0.0, high=1.0, high_open=True)
        fields["momentum"] = c.number("momentum", 0.0, low=0.0, high=1.0, high_open=True)
        fields["epsilon"] = c.number("epsilon", 1e-10, low=0.0, low_open=True)
    elif name == "adam":
        fields["beta1"] = c.number("beta1", 0.9, low=0.0, high=1.0, high_open=True)
        fields["beta2"] = c.number("beta2", 0.999, low=0.0, high=1.0, high_open=True)
        fields["epsilon"] = c.number("epsilon", 1e-8, low=0.0, low_open=True)
    c.done()
    return OptimizerSpec(**fields)


def _schedule(source: str, table: Any) -> ScheduleSpec:
    c = _Checker(source, "schedule.", table)
    name = c.string("name", "constant", choices=SCHEDULES)
    c.only(SCHEDULE_KEYS[name], f" to schedule {name!r}", _belongs_to(SCHEDULE_KEYS, "schedule"))
    fields = dict(name=name, warmup_steps=c.integer("warmup_steps", 0, minimum=0))
    if name == "step_decay":
        fields["decay_rate"] = c.number("decay_rate", low=0.0, high=1.0, low_open=True)
        if "decay_every_epochs" in c.table:
            if "decay_every" in c.table:
                c.fail("decay_every_epochs", "set either decay_every (steps) or decay_every_epochs, not both")
            fields["decay_every_epochs"] = c.number("decay_every_epochs", low=0.0, low_open=True)
        else:
            fields["decay_every"] = c.integer("decay_every", minimum=1)
    elif name == "piecewise":
        boundaries = c.int_list("boundaries", minimum=1)
        multipliers = c.number_list("multipliers")
        if list(boundaries) != sorted(set(boundaries)):
            c.fail("boundaries", f"must be strictly increasing, got {list(boundaries)}")
        if len(multipliers) != len(boundaries) + 1:
            c.fail("multipliers", f"needs len(boundaries) + 1 = {len(boundaries) + 1} entries, got {len(multipliers)}")
        if any(m < 0 for m in multipliers):
            c.fail("multipliers", f"must be >= 0, got {list(multipliers)}")
        fields.update(boundaries=boundaries, multipliers=multipliers)
    c.done()
    return ScheduleSpec(**fields)


# ----------------------------------------------------------------------------- plugins


def _registries():
    # Local imports: the registries scan their folders on first use.
    from normbench import auxiliary_losses, normalizations

    return normalizations, auxiliary_losses


def _plugin(c: "_Checker", field: str, raw: Any, registry, what: str, defaults: dict[str, dict]) -> PluginSpec:
    """A plugin reference: a name string (its defaults) or an inline table {name = ..., option = ...}."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        c.fail(field, f"expected a {what} name or an inline table {{ name = \"...\", ... }}, got {raw!r}")
    table = dict(raw)
    name = table.pop("name", None)
    if not isinstance(name, str):
        c.fail(field, f"needs name = one of: {', '.join(registry.names())}")
    if name not in registry.REGISTRY:
        c.fail(f"{field}.name" if "name" in raw and len(raw) > 1 else field, str(_unknown(registry, name, what)))
    cls = registry.get(name)
    allowed = tuple(o.name for o in cls.options)
    for key in sorted(table, key=str):
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            c.fail(f"{field}.{key}", f"unknown option of {what} {name!r}{hint}; its options: {', '.join(allowed) or 'none'}")
    resolved = []
    for option in cls.options:
        origin = f"{field}.{option.name}"
        if option.name in table:
            value = table[option.name]
        elif option.name in defaults.get(name, {}):
            value, origin = defaults[name][option.name], f"[{defaults[name]['__table__']}].{option.name}"
        elif option.default is REQUIRED:
            c.fail(origin, f"is required by {what} {name!r} ({option.help})")
        else:
            value = option.default
        if option.kind == "method":
            from normbench import normalizations

            value = None if value is None and option.optional else _plugin(c, origin, value, normalizations, "normalization method", defaults)
        else:
            problem = check_option(option, value)
            if problem:
                raise SpecError(f"{c.source}: {c.prefix}{origin}: {problem}" if not origin.startswith("[") else f"{c.source}: {origin}: {problem}")
            if option.kind == "number" and value is not None:
                value = float(value)
        if option.keyed_only_when_set and value == option.default:
            continue  # the plugin falls back to the default itself
        resolved.append((option.name, value))
    return PluginSpec(name, tuple(resolved))


def _augmentations(c: "_Checker") -> tuple[PluginSpec, ...]:
    """`augmentations = ["horizontal_flip", { name = "random_crop", padding = 4 }]`: names or inline tables, applied in order."""
    from normbench import augmentations

    raw = c._take("augmentations", [])
    if not isinstance(raw, list):
        c.fail("augmentations", f"expected a list of augmentation names or inline tables "
                                f"[\"horizontal_flip\", {{ name = \"random_crop\", padding = 4 }}], got {raw!r}")
    return tuple(_plugin(c, f"augmentations[{k}]", item, augmentations, "augmentation", {}) for k, item in enumerate(raw))


def _unknown(registry, name, what):
    try:
        registry.get(name)
    except KeyError as exc:
        return exc
    return f"unknown {what} {name!r}"


def _plugin_tables(c: "_Checker") -> tuple[dict[str, dict], tuple]:
    """Pop every top-level table named after a plugin (or a legacy shorthand's table) and
    return ({plugin name: option defaults}, the tables as written, for `to_toml`)."""
    normalizations, auxiliary_losses = _registries()
    # [standardization_loss] is the legacy spelling of [standardization]: the table of the
    # plugin that the normalization shorthand of the same name means.
    aliases = {short: loss for short, (loss, _) in auxiliary_losses.normalization_shorthands().items()}
    defaults: dict[str, dict] = {}
    written = []
    for key in [k for k in list(c.table) if isinstance(c.table.get(k), dict)]:
        plugin = aliases.get(key, key)
        registry = normalizations if plugin in normalizations.REGISTRY else auxiliary_losses if plugin in auxiliary_losses.REGISTRY else None
        if registry is None:
            continue
        table = c.table.pop(key)
        cls = registry.get(plugin)
        allowed = tuple(o.name for o in cls.options if o.kind != "method" and o.name not in ("weight",))
        for field, value in table.items():
            if field not in allowed:
                close = difflib.get_close_matches(str(field), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                c.fail(f"{key}.{field}", f"unknown key{hint}; allowed here: {', '.join(allowed)}")
            option = next(o for o in cls.options if o.name == field)
            problem = check_option(option, value)
            if problem:
                c.fail(f"{key}.{field}", problem)
        defaults[plugin] = {**table, "__table__": key}
        written.append((key, tuple(sorted(table.items()))))
    return defaults, tuple(written)


def _variant(source: str, index: int, table: Any, defaults: dict[str, dict]) -> VariantSpec:
    normalizations, auxiliary_losses = _registries()
    c = _Checker(source, f"variant[{index}].", table)
    c.only(VARIANT_KEYS)
    name = c.string("name")
    _check_name(c, "name", name)
    raw_norm = c._take("normalization", "none")
    losses: list[PluginSpec] = []
    loss_shorthands = auxiliary_losses.normalization_shorthands()
    method_shorthands = normalizations.shorthands()
    weight_fields = {field for _, field in loss_shorthands.values()}
    if isinstance(raw_norm, str) and raw_norm in loss_shorthands:
        # `normalization = "standardization_loss"` + `standardization_loss_weight`: no
        # normalization plus that loss (the syntax of normbench's first specs).
        loss_name, weight_field = loss_shorthands[raw_norm]
        weight = c.number(weight_field, low=0.0, low_open=True)
        losses.append(_plugin(c, weight_field, {"name": loss_name, "weight": weight}, auxiliary_losses, "auxiliary loss", defaults))
        normalization = _plugin(c, "normalization", "none", normalizations, "normalization method", defaults)
    else:
        for field in sorted(weight_fields):
            if field in c.table:
                shorthand = next(s for s, (_, f) in loss_shorthands.items() if f == field)
                c.fail(field, f"only applies to normalization = \"{shorthand}\", not {raw_norm!r}; remove it, or write "
                       f"auxiliary_losses = [{{ name = \"{loss_shorthands[shorthand][0]}\", weight = ... }}]")
        if isinstance(raw_norm, str) and raw_norm in method_shorthands:
            method, options = method_shorthands[raw_norm]
            raw_norm = {"name": method, **options}
        normalization = _plugin(c, "normalization", raw_norm, normalizations, "normalization method", defaults)
    affine = c.boolean("affine", False)
    raw_losses = c._take("auxiliary_losses", [])
    if not isinstance(raw_losses, list):
        c.fail("auxiliary_losses", f"expected a list of inline tables [{{ name = \"...\", weight = ... }}], got {raw_losses!r}")
    for k, raw in enumerate(raw_losses):
        losses.append(_plugin(c, f"auxiliary_losses[{k}]", raw, auxiliary_losses, "auxiliary loss", defaults))
    names = [loss.name for loss in losses]
    if len(set(names)) != len(names):
        c.fail("auxiliary_losses", f"each auxiliary loss at most once, got {names}")
    steps = c.integer("steps", None, minimum=1) if "steps" in c.table else None
    batch_size = c.integer("batch_size", None, minimum=1) if "batch_size" in c.table else None
    model = c.string("model") if "model" in c.table else None
    if model is not None:
        from normbench import architectures

        if model not in architectures.REGISTRY:
            c.fail("model", f"{_unknown(architectures, model, 'architecture')} (see `normbench list`)")
    c.done()
    return VariantSpec(name=name, normalization=normalization, affine=affine, auxiliary_losses=tuple(losses), steps=steps,
                       model=model, batch_size=batch_size)


def from_dict(data: Any, source: str = "<memory>") -> ExperimentSpec:
    """Validate a parsed TOML document and build the spec (raises SpecError)."""
    from normbench import architectures, datasets

    data = copy.deepcopy(data)
    c = _Checker(source, "", data)
    defaults, written = _plugin_tables(c)
    c.only(TOP_LEVEL_KEYS, elsewhere=_misplaced_top_level_keys())
    name = c.string("name")
    _check_name(c, "name", name)
    description = c.string("description", "")
    model = c.string("model")
    if model not in architectures.REGISTRY:
        c.fail("model", f"{_unknown(architectures, model, 'architecture')} (see `normbench list`)")
    dataset = c.string("dataset", choices=tuple(datasets.names()))
    dtype = c.string("dtype", "float32", choices=DTYPES)
    batch_size = c.integer("batch_size", minimum=1)
    steps = c.integer("steps", minimum=1)
    eval_every = c.integer("eval_every", minimum=1)
    eval_resolution = c.number("eval_resolution", None, low=0.0, high=1.0, low_open=True, high_open=True) \
        if "eval_resolution" in c.table else None
    train_eval_examples = c.integer("train_eval_examples", 10000, minimum=1)
    test_examples = c.integer("test_examples", None, minimum=1) if "test_examples" in c.table else None
    raw_seeds = c._take("seeds", _REQUIRED)
    if _is_int(raw_seeds):
        if not 1 <= raw_seeds <= MAX_SEEDS:
            c.fail("seeds", f"a seed count must be in 1..{MAX_SEEDS}, got {raw_seeds}")
        seeds = tuple(range(raw_seeds))
    else:
        c.table["seeds"] = raw_seeds
        seeds = c.int_list("seeds", minimum=0)
        if not seeds:
            c.fail("seeds", "needs at least one seed")
        if len(set(seeds)) != len(seeds):
            c.fail("seeds", f"seeds must be distinct, got {list(seeds)}")
        if len(seeds) > MAX_SEEDS:
            c.fail("seeds", f"at most {MAX_SEEDS} seeds, got {len(seeds)}")
    track = c.string_list("track_percentiles", ())
    augmentations = _augmentations(c)
    optimizer = _optimizer(source, c._take("optimizer", _REQUIRED))
    schedule = _schedule(source, c._take("schedule", {}))
    raw_variants = c._take("variant", _REQUIRED)
    if not isinstance(raw_variants, list) or not raw_variants:
        c.fail("variant", f"expected one or more [[variant]] tables (double brackets), got {type(raw_variants).__name__}")
    variants = tuple(_variant(source, i, v, defaults) for i, v in enumerate(raw_variants))
    c.done()

    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"{source}: variant: duplicate variant names {duplicates}; each variant needs its own name")
    spec = ExperimentSpec(
        name=name, description=description, model=model, dataset=dataset, dtype=dtype,
        batch_size=batch_size, steps=steps, eval_every=eval_every, eval_resolution=eval_resolution,
        test_examples=test_examples, seeds=seeds,
        train_eval_examples=train_eval_examples, track_percentiles=track, augmentations=augmentations, variants=variants,
        optimizer=optimizer, schedule=schedule, plugin_defaults=written, source=source,
    )
    _check_consistency(spec)
    return spec


def _belongs_to(keys_by_name: dict[str, tuple[str, ...]], table: str) -> dict[str, str]:
    """key -> "it is a setting of optimizer name = 'sgd' or 'rmsprop'", for every key some name accepts."""
    owners: dict[str, list[str]] = {}
    for choice, keys in keys_by_name.items():
        for key in keys:
            owners.setdefault(key, []).append(choice)
    return {k: f"it is a setting of {table} name = {' or '.join(repr(n) for n in names)}" for k, names in owners.items()}


def _misplaced_top_level_keys() -> dict[str, str]:
    """Table fields written at the top level (a missing [table] header) -> where they belong."""
    normalizations, auxiliary_losses = _registries()
    tables: dict[str, list[str]] = {}
    sources = [("[optimizer]", sum(OPTIMIZER_KEYS.values(), ())), ("[schedule]", sum(SCHEDULE_KEYS.values(), ())),
               ("[[variant]]", VARIANT_KEYS)]
    for registry in (normalizations, auxiliary_losses):
        for plugin, cls in registry.REGISTRY.items():
            sources.append((f"[{plugin}]", tuple(o.name for o in cls.options if o.kind != "method" and o.name != "weight")))
    for header, keys in sources:
        for key in keys:
            if key not in TOP_LEVEL_KEYS and header not in tables.setdefault(key, []):
                tables[key].append(header)
    return {key: f"it belongs in a {' or '.join(headers)} table" for key, headers in tables.items() if headers}


def _check_consistency(spec: ExperimentSpec) -> None:
    """Cross-field checks that need the architecture and data set: every method must fit
    every slot it fills, batch statistics need enough values, tracked layers must exist."""
    from normbench import architectures, datasets

    info = datasets.info(spec.dataset)
    if spec.batch_size > info.train_examples:
        raise SpecError(f"{spec.source}: batch_size: {spec.batch_size} exceeds the {info.train_examples} training examples of {spec.dataset}")
    for index, variant in enumerate(spec.variants):
        if variant.batch_size is not None and variant.batch_size > info.train_examples:
            raise SpecError(f"{spec.source}: variant[{index}].batch_size: {variant.batch_size} exceeds the "
                            f"{info.train_examples} training examples of {spec.dataset}")
    if spec.test_examples is not None and spec.test_examples > info.test_examples:
        raise SpecError(f"{spec.source}: test_examples: {spec.test_examples} exceeds the {info.test_examples} test examples of {spec.dataset}")
    if spec.augmentations:
        from normbench import augmentations

        for index, plugin in enumerate(spec.augmentations):
            wanted = augmentations.get(plugin.name).input
            if wanted != info.kind:
                raise SpecError(f"{spec.source}: augmentations[{index}]: {plugin.name!r} augments {wanted.replace('_', ' ')}, "
                                f"but data set {spec.dataset!r} holds {info.kind.replace('_', ' ')}; "
                                f"use one of: {', '.join(n for n in augmentations.names() if augmentations.get(n).input == info.kind)}")
    if spec.train_eval_examples > info.train_examples:
        raise SpecError(f"{spec.source}: train_eval_examples: {spec.train_eval_examples} exceeds the {info.train_examples} training examples of {spec.dataset}")
    models = {spec.model: "model", **{v.model: f"variant[{i}].model" for i, v in enumerate(spec.variants) if v.model}}
    for model, field in models.items():
        arch = architectures.get(model)
        layer_names = [slot.layer for slot in arch.slots]
        for layer in spec.track_percentiles:
            if layer not in layer_names:
                raise SpecError(f"{spec.source}: track_percentiles: model {model!r} has no normalized layer {layer!r}; it has {layer_names}")
        if tuple(arch.input_shape) != tuple(info.image_shape):
            raise SpecError(f"{spec.source}: {field}: {model!r} expects inputs {arch.input_shape}, {spec.dataset!r} gives {info.image_shape}")
        if arch.num_classes != info.num_classes:
            raise SpecError(f"{spec.source}: {field}: {model!r} predicts {arch.num_classes} classes, {spec.dataset!r} has {info.num_classes}")
    from normbench import plan as plan_module

    for index, variant in enumerate(spec.variants):
        problem = plan_module.check_variant(spec, variant, architectures.get(spec.model_for(variant)).slots)
        if problem:
            field, message = problem
            raise SpecError(f"{spec.source}: variant[{index}].{field}: {message}")


def _to_toml_shape(data: dict[str, Any]) -> dict[str, Any]:
    """Turn `ExperimentSpec.to_dict()` back into the TOML document shape."""
    out = dict(data)
    for optional in ("eval_resolution", "test_examples"):
        if optional in out and out[optional] is None:
            out.pop(optional)
    if out.get("augmentations"):
        out["augmentations"] = [_plugin_toml(a) for a in out["augmentations"]]
    else:
        out.pop("augmentations", None)
    out["variant"] = [_variant_toml(var) for var in out.pop("variants")]
    out["seeds"] = out["seeds"] if isinstance(out["seeds"], int) else list(out["seeds"])
    out["track_percentiles"] = list(out["track_percentiles"])
    opt = dict(out["optimizer"])
    keep = {"sgd": ("momentum", "nesterov"), "rmsprop": ("decay", "momentum", "epsilon"), "adam": ("beta1", "beta2", "epsilon")}[opt["name"]]
    out["optimizer"] = {k: v for k, v in opt.items()
                        if k in ("name", "learning_rate", "weight_decay") + keep
                        or (k == "reference_batch_size" and v is not None)}
    sched = dict(out["schedule"])
    keep = {"constant": (), "step_decay": ("decay_rate", "decay_every"), "piecewise": ("boundaries", "multipliers")}[sched["name"]]
    if sched.get("decay_every_epochs") is not None:  # absent otherwise: the specs written before it keep their hashes
        keep = ("decay_rate", "decay_every_epochs")
    out["schedule"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sched.items() if k in ("name", "warmup_steps") + keep}
    for table, fields in out.pop("plugin_defaults"):
        out[table] = {k: v for k, v in fields}
    return out


def _plugin_toml(plugin: dict | PluginSpec) -> dict[str, Any]:
    """A PluginSpec (or its asdict form) -> the inline table {name = ..., option = ...}."""
    if isinstance(plugin, PluginSpec):
        plugin = dataclasses.asdict(plugin)
    out = {"name": plugin["name"]}
    for key, value in plugin["options"]:
        if isinstance(value, dict) and "options" in value:
            value = _plugin_toml(value)
        if value is not None:
            out[key] = value
    return out


def _variant_toml(var: dict | VariantSpec) -> dict[str, Any]:
    if isinstance(var, VariantSpec):
        var = dataclasses.asdict(var)
    normalization = var.get("normalization")
    if not (isinstance(normalization, dict) and isinstance(normalization.get("options"), (list, tuple))):
        # Already in the TOML shape (a `replace(variants=[...])` argument, its methods as
        # strings or inline tables, not `asdict`'s {name, options}): drop unset fields,
        # and a shorthand's weight field where the variant does not use that shorthand.
        _, auxiliary_losses = _registries()
        owners = {field: short for short, (_, field) in auxiliary_losses.normalization_shorthands().items()}
        return {k: v for k, v in var.items()
                if v is not None and not (k in owners and var.get("normalization") != owners[k])}
    out = {"name": var["name"], "normalization": _plugin_toml(var["normalization"])}
    if var.get("affine"):
        out["affine"] = True
    if var.get("auxiliary_losses"):
        out["auxiliary_losses"] = [_plugin_toml(loss) for loss in var["auxiliary_losses"]]
    if var.get("steps") is not None:
        out["steps"] = var["steps"]
    if var.get("model") is not None:
        out["model"] = var["model"]
    if var.get("batch_size") is not None:
        out["batch_size"] = var["batch_size"]
    return out


def to_toml(spec: ExperimentSpec) -> str:
    """Serialize a spec back to TOML (round-trips through `loads`)."""
    doc = _to_toml_shape(spec.to_dict())
    lines: list[str] = []
    tables = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            tables[key] = value
        elif key != "variant":
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables.items():
        lines.append(f"\n[{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    for var in doc["variant"]:
        lines.append("\n[[variant]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in var.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (a plugin with its options)
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_string(text: str) -> str:
    """A TOML basic string. Not json.dumps: TOML forbids the surrogate-pair escapes JSON
    writes for characters outside the BMP, and needs DEL escaped."""
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# ----------------------------------------------------------------------------- loading


def loads(text: str, source: str = "<string>") -> ExperimentSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # "Invalid value (at line 3, column 8)" -> "<file>: line 3, column 8: TOML syntax error: invalid value"
        match = re.fullmatch(r"(.*?)\s*\(at (line \d+, column \d+|end of document)\)", str(exc))
        where, problem = (match.group(2), match.group(1)) if match else ("TOML", str(exc))
        raise SpecError(f"{source}: {where}: TOML syntax error: {problem[:1].lower() + problem[1:]}; "
                        "see `normbench specs --format` for the format") from None
    return from_dict(data, source=source)


def bundled_specs() -> dict[str, Path]:
    """Bundled spec name -> path, for `normbench specs` and name resolution."""
    folder = resources.files("normbench") / "specs"
    return {Path(p.name).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".toml")}


def source_label(source: str) -> str:
    """`source` as results record it: a bundled spec as its path inside the package
    (normbench/specs/NAME.toml), the same on every checkout, so regenerating committed
    results does not rewrite their provenance with this machine's install path; any other
    source as given."""
    try:
        path = Path(source).resolve()
    except (OSError, ValueError):
        return source
    for bundled in bundled_specs().values():
        if bundled.resolve() == path:
            return f"normbench/specs/{bundled.name}"
    return source


def resolve_spec_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SpecError(f"{path}: no such spec file; `normbench specs` lists the bundled ones")
        return path
    bundled = bundled_specs()
    if str(name_or_path) in bundled:
        return bundled[str(name_or_path)]
    raise SpecError(f"{name_or_path}: neither a spec file nor a bundled spec; bundled: {', '.join(bundled)}")


def load(name_or_path: str | Path) -> ExperimentSpec:
    """Load and validate a spec from a path or a bundled name."""
    path = resolve_spec_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from None
    return loads(text, source=str(path))
