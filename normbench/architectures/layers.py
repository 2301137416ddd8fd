"""The layer vocabulary architectures are written in, and the two ways it is run.

An architecture is a Python function `build(net, x) -> logits` written against `Net`:

    def build(net, x):
        x = net.conv("conv1", x, 32, kernel_size=5, stride=2)   # conv -> normalization slot -> ReLU
        x = net.dense("logits", x, 10, normalize=False, activation=None)
        return x

The same function is run twice: once by `declare` on shapes alone (which layers exist,
their kernels, explicit pads and slot shapes; no framework), and once per step by
`Net.apply` against a backend's primitives. A hidden layer is

    z = conv or dense(x, method.kernel(kernel));  z += bias (if the method has no offset)
    y = normalization method(z);  y = y * affine_scale + affine_shift (variant `affine`)
    x = activation(y)

and its slot output (before `affine`) is what auxiliary losses see; `y` after `affine`
is its *pre-activation*, recorded for parity tests and tracked percentiles.

Canonical conventions (each backend converts at its own edge, never here): activations
NHWC, conv kernels HWIO, dense kernels (in, out); flattening orders features (h, w, c);
"same" padding is TensorFlow's SAME rule (output ceil(in / stride), the odd padding
pixel at the bottom/right), turned into explicit (low, high) pads here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from normbench.normalizations import Slot


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution or dense layer, as `declare` found it."""

    name: str
    kind: str  # "conv" | "dense"
    kernel_shape: tuple[int, ...]  # canonical: HWIO or (in, out)
    out_shape: tuple[int, ...]  # one example's output, canonical
    normalized: bool  # has a normalization slot (hidden layers) or not (the head)
    stride: int = 1
    pads: tuple[tuple[int, int], tuple[int, int]] | None = None

    @property
    def slot(self) -> Slot:
        return Slot(self.name, self.kind, self.out_shape, self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    input_shape: tuple[int, ...]  # one example, canonical (H, W, C)
    num_classes: int
    build: Callable
    description: str = ""
    small: bool = False  # a test-sized configuration

    def layers(self) -> tuple[Layer, ...]:
        return declare(self)

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(layer.slot for layer in self.layers() if layer.normalized)

    @property
    def is_convolutional(self) -> bool:
        return any(layer.kind == "conv" for layer in self.layers())


def conv_padding(size: int, kernel: int, stride: int, mode: str) -> tuple[tuple[int, int], int]:
    """Explicit (low, high) padding and output size for one spatial axis."""
    if mode == "valid":
        return (0, 0), (size - kernel) // stride + 1
    if mode != "same":
        raise ValueError(f"unknown padding {mode!r}")
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out


# ----------------------------------------------------------------------------- declaring


class _Shape:
    """An activation during `declare`: one example's canonical shape."""

    def __init__(self, shape):
        self.shape = tuple(shape)


_DECLARED: dict[str, tuple[Layer, ...]] = {}


def declare(arch: Architecture) -> tuple[Layer, ...]:
    """Every layer of `arch` in call order, from shapes alone (cached per architecture)."""
    if arch.name not in _DECLARED:
        net = _DeclaringNet()
        out = arch.build(net, _Shape(arch.input_shape))
        if out.shape != (arch.num_classes,):
            raise ValueError(f"architecture {arch.name!r} returns {out.shape}, expected ({arch.num_classes},)")
        _DECLARED[arch.name] = tuple(net.layers)
    return _DECLARED[arch.name]


class _DeclaringNet:
    def __init__(self):
        self.layers: list[Layer] = []

    def _add(self, layer: Layer):
        if any(existing.name == layer.name for existing in self.layers):
            raise ValueError(f"layer name {layer.name!r} is used twice")
        self.layers.append(layer)

    def conv(self, name, x, channels, kernel_size, stride=1, padding="same", normalize=True, activation="relu"):
        h, w, c = x.shape
        pad_h, out_h = conv_padding(h, kernel_size, stride, padding)
        pad_w, out_w = conv_padding(w, kernel_size, stride, padding)
        self._add(Layer(name, "conv", (kernel_size, kernel_size, c, channels), (out_h, out_w, channels), normalize,
                        stride, (pad_h, pad_w)))
        return _Shape((out_h, out_w, channels))

    def dense(self, name, x, units, normalize=True, activation="relu"):
        self._add(Layer(name, "dense", (math.prod(x.shape), units), (units,), normalize))
        return _Shape((units,))

    def flatten(self, x):
        return _Shape((math.prod(x.shape),))

    def relu(self, x):
        return x


# ----------------------------------------------------------------------------- applying


class Net:
    """Runs an architecture on a backend: `logits = arch.build(net, images)`.

    `slot_fn(layer, z, kernel_reparam)` is supplied by the training program: it applies
    the variant's normalization method (and `affine`) to one slot and records what it
    saw; see `normbench.program`."""

    def __init__(self, ops, layers: tuple[Layer, ...], params: dict, linear_fn, slot_fn):
        self.ops, self.params = ops, params
        self._layers = {layer.name: layer for layer in layers}
        self._linear, self._slot = linear_fn, slot_fn

    def _activate(self, x, activation):
        if activation is None:
            return x
        if activation == "relu":
            return self.ops.relu(x)
        raise ValueError(f"unknown activation {activation!r}")

    def conv(self, name, x, channels, kernel_size, stride=1, padding="same", normalize=True, activation="relu"):
        layer = self._layers[name]
        z = self._linear(layer, x)
        return self._activate(self._slot(layer, z) if normalize else z, activation)

    def dense(self, name, x, units, normalize=True, activation="relu"):
        layer = self._layers[name]
        if self.ops.ndim(x) > 2:
            x = self.ops.flatten(x)
        z = self._linear(layer, x)
        return self._activate(self._slot(layer, z) if normalize else z, activation)

    def flatten(self, x):
        return self.ops.flatten(x) if self.ops.ndim(x) > 2 else x

    def relu(self, x):
        return self.ops.relu(x)
