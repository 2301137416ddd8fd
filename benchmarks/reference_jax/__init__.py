"""A hand-written JAX training step for any chain network a normbench plan describes: the
yardstick of `bench_ratios.ReferenceRatio` ("normbench step time / hand-written step time").

Written as a JAX user writes a training loop, sharing no code with normbench's JAX backend:
jax.numpy and lax on a dict of parameters, one `jax.jit`-compiled step with donated
buffers, plain SGD with the L2 gradient added to the kernels'. Each normalization method
and auxiliary loss is a hand-written file in normalizations/ and auxiliary_losses/ (the
contract is in benchmarks/_reference.py); the plan only says which, and with what options.
The initial weights and the batch order are normbench's, so both sides do the same
arithmetic on the same batches. As in normbench, the training set stays on the device and
each step sends only its batch's indices; nothing is read back inside a step.

    make_reference_step(plan, device=None, seed=0, data=None) -> (step, synchronize)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normbench.data_order import BatchOrder, seed_streams

from .. import _reference

# XLA's default float32 precision on GPUs rounds matmul/conv inputs to TF32; normbench's
# JAX backend asks for HIGHEST (full float32), and so does this loop.
HIGHEST = lax.Precision.HIGHEST

_TRAINING_SETS: dict = {}


def make_reference_step(plan, device=None, seed: int = 0, data=None):
    """(step(i), synchronize()) of a hand-written SGD loop for `plan`. step(i) trains on
    batch i of run `seed`'s batch order and returns its loss (a JAX scalar, not read back).
    `device`: a jax Device (or a name such as "cpu", "gpu:0"); None: JAX's default.
    `data`: (train_images NHWC float32, train_labels) NumPy arrays; None: the spec's data set.
    `step.compile_seconds` holds the compile time. NotImplementedError for what the
    hand-written loops do not cover."""
    layers = _reference.chain(plan)
    learning_rate = _reference.check_optimizer(plan)
    weight_decay = float(plan.spec.optimizer.weight_decay)
    method = plan.method
    normalization = _reference.plugin_module(__name__, "normalizations", method.name)
    kernel_hook = getattr(normalization, "kernel", None)
    losses = [(loss, _reference.plugin_module(__name__, "auxiliary_losses", loss.name)) for loss in plan.losses]
    affine = plan.affine
    *hidden, head = layers
    # Per hidden layer, once: (layer, the method's parameter suffixes, its state suffixes).
    slots = [(layer, *_reference.slot_names(plan, layer)) for layer in hidden]
    device = _device(device)

    images, labels = _training_set(plan.spec) if data is None else data
    train_images = jax.device_put(np.asarray(images, np.float32), device)
    train_labels = jax.device_put(np.asarray(labels, np.int32), device)
    # normbench's canonical layouts (NHWC, HWIO, (in, out)) are JAX's own: no conversion.
    params, state = _reference.initial_values(plan, seed)
    params, state = jax.device_put(params, device), jax.device_put(state, device)

    def linear(x, layer, kernel, bias):
        if layer.kind == "conv":
            z = lax.conv_general_dilated(x, kernel, (layer.stride, layer.stride), layer.pads,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        else:  # NHWC flattens in (h, w, c) order, as normbench's dense layers read it
            z = jnp.dot(x.reshape(x.shape[0], -1), kernel, precision=HIGHEST)
        return z if bias is None else z + bias

    def objective(params, state, images, labels):
        x, taps, new_state = images, [], {}
        for layer, param_names, state_names in slots:
            name = layer.name
            slot_params = {suffix: params[f"{name}/{suffix}"] for suffix in param_names}
            kernel = params[f"{name}/kernel"]
            if kernel_hook is not None:
                kernel = kernel_hook(kernel, slot_params, method)
            z = linear(x, layer, kernel, params.get(f"{name}/bias"))
            y, slot_state = normalization.normalize(z, slot_params, {s: state[f"{name}/{s}"] for s in state_names},
                                                    method)
            new_state.update({f"{name}/{suffix}": value for suffix, value in slot_state.items()})
            taps.append(y)
            if affine:
                y = y * params[f"{name}/affine_scale"] + params[f"{name}/affine_shift"]
            x = jax.nn.relu(y)  # not jnp.maximum(y, 0): its gradient at exactly 0 is 0.5
        logits = linear(x, head, params[f"{head.name}/kernel"], params[f"{head.name}/bias"])
        log_probs = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
        for auxiliary, module in losses:
            loss = loss + auxiliary.weight * module.value(taps, auxiliary)
        return loss, new_state

    def train_step(params, state, train_images, train_labels, indices):
        (loss, state), grads = jax.value_and_grad(objective, has_aux=True)(
            params, state, train_images[indices], train_labels[indices])
        if weight_decay:  # the gradient of 0.5 * weight_decay * ||kernel||^2, kernels only
            grads = {k: g + weight_decay * params[k] if k.endswith("/kernel") else g for k, g in grads.items()}
        return {k: p - learning_rate * grads[k] for k, p in params.items()}, state, loss

    order = BatchOrder(seed_streams(seed)[1], int(train_labels.shape[0]), plan.spec.batch_size)
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, state, train_images, train_labels,
        jax.device_put(np.zeros(plan.spec.batch_size, np.int32), device)).compile()
    compile_seconds = time.perf_counter() - start

    def step(i: int):
        nonlocal params, state
        indices = jax.device_put(order.indices(i).astype(np.int32), device)
        params, state, loss = compiled(params, state, train_images, train_labels, indices)
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
