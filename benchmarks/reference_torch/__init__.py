"""A hand-written PyTorch training step: the yardstick for the torch backend's overhead
(`bench_ratios.ReferenceRatio`). The contract is in `benchmarks/_reference.py`.

Written the way a PyTorch user writes a functional training loop: leaf tensors in
PyTorch's layouts (NCHW activations, OIHW kernels, (out, in) dense weights), F.conv2d
with the bias inside the convolution (`groups` for grouped and depthwise ones),
F.max_pool2d / F.avg_pool2d, torch.cat, torch.bmm for PointNet's transforms,
torch.optim.SGD with weight decay on the kernels only, each method's own hand-written file
(normalizations/, auxiliary_losses/), and the batch gathered on the device from the
resident training set. The architecture's `build` function walks `_Network`, whose words
are these calls. Only the initial weights (so that both sides compute the same thing,
which tests/test_reference_loops.py checks), the batch order and the dropout masks come
from normbench; no backend code runs inside a step.

Convolution and pooling padding is what a PyTorch user writes: the symmetric `padding` of
window // 2 (torchvision's ResNet: 3 around the 7x7 stem, 1 around a 3x3 max pool). Where
TensorFlow's SAME rule pads asymmetrically (a stride-2 window over an even-sized input:
cnn3's three layers, ResNet's stem and downsampling 3x3s, MobileNet's and Inception's
stride-2 layers) that shifts every window by one pixel against
normbench's canonical alignment: the same shapes and FLOPs, not the same numbers. So the
timings compare normbench with the idiom, and `same_alignment=True` builds the loop that
computes exactly what normbench computes (symmetric pads through `padding`, the odd pixel
of an asymmetric pad through F.pad, as a PyTorch user reproducing a TensorFlow model
would): tests/test_reference_loops.py holds that one to normbench's losses, and
`bench_ratios.AlignmentCost` times it against the idiom.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from normbench.architectures import layers as vocabulary

from .. import _reference


def _torch_kernel(layer, kernel: np.ndarray, input_shape: tuple[int, ...] | None) -> np.ndarray:
    """A canonical kernel in PyTorch's layout. A dense layer after a convolution reads its
    input flattened in PyTorch's (c, h, w) order; normbench's rows are in (h, w, c) order,
    so the rows are permuted once here instead of the activations every step."""
    if layer.kind == "conv":
        return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW (depthwise: (channels, 1, kh, kw))
    if input_shape is not None and len(input_shape) == 3:
        h, w, c = input_shape
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    return kernel.T  # (in, out) -> F.linear's (out, in)


def _window_padding(pads, window, same_alignment):
    """(padding for the op, extra F.pad or None) of a window with canonical (low, high) pads.
    The idiom pads window // 2 on both sides of an axis SAME pads at all: "same" for odd
    windows at stride 1, and torchvision's choice at stride 2, with SAME's output size for
    odd windows. The exact loop, and an even window (where the idiom's size would differ),
    pad as normbench (TensorFlow's SAME) does, an asymmetric pad through F.pad."""
    (top, bottom), (left, right) = pads
    if not same_alignment and all(size % 2 for size in window):
        return tuple(size // 2 if low + high else 0 for size, (low, high) in zip(window, pads)), None
    if (top, left) == (bottom, right):
        return (top, left), None
    return 0, (left, right, top, bottom)


class _Network(_reference.Network):
    """The network of the plan, in PyTorch: `plan.arch.build(network, images)` calls these
    words of normbench's vocabulary, each written as a PyTorch user writes it (NCHW,
    F.conv2d with its bias, F.max_pool2d, torch.cat, torch.bmm). normbench's architecture
    file is the network's description here, as a model definition would be; no backend
    code runs."""

    def __init__(self, plan, params, state, method, hand_written, same_alignment):
        self.layers = {layer.name: layer for layer in plan.layers}
        self.params, self.state, self.method = params, state, method
        self.normalize, self.reparameterize = hand_written.normalize, getattr(hand_written, "kernel", None)
        self.suffixes = {layer.name: _reference.slot_names(plan, layer) for layer in plan.layers if layer.normalized}
        self.same_alignment = same_alignment
        self.affine = plan.affine
        self.masks = None  # this step's dropout keep masks, by name
        self.taps, self.loss = [], 0.0  # the slot outputs and the architecture's weighted losses of a step

    def layer(self, name, x, activation, padding):
        layer, kernel, bias, slot_params, state_names = self.weights(name)
        if layer.kind == "dense":
            z = F.linear(x.flatten(1), kernel, bias)
        else:
            pad, extra = _window_padding(layer.pads, layer.kernel_shape[:2], self.same_alignment)
            if extra is not None:
                x = F.pad(x, extra)
            z = F.conv2d(x, kernel, bias, stride=layer.stride, padding=pad, groups=layer.groups)
        if layer.normalized:
            z, _ = self.normalize(z, slot_params, {s: self.state[f"{name}/{s}"] for s in state_names}, self.method)
            self.taps.append(z)
            if self.affine:
                shape = (1, -1, 1, 1) if z.dim() == 4 else (1, -1)
                z = z * self.params[f"{name}/affine_scale"].view(shape) + self.params[f"{name}/affine_shift"].view(shape)
        return self.activation(z, activation)

    def activation(self, x, kind="relu"):
        if kind == "relu":
            return torch.relu(x)
        if kind == "relu6":
            return F.relu6(x)
        return x

    def _pool_geometry(self, x, window, stride, padding):
        window, pads, _ = vocabulary.window_geometry((*x.shape[2:], x.shape[1]), window, stride, padding)
        return window, _window_padding(pads, window, self.same_alignment)

    def max_pool(self, x, window, stride, padding="same"):
        window, (pad, extra) = self._pool_geometry(x, window, stride, padding)
        if extra is not None:
            x = F.pad(x, extra, value=float("-inf"))
        return F.max_pool2d(x, window, stride, pad)

    def avg_pool(self, x, window, stride, padding="same"):
        window, (pad, extra) = self._pool_geometry(x, window, stride, padding)
        if extra is None:  # SAME's averages leave the padding out of the count
            return F.avg_pool2d(x, window, stride, pad, count_include_pad=False)
        ones = F.pad(torch.ones_like(x[:1, :1]), extra)
        return F.avg_pool2d(F.pad(x, extra), window, stride) / F.avg_pool2d(ones, window, stride)

    def global_avg_pool(self, x):
        return x.mean((2, 3))

    def global_max_pool(self, x):
        return x.amax((2, 3))

    def add(self, a, b):
        return a + b

    def concat(self, xs):
        return torch.cat(xs, 1)

    def flatten(self, x):
        return x.flatten(1)

    def dropout(self, name, x, rate):
        return x * self.masks[name] if rate else x  # the keep masks arrive scaled by 1 / (1 - rate)

    def matrix(self, x, size):
        return x.view(-1, size, size)

    def point_transform(self, x, matrix):
        # Points are (batch, channels, points, 1) here: each point's row vector times the
        # matrix is matrix^T times the channel columns.
        return torch.bmm(matrix.transpose(1, 2), x.squeeze(3)).unsqueeze(3)

    def orthogonality_loss(self, name, matrix, weight):
        identity = torch.eye(matrix.shape[1], device=matrix.device, dtype=matrix.dtype)
        self.loss = self.loss + weight * 0.5 * (torch.bmm(matrix, matrix.transpose(1, 2)) - identity).square().sum()


def make_reference_step(plan, device=None, seed: int = 0, data=None, *, same_alignment: bool = False):
    from normbench.data_order import BatchOrder, seed_streams

    learning_rate = _reference.check_plan(plan)
    method = plan.method
    hand_written = _reference.plugin_module(__name__, "normalizations", method.name)
    losses = [(loss, _reference.plugin_module(__name__, "auxiliary_losses", loss.name).value) for loss in plan.losses]
    device = torch.device(device or "cpu")

    if data is None:
        from normbench.runner import load_data

        loaded = load_data(plan.spec)
        data = (loaded.train_images, loaded.train_labels)
    dtype = np.dtype(plan.spec.dtype)
    images = torch.from_numpy(np.ascontiguousarray(np.asarray(data[0], dtype).transpose(0, 3, 1, 2))).to(device)
    labels = torch.from_numpy(np.asarray(data[1], np.int64)).to(device)

    initial, initial_state = _reference.initial_values(plan, seed)
    dense_inputs = _reference.dense_input_shapes(plan)
    layers = {layer.name: layer for layer in plan.layers}
    params, decayed, others = {}, [], []
    for name, value in initial.items():
        layer_name, _, suffix = name.rpartition("/")
        if suffix == "kernel":
            value = _torch_kernel(layers[layer_name], value, dense_inputs.get(layer_name))
        params[name] = torch.tensor(np.ascontiguousarray(value), device=device, requires_grad=True)
        (decayed if suffix == "kernel" else others).append(params[name])
    state = {name: torch.tensor(value, device=device) for name, value in initial_state.items()}
    optimizer = torch.optim.SGD([{"params": decayed, "weight_decay": plan.spec.optimizer.weight_decay},
                                 {"params": others, "weight_decay": 0.0}], lr=learning_rate)

    network = _Network(plan, params, state, method, hand_written, same_alignment)
    order = BatchOrder(seed_streams(seed)[1], int(labels.shape[0]), plan.spec.batch_size)

    def step(i: int):
        index = torch.from_numpy(order.indices(i)).to(device)
        network.masks = {name: torch.from_numpy(mask).to(device)
                         for name, mask in _reference.scaled_dropout_masks(plan, seed, i, dtype).items()}
        network.taps, network.loss = [], 0.0
        logits = plan.arch.build(network, images.index_select(0, index))
        loss = F.cross_entropy(logits, labels.index_select(0, index)) + network.loss
        for aux, value in losses:
            loss = loss + aux.weight * value(network.taps, aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step, synchronize
