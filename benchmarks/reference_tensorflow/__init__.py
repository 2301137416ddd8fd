"""A hand-written TensorFlow training step of any of normbench's architectures.

It is the yardstick of `bench_ratios.ReferenceRatio` for normbench's TensorFlow backend:
the same step (a batch gathered from a training set already on the device, a forward pass
in training mode, cross entropy + the architecture's and the variant's weighted auxiliary
losses + L2 weight decay, gradients, plain SGD, the running statistics) written the way a
TensorFlow user writes it: tf.Variables, one tf.function traced once into a concrete
function, GradientTape, and the network in tf.nn calls (NHWC, conv2d and pools with
TensorFlow's own "SAME" / "VALID" padding, depthwise_conv2d, concat, matmul).

The network is the plan's architecture: `plan.arch.build(network, images)` calls the words
of normbench's layer vocabulary on `_Network`, which writes each one in TensorFlow, as a
model definition in TensorFlow would be written from the architecture's description; no
normbench backend code runs. Only the initial weights and the batch and dropout-mask order
come from normbench (so that both sides compute the same thing, which
tests/test_reference_loops.py checks). Each method's forward lives in
`normalizations/<method>.py`, each auxiliary loss in `auxiliary_losses/<loss>.py`
(the contract: `benchmarks/_reference.py`).
"""

from __future__ import annotations

import importlib.util

# torch must be loaded before TensorFlow when both end up in one process.
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

# TensorFlow's environment as the engine beside it sets it (TF_ENABLE_ONEDNN_OPTS: the same
# kernels), before TensorFlow loads; the package imports no framework.
import normbench.backends.tensorflow  # noqa: E402,F401

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .. import _reference  # noqa: E402
from normbench.data_order import BatchOrder, seed_streams  # noqa: E402


def _tf_device(device: str | None) -> str:
    kind, _, index = (device or "cpu").lower().partition(":")
    if kind == "cpu":
        return "/CPU:0"
    if kind in ("gpu", "cuda"):
        return f"/GPU:{int(index or 0)}"
    raise ValueError(f"unknown device {device!r}")


def _normbench_jit_compile(tf_device: str) -> bool:
    """Whether normbench's TensorFlow engine compiles with XLA on this kind of device."""
    from normbench.backends.tensorflow.engine import XLA_BY_DEVICE_TYPE

    return XLA_BY_DEVICE_TYPE["gpu" if tf_device.startswith("/GPU") else "cpu"]


