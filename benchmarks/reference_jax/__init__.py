"""A hand-written JAX training step for any network a normbench plan describes: the
yardstick of `bench_ratios.ReferenceRatio` and `bench_ratios.ArchitectureReferenceRatio`
("normbench step time / hand-written step time"). The contract is in `benchmarks/_reference.py`.

Written as a JAX user writes a training loop, sharing no code with normbench's JAX backend:
jax.numpy and lax on a dict of parameters, one `jax.jit`-compiled step with donated
buffers, plain SGD with the L2 gradient added to the kernels'. The network is the
architecture's own description (`plan.arch.build`, as a model definition would be) run
against `_Network`, which writes every word of normbench's layer vocabulary in JAX idiom:
lax.conv_general_dilated with TensorFlow SAME's explicit pads and `feature_group_count`,
lax.reduce_window pooling, jnp.concatenate, jnp.matmul. Each normalization method and
auxiliary loss is a hand-written file in normalizations/ and auxiliary_losses/; the plan
only says which, and with what options.

The initial weights, the batch order and the dropout masks are normbench's, so both sides
do the same arithmetic on the same batches (tests/test_reference_loops.py holds the losses
equal, in float32 and float64). As in normbench, the training set stays on the device and
each step sends only its batch's indices (and its dropout masks); nothing is read back
inside a step. normbench's canonical layouts (NHWC, HWIO, (in, out)) are JAX's own: no
conversion anywhere.

    make_reference_step(plan, device=None, seed=0, data=None) -> (step, synchronize)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normbench.architectures import layers as vocabulary
from normbench.data_order import BatchOrder, seed_streams

from .. import _reference

# XLA's default float32 precision on GPUs rounds matmul/conv inputs to TF32; normbench's
# JAX backend asks for HIGHEST (full float32), and so does this loop.
HIGHEST = lax.Precision.HIGHEST

_TRAINING_SETS: dict = {}


class _Network(_reference.Network):
    """The network of the plan, in JAX: `plan.arch.build(network, images)` calls these
    words of normbench's vocabulary, each written as a JAX user writes it. One network is
    made per trace of the step (`run`), so its parameters, state and masks are the traced
    arrays; the slot outputs, the new state and the architecture's losses are collected
    on it and handed back functionally. No normbench backend code runs."""

    def __init__(self, plan, method, hand_written):
        self.layers = {layer.name: layer for layer in plan.layers}
        self.method = method
        self.normalize, self.reparameterize = hand_written.normalize, getattr(hand_written, "kernel", None)
        self.suffixes = {layer.name: _reference.slot_names(plan, layer) for layer in plan.layers if layer.normalized}
        self.affine = plan.affine
        self.arch = plan.arch

    def run(self, params, state, masks, images):
        """(logits, new state, slot outputs, the architecture's weighted losses) of one
        training forward pass; `masks`: this step's scaled dropout keep masks, by name."""
        self.params, self.state, self.masks = params, state, masks
        self.new_state, self.taps, self.loss = {}, [], 0.0
        logits = self.arch.build(self, images)
        return logits, self.new_state, self.taps, self.loss

    def layer(self, name, x, activation, padding):
        layer, kernel, bias, slot_params, state_names = self.weights(name)
        if layer.kind == "dense":  # NHWC flattens in (h, w, c) order, as normbench's dense layers read it
            z = jnp.dot(x.reshape(x.shape[0], -1), kernel, precision=HIGHEST)
        else:
            z = lax.conv_general_dilated(x, kernel, (layer.stride, layer.stride), layer.pads,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=layer.groups, precision=HIGHEST)
        if bias is not None:
            z = z + bias
        if layer.normalized:
            z, slot_state = self.normalize(z, slot_params, {s: self.state[f"{name}/{s}"] for s in state_names},
                                           self.method)
            self.new_state.update({f"{name}/{suffix}": value for suffix, value in slot_state.items()})
            self.taps.append(z)
            if self.affine:
                z = z * self.params[f"{name}/affine_scale"] + self.params[f"{name}/affine_shift"]
        return self.activation(z, activation)

    def activation(self, x, kind="relu"):
        if kind == "relu":
            return jax.nn.relu(x)  # not jnp.maximum(x, 0): its gradient at exactly 0 is 0.5
        if kind == "relu6":
            return jax.nn.relu6(x)
        return x

    def _window(self, x, window, stride, padding):
        window, pads, _ = vocabulary.window_geometry(x.shape[1:], window, stride, padding)
        return (1, *window, 1), (1, stride, stride, 1), ((0, 0), *pads, (0, 0))

    def max_pool(self, x, window, stride, padding="same"):
        window, strides, pads = self._window(x, window, stride, padding)
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)

    def avg_pool(self, x, window, stride, padding="same"):
        window, strides, pads = self._window(x, window, stride, padding)
        sums = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
        # SAME's averages leave the padding out of the count: each window's count of real
        # pixels, summed the same way over ones (one map, broadcast over batch and channels).
        counts = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, window, strides, pads)
        return sums / counts

    def global_avg_pool(self, x):
        return jnp.mean(x, (1, 2))

    def global_max_pool(self, x):
        return jnp.max(x, (1, 2))

    def add(self, a, b):
        return a + b

    def concat(self, xs):
        return jnp.concatenate(xs, axis=-1)

    def flatten(self, x):
        return x.reshape(x.shape[0], -1)

    def dropout(self, name, x, rate):
        return x * self.masks[name] if rate else x  # the keep masks arrive scaled by 1 / (1 - rate)

    def matrix(self, x, size):
        return x.reshape(x.shape[0], size, size)

    def point_transform(self, x, matrix):
        # Points are a (P, 1, C) image: each point's channel row vector times the matrix.
        batch, points, _, channels = x.shape
        out = jnp.matmul(x.reshape(batch, points, channels), matrix, precision=HIGHEST)
        return out.reshape(batch, points, 1, matrix.shape[-1])

    def orthogonality_loss(self, name, matrix, weight):
        gram = jnp.matmul(matrix, jnp.swapaxes(matrix, 1, 2), precision=HIGHEST)
        identity = jnp.eye(matrix.shape[1], dtype=matrix.dtype)
        self.loss = self.loss + weight * 0.5 * jnp.sum(jnp.square(gram - identity))


