"""Options of a plugin (a normalization method's `groups`, a loss's `weight`), declared once
in the plugin's file and validated by the spec loader with its one-line errors.

A plugin lists `Option`s; a spec gives values in an inline table
(`normalization = { name = "group_norm", groups = 4 }`) or, for defaults shared by every
variant, in a top-level table named after the plugin (`[batch_norm]`, as older specs
write `running_decay`). Resolution order: the variant's table, the top-level table, the
option's default.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    kind: str  # "number" | "integer" | "boolean" | "string" | "method"
    default: Any = REQUIRED
    help: str = ""
    low: float | None = None  # numbers and integers: allowed range
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()  # strings
    optional: bool = False  # None (absent) is a valid value; `default` is then None
    # An option added after results with this plugin were published: at its default it is
    # left out of the resolved spec, so those runs keep their run keys and spec hashes.
    keyed_only_when_set: bool = False

    def describe(self) -> str:
        """`groups` integer >= 1 (default 32): channels per group ..."""
        rng = ""
        if self.choices:
            rng = " | ".join(self.choices)
        elif self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
            hi = "" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
            rng = f"in {lo or '(-inf'}, {hi or 'inf)'}"
        default = "" if self.default is REQUIRED else (" (default: none)" if self.default is None else f" (default {self.default!r})")
        return f"{self.name} ({self.kind}{', ' + rng if rng else ''}){default}: {self.help}"


def check(option: Option, value: Any) -> str | None:
    """Why `value` is not valid for `option`, or None."""
    if value is None and option.optional:
        return None
    kind = option.kind
    if kind == "boolean":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if kind == "string":
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"
        if option.choices and value not in option.choices:
            return f"unknown value {value!r}; allowed: {', '.join(option.choices)}"
        return None
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if kind == "integer" and not isinstance(value, int):
            return f"expected an integer, got {value!r}"
        if option.low is not None and (value < option.low or (option.low_open and value == option.low)):
            return f"must be {'>' if option.low_open else '>='} {option.low}, got {value}"
        if option.high is not None and (value > option.high or (option.high_open and value == option.high)):
            return f"must be {'<' if option.high_open else '<='} {option.high}, got {value}"
        return None
    raise ValueError(f"unknown option kind {kind!r}")