class _Network(_reference.Network):
    """The network of the plan, in TensorFlow: `plan.arch.build(network, images)` calls these
    words of normbench's vocabulary while the step is traced. Padding is the architecture's
    own argument ("same" or "valid"), handed to TensorFlow as is: normbench's declared pads
    are TensorFlow's SAME rule, so "SAME" computes them."""

    def __init__(self, plan, params, state, method, hand_written, on_gpu):
        self.method, self.affine = method, plan.affine
        self.normalize, self.reparameterize = hand_written.normalize, getattr(hand_written, "kernel", None)
        # Everything a layer needs, looked up once.
        self.layers = {}
        for layer in plan.layers:
            param_suffixes, state_suffixes = _reference.slot_names(plan, layer) if layer.normalized else ((), ())
            self.layers[layer.name] = {
                "layer": layer,
                "kernel": params[f"{layer.name}/kernel"],
                "bias": params.get(f"{layer.name}/bias"),
                "params": {suffix: params[f"{layer.name}/{suffix}"] for suffix in param_suffixes},
                "state": {suffix: state[f"{layer.name}/{suffix}"] for suffix in state_suffixes},
                "affine": ((params[f"{layer.name}/affine_scale"], params[f"{layer.name}/affine_shift"])
                           if layer.normalized and plan.affine else None),
            }
        # tf.nn.conv2d runs grouped kernels (C / groups input channels) natively, but has no
        # gradient for them on CPU ("Gradients for grouped convolutions are not supported on
        # CPU"): there the groups are split and concatenated by hand.
        self.native_groups = on_gpu
        self.masks = {}  # this step's dropout keep masks (scaled by 1 / (1 - rate)), by name
        self.taps, self.updates, self.loss = [], [], 0.0  # what one trace collects

    def _convolve(self, x, kernel, layer, padding):
        if layer.groups == 1 or (self.native_groups and layer.groups != x.shape[-1]):
            return tf.nn.conv2d(x, kernel, strides=layer.stride, padding=padding)
        if layer.groups == x.shape[-1]:
            # The canonical HWIO kernel of a depthwise convolution, (kh, kw, 1, C * m), is
            # depthwise_conv2d's (kh, kw, C, m): the variable stays canonical for the
            # methods' kernel hooks, and the reshape is free.
            kh, kw, _, out = kernel.shape
            kernel = tf.reshape(kernel, [kh, kw, layer.groups, out // layer.groups])
            return tf.nn.depthwise_conv2d(x, kernel, strides=[1, layer.stride, layer.stride, 1], padding=padding)
        return tf.concat([tf.nn.conv2d(block, block_kernel, strides=layer.stride, padding=padding)
                          for block, block_kernel in zip(tf.split(x, layer.groups, axis=-1),
                                                         tf.split(kernel, layer.groups, axis=-1))], axis=-1)

    def layer(self, name, x, activation, padding):
        entry = self.layers[name]
        layer, kernel = entry["layer"], entry["kernel"]
        if layer.normalized and self.reparameterize is not None:
            kernel = self.reparameterize(kernel, entry["params"], self.method)
        if layer.kind == "conv":
            z = self._convolve(x, kernel, layer, padding.upper())
        else:
            z = tf.matmul(self.flatten(x), kernel)
        if entry["bias"] is not None:
            z = tf.nn.bias_add(z, entry["bias"])
        if layer.normalized:
            z, updated = self.normalize(z, entry["params"], entry["state"], self.method)
            self.taps.append(z)
            self.updates.append((entry["state"], updated))
            if entry["affine"] is not None:
                z = z * entry["affine"][0] + entry["affine"][1]
        return self.activation(z, activation)

    def activation(self, x, kind="relu"):
        if kind == "relu":
            return tf.nn.relu(x)
        if kind == "relu6":
            return tf.nn.relu6(x)
        return x

    def max_pool(self, x, window, stride, padding="same"):
        return tf.nn.max_pool2d(x, window, stride, padding.upper())

    def avg_pool(self, x, window, stride, padding="same"):
        # TensorFlow's SAME averages leave the padding out of the count, as normbench does.
        return tf.nn.avg_pool2d(x, window, stride, padding.upper())

    def global_avg_pool(self, x):
        return tf.reduce_mean(x, axis=[1, 2])

    def global_max_pool(self, x):
        return tf.reduce_max(x, axis=[1, 2])

    def add(self, a, b):
        return a + b

    def concat(self, xs):
        return tf.concat(xs, axis=-1)

    def flatten(self, x):
        # NHWC flattens in normbench's (h, w, c) order as is.
        return tf.reshape(x, [x.shape[0], -1]) if x.shape.rank > 2 else x

    def dropout(self, name, x, rate):
        return x * self.masks[name] if rate else x

    def matrix(self, x, size):
        return tf.reshape(x, [x.shape[0], size, size])

    def point_transform(self, x, matrix):
        # Points are a (batch, P, 1, C) image: each point's row vector times the matrix.
        batch, points, _, channels = x.shape
        out = tf.matmul(tf.reshape(x, [batch, points, channels]), matrix)
        return tf.reshape(out, [batch, points, 1, matrix.shape[-1]])

    def orthogonality_loss(self, name, matrix, weight):
        # PointNet's tf.nn.l2_loss(A A^T - I), summed over the batch.
        identity = tf.eye(matrix.shape[1], dtype=matrix.dtype)
        gram = tf.matmul(matrix, matrix, transpose_b=True)
        self.loss = self.loss + weight * 0.5 * tf.reduce_sum(tf.square(gram - identity))


def make_reference_step(plan, device=None, seed=0, data=None, *, jit_compile: bool | None = None):
    """One hand-written training run of `plan`: (step(i) -> loss tensor, synchronize()).

    `data`: (train images NHWC, train labels) NumPy arrays, trained on in the spec's dtype;
    None loads the spec's data set. `jit_compile`: XLA on or off; None follows normbench's
    TensorFlow engine."""
    learning_rate = _reference.check_plan(plan)
    weight_decay = float(plan.spec.optimizer.weight_decay)
    method = plan.method
    hand_written = _reference.plugin_module(__name__, "normalizations", method.name)
    auxiliary = [(loss, _reference.plugin_module(__name__, "auxiliary_losses", loss.name)) for loss in plan.losses]
    tf_device = _tf_device(device)
    if jit_compile is None:
        jit_compile = _normbench_jit_compile(tf_device)
    if tf_device.startswith("/GPU"):
        # TF32 matmuls and convolutions would not be the float32 arithmetic normbench's engine runs.
        tf.config.experimental.enable_tensor_float_32_execution(False)

    if data is None:
        from normbench.runner import load_data

        loaded = load_data(plan.spec)
        data = (loaded.train_images, loaded.train_labels)
    train_images, train_labels = data
    dtype = np.dtype(plan.spec.dtype)
    batch_size = plan.spec.batch_size
    order = BatchOrder(seed_streams(seed)[1], len(train_labels), batch_size)
    initial_params, initial_state = _reference.initial_values(plan, seed)

    with tf.device(tf_device):
        images = tf.identity(tf.convert_to_tensor(np.asarray(train_images, dtype)))
        labels = tf.identity(tf.convert_to_tensor(np.asarray(train_labels, np.int64)))
        params = {name: tf.Variable(value, name=name) for name, value in initial_params.items()}
        state = {name: tf.Variable(value, trainable=False, name=name) for name, value in initial_state.items()}

    network = _Network(plan, params, state, method, hand_written, tf_device.startswith("/GPU"))
    trainable = list(params.values())
    decayed = [name.endswith("/kernel") and weight_decay > 0 for name in params]
    # Masks of rate-0 dropouts are never read: only the others are arguments of the step.
    dropouts = [d for d in plan.dropouts if d.rate]

    def train_step(indices, *masks):
        x, y = tf.gather(images, indices), tf.gather(labels, indices)
        network.masks = {d.name: mask for d, mask in zip(dropouts, masks)}
        network.taps, network.updates, network.loss = [], [], 0.0
        with tf.GradientTape() as tape:
            logits = plan.arch.build(network, x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            loss += network.loss
            for auxiliary_loss, module in auxiliary:
                loss += auxiliary_loss.weight * module.value(network.taps, auxiliary_loss)
        gradients = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for variable, gradient, decay in zip(trainable, gradients, decayed):
            if decay:
                gradient = gradient + weight_decay * variable  # the gradient of 0.5 * weight_decay * |kernel|^2
            variable.assign_sub(learning_rate * gradient)
        for variables, updated in network.updates:
            for suffix, variable in variables.items():
                variable.assign(updated[suffix])
        return loss

    with tf.device(tf_device):
        # Traced once and then called directly: the fastest dispatch TensorFlow offers (and
        # no "frequent retracing" warning when a benchmark builds many loops in one process).
        # autograph=False: the architecture is plain Python, unrolled at trace time.
        compiled = tf.function(train_step, jit_compile=jit_compile, autograph=False).get_concrete_function(
            tf.TensorSpec([batch_size], tf.int64),
            *(tf.TensorSpec([batch_size, *d.shape], dtype) for d in dropouts))

    def step(i: int):
        masks = _reference.scaled_dropout_masks(plan, seed, i, dtype)
        with tf.device(tf_device):
            return compiled(tf.constant(order.indices(i), tf.int64), *(tf.constant(masks[d.name]) for d in dropouts))

    def synchronize() -> None:
        if tf_device.startswith("/GPU"):
            tf.test.experimental.sync_devices()

    # A concrete function holds its variables weakly: the step keeps them (and shows them).
    step.params, step.state = params, state
    return step, synchronize
