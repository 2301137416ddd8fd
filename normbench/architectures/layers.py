"""The layer vocabulary architectures are written in, and the two ways it is run.

An architecture is a Python function `build(net, x) -> logits` written against `Net`:

    def build(net, x):
        x = net.conv("conv1", x, 32, kernel_size=5, stride=2)   # conv -> normalization slot -> ReLU
        x = net.dense("logits", x, 10, normalize=False, activation=None)
        return x

The vocabulary: `conv` (grouped with `groups`; `depthwise_conv`), `dense`, `max_pool`,
`avg_pool`, `global_avg_pool`, `global_max_pool` (over all spatial positions, or over
points stored as an (P, 1, C) image), `add` (residual connections), `concat` (channels),
`flatten` and `activation` ("relu", "relu6"). Only `conv` and `dense` own parameters and
normalization slots; the rest are shape functions on both sides. For PointNet:
`point_transform` (every point's channel vector times a per-example matrix), `matrix` (a
dense output viewed as per-example K x K matrices), `dropout` (on (batch, units)
activations; its masks come from the run's framework-free dropout stream, identical in
every backend) and `auxiliary_loss` (a weighted term the architecture adds to the
objective, e.g. PointNet's feature-transform orthogonality loss).

`conv` and `dense` take `bias=False` (no bias even without a normalization slot: TF-slim's
depthwise stems) and `kernel_init="zeros"` / `bias_init="identity"` (PointNet's T-Net
regressors start at the identity transform); otherwise kernels are Glorot uniform and
biases zero.

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
    groups: int = 1  # > 1: grouped convolution; = input channels: depthwise
    bias: bool = True  # False: never a bias (else: one unless the slot's method provides the offset)
    kernel_init: str = "glorot_uniform"  # | "zeros"
    bias_init: str = "zeros"  # | "identity": the flattened K x K identity (units = K * K)

    @property
    def slot(self) -> Slot:
        return Slot(self.name, self.kind, self.out_shape, self.kernel_shape)

    @property
    def multiply_accumulates(self) -> int:
        """Multiply-accumulates of the layer's forward pass for one example: every output
        value of a convolution costs kh x kw x (input channels / groups) of them, every
        output unit of a dense layer its fan-in. Normalization, activations and pooling are
        not counted (the convention of the published counts)."""
        fan_in = 1
        for size in self.kernel_shape[:-1]:
            fan_in *= size
        outputs = 1
        for size in self.out_shape:
            outputs *= size
        return fan_in * outputs


@dataclasses.dataclass(frozen=True)
class Dropout:
    """One dropout layer: each unit of `shape` (one example's) is zeroed with probability
    `rate` in training, the rest scaled by 1 / (1 - rate); inference passes through."""

    name: str
    shape: tuple[int, ...]
    rate: float


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

    def dropouts(self) -> tuple[Dropout, ...]:
        """The dropout layers, in call order."""
        return _declared(self).dropouts

    def auxiliary_losses(self) -> tuple[tuple[str, float], ...]:
        """(name, weight) of each loss term the architecture adds to the objective."""
        return _declared(self).losses

    @property
    def depth(self) -> int:
        """The most convolution, dense and point-transform layers on any path from the
        input to the logits (cnn3 and mlp3: 4, the head included)."""
        return _declared(self).depth

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
    """An activation during `declare`: one example's canonical shape, and its depth: the
    most convolution and dense layers on any path from the input to it."""

    def __init__(self, shape, depth: int = 0):
        self.shape = tuple(shape)
        self.depth = depth


@dataclasses.dataclass(frozen=True)
class _Declaration:
    layers: tuple[Layer, ...]
    dropouts: tuple[Dropout, ...]
    losses: tuple[tuple[str, float], ...]
    depth: int  # of the logits


_DECLARED: dict[str, _Declaration] = {}


def _declared(arch: Architecture) -> _Declaration:
    # Keyed by name and build function: tests declare networks of their own under reused names.
    key = (arch.name, arch.build, arch.input_shape, arch.num_classes)
    if key not in _DECLARED:
        net = _DeclaringNet()
        out = arch.build(net, _Shape(arch.input_shape))
        if out.shape != (arch.num_classes,):
            raise ValueError(f"architecture {arch.name!r} returns {out.shape}, expected ({arch.num_classes},)")
        _DECLARED[key] = _Declaration(tuple(net.layers), tuple(net.dropouts), tuple(net.losses), out.depth)
    return _DECLARED[key]


def declare(arch: Architecture) -> tuple[Layer, ...]:
    """Every layer of `arch` in call order, from shapes alone (cached per architecture)."""
    return _declared(arch).layers


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def window_geometry(shape, window, stride, padding):
    """Explicit pads and output (H, W) of a window of `window` (int or (h, w)) over an
    activation of canonical `shape` (H, W, C)."""
    kh, kw = _pair(window)
    pad_h, out_h = conv_padding(shape[0], kh, stride, padding)
    pad_w, out_w = conv_padding(shape[1], kw, stride, padding)
    return (kh, kw), (pad_h, pad_w), (out_h, out_w)


KERNEL_INITS = ("glorot_uniform", "zeros")
BIAS_INITS = ("zeros", "identity")


class _DeclaringNet:
    def __init__(self):
        self.layers: list[Layer] = []
        self.dropouts: list[Dropout] = []
        self.losses: list[tuple[str, float]] = []
        self._names: set[str] = set()

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"layer name {name!r} is used twice")
        self._names.add(name)

    def _add(self, layer: Layer):
        self._claim(layer.name)
        if layer.kernel_init not in KERNEL_INITS or layer.bias_init not in BIAS_INITS:
            raise ValueError(f"layer {layer.name!r}: kernel_init must be one of {KERNEL_INITS} and bias_init one of "
                             f"{BIAS_INITS}, got {layer.kernel_init!r} and {layer.bias_init!r}")
        if layer.bias_init == "identity" and math.isqrt(layer.kernel_shape[-1]) ** 2 != layer.kernel_shape[-1]:
            raise ValueError(f"layer {layer.name!r}: bias_init='identity' needs K * K units, got {layer.kernel_shape[-1]}")
        if layer.bias_init != "zeros" and (layer.normalized or not layer.bias):
            raise ValueError(f"layer {layer.name!r}: bias_init={layer.bias_init!r} needs a bias (normalize=False, bias=True)")
        self.layers.append(layer)

    def conv(self, name, x, channels, kernel_size, stride=1, padding="same", groups=1, normalize=True,
             activation="relu", bias=True):
        if len(x.shape) != 3:
            raise ValueError(f"layer {name!r}: a convolution needs an (H, W, C) input, got {x.shape}")
        c = x.shape[-1]
        if c % groups or channels % groups:
            raise ValueError(f"layer {name!r}: {c} input and {channels} output channels are not both divisible by "
                             f"groups = {groups}")
        self.activation(x, activation)
        (kh, kw), pads, (out_h, out_w) = window_geometry(x.shape, kernel_size, stride, padding)
        self._add(Layer(name, "conv", (kh, kw, c // groups, channels), (out_h, out_w, channels), normalize,
                        stride, pads, groups, bias))
        return _Shape((out_h, out_w, channels), x.depth + 1)

    def depthwise_conv(self, name, x, kernel_size, stride=1, multiplier=1, padding="same", normalize=True,
                       activation="relu", bias=True):
        return self.conv(name, x, x.shape[-1] * multiplier, kernel_size, stride, padding, groups=x.shape[-1],
                         normalize=normalize, activation=activation, bias=bias)

    def dense(self, name, x, units, normalize=True, activation="relu", bias=True, kernel_init="glorot_uniform",
              bias_init="zeros"):
        self.activation(x, activation)
        self._add(Layer(name, "dense", (math.prod(x.shape), units), (units,), normalize, bias=bias,
                        kernel_init=kernel_init, bias_init=bias_init))
        return _Shape((units,), x.depth + 1)

    def dropout(self, name, x, rate):
        if len(x.shape) != 1:
            raise ValueError(f"dropout {name!r}: needs a (batch, units) activation, got one example of shape {x.shape}")
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout {name!r}: rate must be in [0, 1), got {rate}")
        self._claim(name)
        self.dropouts.append(Dropout(name, x.shape, float(rate)))
        return x

    def matrix(self, x, size):
        if x.shape != (size * size,):
            raise ValueError(f"matrix: needs {size * size} units for a {size} x {size} matrix, got {x.shape}")
        return _Shape((size, size), x.depth)

    def point_transform(self, x, matrix):
        if len(x.shape) != 3 or x.shape[1] != 1 or matrix.shape[0] != x.shape[-1]:
            raise ValueError(f"point_transform: needs points (P, 1, K) and a K x K' matrix, got {x.shape} and {matrix.shape}")
        return _Shape((x.shape[0], 1, matrix.shape[1]), max(x.depth, matrix.depth) + 1)

    def orthogonality_loss(self, name, matrix, weight):
        if len(matrix.shape) != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"orthogonality_loss {name!r}: needs a square matrix, got {matrix.shape}")
        self._claim(name)
        self.losses.append((name, float(weight)))

    def _pool(self, x, window, stride, padding):
        if len(x.shape) != 3:
            raise ValueError(f"pooling needs an (H, W, C) input, got {x.shape}")
        _, _, (out_h, out_w) = window_geometry(x.shape, window, stride, padding)
        return _Shape((out_h, out_w, x.shape[-1]), x.depth)

    def max_pool(self, x, window, stride, padding="same"):
        return self._pool(x, window, stride, padding)

    def avg_pool(self, x, window, stride, padding="same"):
        return self._pool(x, window, stride, padding)

    def global_avg_pool(self, x):
        return _Shape(x.shape[-1:], x.depth)

    def global_max_pool(self, x):
        return _Shape(x.shape[-1:], x.depth)

    def add(self, a, b):
        if a.shape != b.shape:
            raise ValueError(f"add: shapes {a.shape} and {b.shape} differ")
        return _Shape(a.shape, max(a.depth, b.depth))

    def concat(self, xs):
        if len({x.shape[:-1] for x in xs}) != 1:
            raise ValueError(f"concat: spatial shapes differ: {[x.shape for x in xs]}")
        return _Shape((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs)), max(x.depth for x in xs))

    def flatten(self, x):
        return _Shape((math.prod(x.shape),), x.depth)

    def activation(self, x, kind="relu"):
        if kind is not None and kind not in ACTIVATIONS:
            raise ValueError(f"unknown activation {kind!r}; known: {', '.join(ACTIVATIONS)}")
        return x

    def relu(self, x):
        return x


ACTIVATIONS = ("relu", "relu6")


# ----------------------------------------------------------------------------- applying


class Net:
    """Runs an architecture on a backend: `logits = arch.build(net, images)`.

    `slot_fn(layer, z, kernel_reparam)` is supplied by the training program: it applies
    the variant's normalization method (and `affine`) to one slot and records what it
    saw; see `normbench.program`."""

    def __init__(self, ops, layers: tuple[Layer, ...], params: dict, linear_fn, slot_fn, dropout_masks=None):
        """`dropout_masks`: name -> this step's keep mask (1 keep, 0 drop), in training; None
        in inference, where dropout passes through."""
        self.ops, self.params = ops, params
        self._layers = {layer.name: layer for layer in layers}
        self._linear, self._slot = linear_fn, slot_fn
        self._masks = dropout_masks
        self.losses: dict[str, object] = {}  # auxiliary_loss name -> value (weights: Architecture.auxiliary_losses)

    def _activate(self, x, activation):
        if activation is None:
            return x
        if activation == "relu":
            return self.ops.relu(x)
        if activation == "relu6":
            return self.ops.relu6(x)
        raise ValueError(f"unknown activation {activation!r}")

    def conv(self, name, x, channels, kernel_size, stride=1, padding="same", groups=1, normalize=True,
             activation="relu", bias=True):
        layer = self._layers[name]
        z = self._linear(layer, x)
        return self._activate(self._slot(layer, z) if normalize else z, activation)

    def depthwise_conv(self, name, x, kernel_size, stride=1, multiplier=1, padding="same", normalize=True,
                       activation="relu", bias=True):
        return self.conv(name, x, None, kernel_size, stride, padding, normalize=normalize, activation=activation)

    def dense(self, name, x, units, normalize=True, activation="relu", bias=True, kernel_init="glorot_uniform",
              bias_init="zeros"):
        layer = self._layers[name]
        if self.ops.ndim(x) > 2:
            x = self.ops.flatten(x)
        z = self._linear(layer, x)
        return self._activate(self._slot(layer, z) if normalize else z, activation)

    def dropout(self, name, x, rate):
        if self._masks is None or rate == 0.0:
            return x
        # Inverted dropout: the kept units are scaled in training, inference is the identity.
        return x * self._masks[name] * (1.0 / (1.0 - rate))

    def matrix(self, x, size):
        return self.ops.reshape(x, (self.ops.shape(x)[0], size, size))

    def point_transform(self, x, matrix):
        batch, points, _, channels = self.ops.shape(x)
        out = self.ops.matmul(self.ops.reshape(x, (batch, points, channels)), matrix)
        return self.ops.reshape(out, (batch, points, 1, self.ops.shape(matrix)[-1]))

    def orthogonality_loss(self, name, matrix, weight):
        # PointNet's regularizer (Qi et al. 2017a, Section 4.2; its code's
        # tf.nn.l2_loss(A A^T - I)): 0.5 * ||A A^T - I||_F^2, summed over the batch.
        # A transform starts as the identity and stays near it, where A A^T - I is small
        # and A A^T is not: forming A A^T (or expanding the norm into sum(G * G) - 2 sum(A * A)
        # + B K, as this code once did) leaves float32 rounding of the ~1 entries in a value
        # of ~1e-3; pointnet-small's loss was 6-28% off float64 two steps in. With D = A - I
        # (exact for diagonal entries within a factor 2 of 1), A A^T - I = (D + D^T) + D D^T:
        # every term is as small as the result, so float32 keeps its relative precision.
        deviation = self.ops.add_to_diagonal(matrix, -1.0)
        residual = (deviation + self.ops.matrix_transpose(deviation)
                    + self.ops.matmul(deviation, deviation, transpose_b=True))
        self.losses[name] = 0.5 * self.ops.sum(residual * residual)

    def _geometry(self, x, window, stride, padding):
        window, pads, _ = window_geometry(self.ops.shape(x)[1:], window, stride, padding)
        return window, pads

    def max_pool(self, x, window, stride, padding="same"):
        window, pads = self._geometry(x, window, stride, padding)
        return self.ops.max_pool2d(x, window, stride, pads)

    def avg_pool(self, x, window, stride, padding="same"):
        window, pads = self._geometry(x, window, stride, padding)
        return self.ops.avg_pool2d(x, window, stride, pads)

    def global_avg_pool(self, x):
        return self.ops.mean(x, (1, 2))

    def global_max_pool(self, x):
        return self.ops.max(x, (1, 2))

    def add(self, a, b):
        return self.ops.add(a, b)

    def concat(self, xs):
        return self.ops.concat_channels(list(xs))

    def flatten(self, x):
        return self.ops.flatten(x) if self.ops.ndim(x) > 2 else x

    def activation(self, x, kind="relu"):
        return self._activate(x, kind)

    def relu(self, x):
        return self.ops.relu(x)
