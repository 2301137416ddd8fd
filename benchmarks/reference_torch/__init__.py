"""A hand-written PyTorch training step: the yardstick for the torch backend's overhead
(`bench_ratios.ReferenceRatio`). The contract is in `benchmarks/_reference.py`.

Written the way a PyTorch user writes a functional training loop: leaf tensors in
PyTorch's layouts (NCHW activations, OIHW kernels, (out, in) dense weights), F.conv2d
with the bias inside the convolution, torch.optim.SGD with weight decay on the kernels
only, each method's own hand-written file (normalizations/, auxiliary_losses/), and the
batch gathered on the device from the resident training set. Only the initial weights
(so that both sides compute the same thing, which tests/test_reference_loops.py checks)
and the batch order come from normbench; no normbench code runs inside a step.

Convolution padding is what a PyTorch user writes: F.conv2d's symmetric `padding` of
kernel // 2. Where TensorFlow's SAME rule pads asymmetrically (a stride-2 convolution of an
even-sized input: cnn3's three layers) that shifts every window by one pixel against
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

from .. import _reference


def _torch_kernel(layer, kernel: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """A canonical kernel in PyTorch's layout. A dense layer after a convolution reads its
    input flattened in PyTorch's (c, h, w) order; normbench's rows are in (h, w, c) order,
    so the rows are permuted once here instead of the activations every step."""
    if layer.kind == "conv":
        return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if len(input_shape) == 3:
        h, w, c = input_shape
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    return kernel.T  # (in, out) -> F.linear's (out, in)


class _Layer:
    """One hidden layer, looked up once: its tensors and its method's functions."""

    def __init__(self, layer, params, state, method_params, method_state, normalize, reparameterize, same_alignment):
        self.kind, self.stride = layer.kind, layer.stride
        (top, bottom), (left, right) = layer.pads or ((0, 0), (0, 0))
        self.extra_pad = None
        if not same_alignment and (top or bottom or left or right):
            self.padding = tuple(size // 2 for size in layer.kernel_shape[:2])  # the idiom: "same" for odd kernels at stride 1
        else:
            self.padding = (top, left) if (top, left) == (bottom, right) else 0
            if self.padding == 0 and (top or bottom or left or right):
                self.extra_pad = (left, right, top, bottom)
        self.kernel = params[f"{layer.name}/kernel"]
        self.bias = params.get(f"{layer.name}/bias")
        self.method_params = {s: params[f"{layer.name}/{s}"] for s in method_params}
        self.state = {s: state[f"{layer.name}/{s}"] for s in method_state}
        self.affine = (params.get(f"{layer.name}/affine_scale"), params.get(f"{layer.name}/affine_shift"))
        self.normalize, self.reparameterize = normalize, reparameterize

    def linear(self, x, method):
        kernel = self.kernel if self.reparameterize is None else self.reparameterize(self.kernel, self.method_params, method)
        if self.kind == "dense":
            return F.linear(x.flatten(1), kernel, self.bias)
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return F.conv2d(x, kernel, self.bias, stride=self.stride, padding=self.padding)


def make_reference_step(plan, device=None, seed: int = 0, data=None, *, same_alignment: bool = False):
    from normbench.data_order import BatchOrder, seed_streams

    *hidden, head = _reference.chain(plan)
    learning_rate = _reference.check_optimizer(plan)
    method = plan.method
    hand_written = _reference.plugin_module(__name__, "normalizations", method.name)
    losses = [(loss, _reference.plugin_module(__name__, "auxiliary_losses", loss.name).value) for loss in plan.losses]
    device = torch.device(device or "cpu")

    if data is None:
        from normbench.runner import load_data

        loaded = load_data(plan.spec)
        data = (loaded.train_images, loaded.train_labels)
    images = torch.from_numpy(np.ascontiguousarray(data[0].transpose(0, 3, 1, 2))).to(device)
    labels = torch.from_numpy(np.asarray(data[1], np.int64)).to(device)

    initial, initial_state = _reference.initial_values(plan, seed)
    input_shapes = [plan.arch.input_shape] + [layer.out_shape for layer in plan.layers[:-1]]
    params, decayed, others = {}, [], []
    for name, value in initial.items():
        layer = next(layer for layer in plan.layers if name.startswith(f"{layer.name}/"))
        if name.endswith("/kernel"):
            value = _torch_kernel(layer, value, input_shapes[plan.layers.index(layer)])
        params[name] = torch.tensor(np.ascontiguousarray(value), device=device, requires_grad=True)
        (decayed if name.endswith("/kernel") else others).append(params[name])
    state = {name: torch.tensor(value, device=device) for name, value in initial_state.items()}
    optimizer = torch.optim.SGD([{"params": decayed, "weight_decay": plan.spec.optimizer.weight_decay},
                                 {"params": others, "weight_decay": 0.0}], lr=learning_rate)

    layers = [_Layer(layer, params, state, *_reference.slot_names(plan, layer), hand_written.normalize,
                     getattr(hand_written, "kernel", None), same_alignment) for layer in hidden]
    head_kernel, head_bias = params[f"{head.name}/kernel"], params[f"{head.name}/bias"]
    order = BatchOrder(seed_streams(seed)[1], int(labels.shape[0]), plan.spec.batch_size)

    def step(i: int):
        index = torch.from_numpy(order.indices(i)).to(device)
        x = images.index_select(0, index)
        taps = []
        for layer in layers:
            y, _ = layer.normalize(layer.linear(x, method), layer.method_params, layer.state, method)
            taps.append(y)
            scale, shift = layer.affine
            if scale is not None:
                shape = (1, -1, 1, 1) if y.dim() == 4 else (1, -1)
                y = y * scale.view(shape) + shift.view(shape)
            x = torch.relu(y)
        loss = F.cross_entropy(F.linear(x.flatten(1), head_kernel, head_bias), labels.index_select(0, index))
        for aux, value in losses:
            loss = loss + aux.weight * value(taps, aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step, synchronize
