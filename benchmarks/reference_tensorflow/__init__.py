"""A hand-written TensorFlow training step of any chain network of normbench's plans.

It is the yardstick of `bench_ratios.ReferenceRatio` for normbench's TensorFlow backend:
the same step (a batch gathered from a training set already on the device, a forward pass
in training mode, cross entropy + weighted auxiliary losses + L2 weight decay, gradients,
plain SGD, the running statistics) written the way a TensorFlow user writes it:
tf.Variables, one tf.function traced once into a concrete function, GradientTape, tf.nn
convolutions with explicit padding. It reads the network, method and losses from the plan
and shares no code with normbench's backends; each method's forward lives in
`normalizations/<method>.py`, each auxiliary loss in `auxiliary_losses/<loss>.py`
(the contract: `benchmarks/_reference.py`).
"""

from __future__ import annotations

import importlib.util
import os

# torch must be loaded before TensorFlow when both end up in one process.
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def make_reference_step(plan, device=None, seed=0, data=None, *, jit_compile: bool | None = None):
    """One hand-written training run of `plan`: (step(i) -> loss tensor, synchronize()).

    `data`: (train images NHWC float32, train labels) NumPy arrays; None loads the spec's
    data set. `jit_compile`: XLA on or off; None follows normbench's TensorFlow engine."""
    layers = _reference.chain(plan)
    learning_rate = _reference.check_optimizer(plan)
    weight_decay = float(plan.spec.optimizer.weight_decay)
    method = plan.method
    normalization = _reference.plugin_module(__name__, "normalizations", method.name)
    kernel_hook = getattr(normalization, "kernel", None)
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
    batch_size = plan.spec.batch_size
    order = BatchOrder(seed_streams(seed)[1], len(train_labels), batch_size)
    initial_params, initial_state = _reference.initial_values(plan, seed)

    with tf.device(tf_device):
        images = tf.identity(tf.convert_to_tensor(np.asarray(train_images, np.float32)))
        labels = tf.identity(tf.convert_to_tensor(np.asarray(train_labels, np.int64)))
        params = {name: tf.Variable(value, name=name) for name, value in initial_params.items()}
        state = {name: tf.Variable(value, trainable=False, name=name) for name, value in initial_state.items()}

    # Everything a step needs per layer, looked up once.
    hidden = []
    for layer in layers[:-1]:
        param_suffixes, state_suffixes = _reference.slot_names(plan, layer)
        hidden.append({
            "kind": layer.kind,
            "stride": layer.stride,
            "padding": [[0, 0], list(layer.pads[0]), list(layer.pads[1]), [0, 0]] if layer.kind == "conv" else None,
            "kernel": params[f"{layer.name}/kernel"],
            "bias": params.get(f"{layer.name}/bias"),
            "params": {suffix: params[f"{layer.name}/{suffix}"] for suffix in param_suffixes},
            "state": {suffix: state[f"{layer.name}/{suffix}"] for suffix in state_suffixes},
            "affine": ((params[f"{layer.name}/affine_scale"], params[f"{layer.name}/affine_shift"])
                       if plan.affine else None),
        })
    head_kernel, head_bias = params[f"{layers[-1].name}/kernel"], params[f"{layers[-1].name}/bias"]
    trainable = list(params.values())
    decayed = [name.endswith("/kernel") and weight_decay > 0 for name in params]

    def dense(x, kernel):
        if x.shape.rank > 2:
            x = tf.reshape(x, [x.shape[0], -1])  # NHWC flattens in (h, w, c) order
        return tf.matmul(x, kernel)

    def forward(x):
        taps, new_state = [], []
        for layer in hidden:
            kernel = layer["kernel"]
            if kernel_hook is not None:
                kernel = kernel_hook(kernel, layer["params"], method)
            if layer["kind"] == "conv":
                z = tf.nn.conv2d(x, kernel, strides=layer["stride"], padding=layer["padding"])
            else:
                z = dense(x, kernel)
            if layer["bias"] is not None:
                z = tf.nn.bias_add(z, layer["bias"])
            y, updated = normalization.normalize(z, layer["params"], layer["state"], method)
            taps.append(y)
            new_state.append(updated)
            if layer["affine"] is not None:
                y = y * layer["affine"][0] + layer["affine"][1]
            x = tf.nn.relu(y)
        return tf.nn.bias_add(dense(x, head_kernel), head_bias), taps, new_state

    def train_step(indices):
        x, y = tf.gather(images, indices), tf.gather(labels, indices)
        with tf.GradientTape() as tape:
            logits, taps, new_state = forward(x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            for auxiliary_loss, module in auxiliary:
                loss += auxiliary_loss.weight * module.value(taps, auxiliary_loss)
        gradients = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for variable, gradient, decay in zip(trainable, gradients, decayed):
            if decay:
                gradient = gradient + weight_decay * variable  # the gradient of 0.5 * weight_decay * |kernel|^2
            variable.assign_sub(learning_rate * gradient)
        for layer, updated in zip(hidden, new_state):
            for suffix, variable in layer["state"].items():
                variable.assign(updated[suffix])
        return loss

    with tf.device(tf_device):
        # Traced once and then called directly: the fastest dispatch TensorFlow offers (and
        # no "frequent retracing" warning when a benchmark builds many loops in one process).
        # autograph=False: every loop and branch above is plain Python, unrolled at trace time.
        compiled = tf.function(train_step, jit_compile=jit_compile, autograph=False).get_concrete_function(
            tf.TensorSpec([batch_size], tf.int64))

    def step(i: int):
        with tf.device(tf_device):
            return compiled(tf.constant(order.indices(i), tf.int64))

    def synchronize() -> None:
        if tf_device.startswith("/GPU"):
            tf.test.experimental.sync_devices()

    # A concrete function holds its variables weakly: the step keeps them (and shows them).
    step.params, step.state = params, state
    return step, synchronize
