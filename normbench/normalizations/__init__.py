"""Normalization methods, one file each; this folder is their registry.

A method fills the *normalization slot* of every hidden layer of an architecture:

    z = linear(x, method.kernel(kernel))          convolution or dense layer
    z = z + bias                                  only when the method has no offset of its own
    y = method.train(z) / method.infer(z)         the method's output (its own scale and shift included)
    y = y * affine_scale + affine_shift           only for variants with `affine = true`
    x = activation(y)

A plugin file defines one subclass of `Normalization` and binds it to `METHOD`. The class
states its name, options, parameters, state, and its training and inference forms, all
written once against the backend primitives (`normbench.backends.base.Ops`); its
docstring gives the formula. Nothing else lists methods: the spec validator, `normbench
list`, the asv grid, reports and figures read this registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from normbench.options import Option
from normbench.plugins import FolderRegistry, single


@dataclasses.dataclass(frozen=True)
class Slot:
    """One normalization slot: the layer it belongs to and the shape of what it normalizes.

    `shape` is one example's canonical shape: (H, W, C) after a convolution, (C,) after a
    dense layer. `kernel_shape` is the canonical kernel (HWIO or (in, out))."""

    layer: str
    kind: str  # "conv" | "dense"
    shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[-1]

    @property
    def spatial(self) -> bool:
        return len(self.shape) > 1


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method may need beyond its inputs: the spec's dtype (for constants)."""

    dtype: str = "float32"


class Normalization:
    """Base class of a normalization method. Subclasses set the class attributes and
    override what differs; the defaults describe a method that changes nothing.

    Parameters and state are named `<layer>/<suffix>`; the suffixes come from
    `parameters` and `state`. Kernels are named `<layer>/kernel` and are the only
    parameters that weight decay applies to.
    """

    name: str = ""
    label: str = ""  # for tables and figures: "batch norm"
    color: str | None = None  # figure colour; None: the next free colour
    summary: str = ""  # one line for `normbench list`
    options: tuple[Option, ...] = ()
    # Legacy `normalization = "<shorthand>"` strings this method accepts, with the options they mean.
    shorthands: dict[str, dict[str, Any]] = {}
    legacy_table: str | None = None  # see normbench.identity
    legacy_table_fields: tuple[str, ...] = ()
    # What the literature claims about the method, and where (for comparative reports).
    literature: str = ""

    def __init__(self, **options: Any):
        for option in self.options:
            setattr(self, option.name, options.get(option.name, option.default))
        self.settings = {o.name: getattr(self, o.name) for o in self.options}

    # ---- identity and description
    def canonical(self) -> dict[str, Any]:
        """{name, every option resolved}: what determines the method's arithmetic (run keys)."""
        out = {"name": self.name}
        for option in self.options:
            value = getattr(self, option.name)
            out[option.name] = value.canonical() if isinstance(value, Normalization) else value
        return out

    def describe(self) -> str:
        """'group_norm(groups=4)' for messages and labels."""
        parts = [f"{o.name}={getattr(self, o.name).describe() if isinstance(getattr(self, o.name), Normalization) else getattr(self, o.name)!r}"
                 for o in self.options if getattr(self, o.name) != o.default]
        return f"{self.name}({', '.join(parts)})" if parts else self.name

    # ---- declaration
    def check_slot(self, slot: Slot) -> str | None:
        """Why this method cannot fill `slot` (one sentence), or None."""
        return None

    def check_batch(self, batch_size: int, slot: Slot) -> str | None:
        """Why batches of `batch_size` cannot be normalized in `slot`, or None."""
        return None

    @property
    def provides_offset(self) -> bool:
        """True when the method has its own shift, so the layer needs no bias."""
        return False

    def parameters(self, slot: Slot) -> dict[str, np.ndarray]:
        """Initial values of the method's parameters in `slot`, by suffix (float64, canonical)."""
        return {}

    def kernel_parameter_names(self, slot: Slot) -> tuple[str, ...]:
        """Suffixes of `kernel_parameters`, known before any kernel is drawn."""
        return ()

    def kernel_parameters(self, slot: Slot, kernel: np.ndarray) -> dict[str, np.ndarray]:
        """Parameters initialised from the layer's initial kernel (weight normalization's
        gain), keyed by `kernel_parameter_names(slot)`."""
        return {}

    def state(self, slot: Slot) -> dict[str, np.ndarray]:
        """Initial non-trained state (running statistics), by suffix (float64)."""
        return {}

    # ---- computation (params and state: this slot's, by suffix)
    def kernel(self, ops, kernel, params: dict):
        """The kernel the layer convolves with (a reparameterization of the stored one)."""
        return kernel

    def train(self, ops, z, params: dict, state: dict, slot: Slot):
        """Training-mode output and new state: (y, state)."""
        return z, state

    def infer(self, ops, z, params: dict, state: dict, slot: Slot):
        """Inference-mode output."""
        return z

    def inference_affine(self, params: dict, state: dict, slot: Slot) -> tuple[np.ndarray, np.ndarray] | None:
        """`infer` as a per-channel map of the stored kernel's layer output, `infer(z) = z *
        multiplier + offset`: (multiplier, offset), float64 NumPy of shape (channels,), from
        this slot's NumPy parameters and state. It lets `normbench.folding` fold the method
        into the layer's kernel and bias. None (the default) when inference is no such map:
        statistics of each example's own values, or a reparameterized kernel."""
        return None


class PerExampleNormalization(Normalization):
    """Shared by the methods whose statistics are each example's own (layer, group and
    instance norm): they keep no state, compute the same thing in training and inference,
    and end with a learned per-channel scale (ones) and shift (zeros). A subclass has an
    `epsilon` option and writes `infer` with `ops.group_normalize`."""

    epsilon: float

    @property
    def provides_offset(self) -> bool:
        return True  # the mean subtraction cancels any bias before it

    def parameters(self, slot):
        return {"scale": np.ones(slot.channels), "shift": np.zeros(slot.channels)}

    def train(self, ops, z, params, state, slot):
        return self.infer(ops, z, params, state, slot), state


def _collect(module):
    method = getattr(module, "METHOD", None)
    return [] if method is None else [(method.name, method)]


REGISTRY = FolderRegistry(__name__, "normalization method", _collect)


def names() -> list[str]:
    return REGISTRY.names()


def get(name: str) -> type[Normalization]:
    return REGISTRY.get(name)


def shorthands() -> dict[str, tuple[str, dict[str, Any]]]:
    """Legacy normalization strings -> (method name, options), from every method's `shorthands`."""
    return {short: (name, dict(opts)) for name, cls in REGISTRY.items() for short, opts in cls.shorthands.items()}


__all__ = ["Context", "Normalization", "PerExampleNormalization", "REGISTRY", "Slot", "get", "names", "shorthands", "single"]
