"""The paper's models, written once, framework-neutral.

An architecture is a list of hidden layers (each followed by a normalization slot and a
ReLU) and a dense head. `forward` runs it against an `ops` object: the primitive set
every backend implements (see `normbench.backends.base.Ops`). Nothing here imports a
framework; arithmetic between arrays uses Python operators, which all three support.

Canonical conventions (each backend converts at its own edge, never here):
- images are NHWC; conv kernels HWIO; dense kernels (in, out);
- flattening a feature map orders features as (h, w, c);
- padding is explicit: "same" means TensorFlow's SAME rule (output = ceil(in/stride),
  the odd pixel of padding at the bottom/right), turned into explicit (low, high) pads
  here, so PyTorch's symmetric integer padding can never change the alignment.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

DATASET_SHAPES = {
    "mnist": {"image_shape": (28, 28, 1), "num_classes": 10, "train_examples": 60000, "test_examples": 10000},
}


@dataclasses.dataclass(frozen=True)
class Conv:
    name: str
    out_channels: int
    kernel_size: int
    stride: int
    padding: str = "same"  # "same" (TensorFlow rule) or "valid"


@dataclasses.dataclass(frozen=True)
class Dense:
    name: str
    units: int


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    input_shape: tuple[int, int, int]  # (H, W, C)
    hidden: tuple[Conv | Dense, ...]
    num_classes: int
    head_name: str = "logits"

    @property
    def is_convolutional(self) -> bool:
        return any(isinstance(layer, Conv) for layer in self.hidden)

    def layer_shapes(self) -> list[tuple[str, tuple[int, ...], tuple[tuple[int, int], tuple[int, int]] | None]]:
        """(name, canonical kernel shape, explicit pads or None) for every layer, head last."""
        h, w, c = self.input_shape
        flat = None if isinstance(self.hidden[0], Conv) else h * w * c
        out = []
        for layer in self.hidden:
            if isinstance(layer, Conv):
                if flat is not None:
                    raise ValueError(f"{self.name}: a convolution cannot follow a dense layer")
                pad_h, out_h = conv_padding(h, layer.kernel_size, layer.stride, layer.padding)
                pad_w, out_w = conv_padding(w, layer.kernel_size, layer.stride, layer.padding)
                out.append((layer.name, (layer.kernel_size, layer.kernel_size, c, layer.out_channels), (pad_h, pad_w)))
                h, w, c = out_h, out_w, layer.out_channels
            else:
                fan_in = flat if flat is not None else h * w * c
                out.append((layer.name, (fan_in, layer.units), None))
                flat = layer.units
        fan_in = flat if flat is not None else h * w * c
        out.append((self.head_name, (fan_in, self.num_classes), None))
        return out


def conv_padding(size: int, kernel: int, stride: int, mode: str) -> tuple[tuple[int, int], int]:
    """Explicit (low, high) padding and output size for one spatial axis."""
    if mode == "valid":
        return (0, 0), (size - kernel) // stride + 1
    if mode != "same":
        raise ValueError(f"unknown padding {mode!r}")
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out


ARCHITECTURES: dict[str, Architecture] = {
    # Appendix A.1: 32, 16, 8 filters, 5x5, stride 2, ReLU, dense to 10 classes.
    "cnn3": Architecture("cnn3", (28, 28, 1), (Conv("conv1", 32, 5, 2), Conv("conv2", 16, 5, 2), Conv("conv3", 8, 5, 2)), 10),
    # Appendix A.2: 3 layers of 100 units, ReLU, dense to 10 classes.
    "mlp3": Architecture("mlp3", (28, 28, 1), (Dense("dense1", 100), Dense("dense2", 100), Dense("dense3", 100)), 10),
    # Tiny test-only variants for smoke tests and parity checks (same code paths).
    "cnn-tiny": Architecture("cnn-tiny", (28, 28, 1), (Conv("conv1", 4, 5, 2), Conv("conv2", 3, 3, 2)), 10),
    "mlp-tiny": Architecture("mlp-tiny", (28, 28, 1), (Dense("dense1", 8), Dense("dense2", 6)), 10),
}


# ----------------------------------------------------------------------------- parameters


def uses_batch_norm(normalization: str) -> bool:
    return normalization.startswith("batch_norm")


def init_params(arch: Architecture, normalization: str, seed_sequence: np.random.SeedSequence) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial (params, batch-norm state) in the canonical format, float64.

    Glorot-uniform kernels (TensorFlow's default: limit sqrt(6 / (fan_in + fan_out)),
    receptive field included in both fans), zero biases / shifts, unit scales. Kernels
    are drawn in layer order from one generator, independently of the normalization,
    so every variant of a seed starts from the same kernels.
    """
    rng = np.random.Generator(np.random.PCG64(seed_sequence))
    params: dict[str, np.ndarray] = {}
    state: dict[str, np.ndarray] = {}
    bn = uses_batch_norm(normalization)
    for name, shape, _ in arch.layer_shapes():
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        params[f"{name}/kernel"] = rng.uniform(-limit, limit, size=shape)
        channels = shape[-1]
        if bn and name != arch.head_name:
            # A bias before batch norm is cancelled by the mean subtraction: the shift after it replaces it.
            params[f"{name}/shift"] = np.zeros(channels)
            if normalization == "batch_norm_scale_shift":
                params[f"{name}/scale"] = np.ones(channels)
            state[f"{name}/running_mean"] = np.zeros(channels)
            state[f"{name}/running_var"] = np.ones(channels)
        else:
            params[f"{name}/bias"] = np.zeros(channels)
    return params, state