def make_reference_step(plan, device=None, seed: int = 0, data=None):
    """(step(i), synchronize()) of a hand-written SGD loop for `plan`. step(i) trains on
    batch i of run `seed`'s batch order and returns its loss (a JAX scalar, not read back).
    `device`: a jax Device (or a name such as "cpu", "gpu:0"); None: JAX's default.
    `data`: (train_images NHWC, train_labels) NumPy arrays; None: the spec's data set.
    Trains in the spec's dtype. `step.compile_seconds` holds the compile time.
    NotImplementedError for what the hand-written loops do not cover."""
    learning_rate = _reference.check_plan(plan)
    weight_decay = float(plan.spec.optimizer.weight_decay)
    method = plan.method
    hand_written = _reference.plugin_module(__name__, "normalizations", method.name)
    losses = [(loss, _reference.plugin_module(__name__, "auxiliary_losses", loss.name).value) for loss in plan.losses]
    dtype = np.dtype(plan.spec.dtype)
    if dtype == np.float64:
        # Without x64 JAX silently puts float64 arrays on the device as float32. The switch
        # is process-wide; float32 loops are unaffected, as every array here is cast.
        jax.config.update("jax_enable_x64", True)
    device = _device(device)

    images, labels = _training_set(plan.spec) if data is None else data
    train_images = jax.device_put(np.asarray(images, dtype), device)
    train_labels = jax.device_put(np.asarray(labels, np.int32), device)
    params, state = _reference.initial_values(plan, seed)
    params, state = jax.device_put(params, device), jax.device_put(state, device)

    network = _Network(plan, method, hand_written)

    def objective(params, state, images, labels, masks):
        logits, new_state, taps, loss = network.run(params, state, masks, images)
        log_probs = jax.nn.log_softmax(logits)
        loss = loss - jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
        for auxiliary, value in losses:
            loss = loss + auxiliary.weight * value(taps, auxiliary)
        return loss, new_state

    def train_step(params, state, train_images, train_labels, indices, masks):
        (loss, state), grads = jax.value_and_grad(objective, has_aux=True)(
            params, state, train_images[indices], train_labels[indices], masks)
        if weight_decay:  # the gradient of 0.5 * weight_decay * ||kernel||^2, kernels only
            grads = {k: g + weight_decay * params[k] if k.endswith("/kernel") else g for k, g in grads.items()}
        return {k: p - learning_rate * grads[k] for k, p in params.items()}, state, loss

    batch_size = plan.spec.batch_size
    order = BatchOrder(seed_streams(seed)[1], int(train_labels.shape[0]), batch_size)

    def dropout_masks(i):
        return jax.device_put(_reference.scaled_dropout_masks(plan, seed, i, dtype), device)

    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, state, train_images, train_labels,
        jax.device_put(np.zeros(batch_size, np.int32), device), dropout_masks(0)).compile()
    compile_seconds = time.perf_counter() - start

    def step(i: int):
        nonlocal params, state
        indices = jax.device_put(order.indices(i).astype(np.int32), device)
        params, state, loss = compiled(params, state, train_images, train_labels, indices, dropout_masks(i))
        return loss

    def synchronize() -> None:
        jax.block_until_ready((params, state))

    step.compile_seconds = compile_seconds
    return step, synchronize


def _device(device):
    if device is None:
        return jax.devices()[0]
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        return jax.devices({"cuda": "gpu"}.get(kind, kind))[int(index or 0)]
    return device


def _training_set(spec):
    key = (spec.dataset, spec.dtype)
    if key not in _TRAINING_SETS:  # asv sets up many loops per process: load the data set once
        from normbench.runner import load_data

        loaded = load_data(spec)
        _TRAINING_SETS[key] = loaded.train_images, loaded.train_labels
    return _TRAINING_SETS[key]