def kernel_names(params) -> list[str]:
    return [k for k in params if k.endswith("/kernel")]


# ----------------------------------------------------------------------------- forward


@dataclasses.dataclass
class ForwardOutput:
    logits: object
    preactivations: dict[str, object]  # input of each hidden layer's ReLU
    moments: dict[str, tuple[object, object]]  # per-channel (mean, biased var) of each pre-activation
    state: dict[str, object]  # updated batch-norm running statistics


def forward(ops, arch: Architecture, params: dict, state: dict, images, *, normalization: str, batch_norm, training: bool, need_moments: bool) -> ForwardOutput:
    """One forward pass. `batch_norm` is a `BatchNormSpec`; `images` are canonical-NHWC in the backend's layout."""
    x = images
    bn = uses_batch_norm(normalization)
    preacts, moments, new_state = {}, {}, dict(state)
    for (name, _, pads), layer in zip(arch.layer_shapes(), arch.hidden):
        if isinstance(layer, Conv):
            z = ops.conv2d(x, params[f"{name}/kernel"], layer.stride, pads)
        else:
            z = ops.dense(ops.flatten(x) if ops.ndim(x) > 2 else x, params[f"{name}/kernel"])
        if bn:
            scale = params.get(f"{name}/scale")
            if training:
                # Running statistics see the batch moments as constants (no gradient through them).
                count = ops.reduced_count(z)
                z, mean, var = ops.batch_norm_train(z, scale, params[f"{name}/shift"], batch_norm.epsilon)
                _update_running(ops, new_state, name, mean, var, count, batch_norm)
            else:
                mean, var = state[f"{name}/running_mean"], state[f"{name}/running_var"]
                z = ops.normalize(z, mean, var, batch_norm.epsilon)
                if scale is not None:
                    z = ops.scale_channels(z, scale)
                z = ops.add_channel_bias(z, params[f"{name}/shift"])
        else:
            z = ops.add_channel_bias(z, params[f"{name}/bias"])
        preacts[name] = z
        if need_moments:
            moments[name] = ops.channel_moments(z)
        x = ops.relu(z)
    head = arch.head_name
    x = ops.flatten(x) if ops.ndim(x) > 2 else x
    logits = ops.add_channel_bias(ops.dense(x, params[f"{head}/kernel"]), params[f"{head}/bias"])
    return ForwardOutput(logits=logits, preactivations=preacts, moments=moments, state=new_state)


def _update_running(ops, state: dict, name: str, mean, var, count: int, batch_norm) -> None:
    decay = batch_norm.running_decay
    if batch_norm.running_variance == "unbiased":
        var = var * (count / max(count - 1, 1))
    state[f"{name}/running_mean"] = ops.moving_average(state[f"{name}/running_mean"], mean, decay)
    state[f"{name}/running_var"] = ops.moving_average(state[f"{name}/running_var"], var, decay)
