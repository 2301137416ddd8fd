"""What the hand-written reference loops share, framework-free: their contract, the part of
a plan they can run, and where each method's hand-written code lives.

A reference loop is the yardstick of `bench_ratios.ReferenceRatio` (and of its grids over
methods and architectures): the training step a user of one framework writes by hand for
the same network, method, batch and optimizer, sharing no code with normbench's backends.
The network is the architecture's own `build(net, x)` function, the description a model
definition would be, called with the loop's `net`: every word of the vocabulary
(normbench/architectures/layers.py: conv, dense, pools, add, concat, dropout, PointNet's
transforms ...) written once per framework in its idiom and layout. So a loop covers every
architecture, and what it leaves out of normbench's step is normbench's machinery (the
plan's forward, the backend's primitives, recording), not the network. From normbench come
only the initial weights, the batch order and the dropout keep masks (inputs, as the
batch is); no backend code runs inside a step. One package per framework,
`benchmarks/reference_<backend>/`:

    reference_<backend>/__init__.py          the loop: make_reference_step(plan, device=None, seed=0)
                                             -> (step(i) -> loss, synchronize() -> None);
                                             a loop whose framework's idiom pads otherwise than
                                             TensorFlow's SAME (PyTorch) also takes
                                             same_alignment=True: the exact loop the tests check
    reference_<backend>/normalizations/<method>.py
        normalize(z, params, state, method) -> (y, state)   training form, in the framework's
                                             own layout (PyTorch NCHW / NC; JAX and TensorFlow
                                             NHWC / NC) and idiom (F.batch_norm, tf.nn.moments ...)
        kernel(kernel, params, method) -> kernel            optional: reparameterizes the
                                             kernel, in the framework's own kernel layout
    reference_<backend>/auxiliary_losses/<loss>.py
        value(taps, loss) -> scalar          unweighted; `taps` are the slot outputs (before
                                             `affine`), one per normalized layer, in order

`params` and `state` are one slot's, keyed by the suffixes normbench's plan uses
("scale", "shift", "gain", "running_mean", ...); `method` and `loss` are the configured
normbench plugins, read only for their options (epsilon, groups, running_decay, weight).
The per-method folders are registries like normbench's: a method or loss without a file
there is skipped (asv: n/a) with a message saying which file to add.

`step(i)` trains on batch i of run `seed`'s batch order (with step i's dropout masks) and
returns the step's differentiated loss (cross entropy + weighted auxiliary losses and the
architecture's own weighted losses, without the L2 term, as
`Trainer.step`'s first value) as a framework scalar, not read back: reading it is the
caller's choice (tests compare it with normbench's; timings do not read it).
"""

from __future__ import annotations

import importlib

import numpy as np

from normbench.architectures import layers as vocabulary


class _InputRecorder(vocabulary._DeclaringNet):
    """Declares an architecture like `declare` does, keeping each dense layer's input shape."""

    def __init__(self):
        super().__init__()
        self.dense_inputs: dict[str, tuple[int, ...]] = {}

    def dense(self, name, x, *args, **kwargs):
        self.dense_inputs[name] = x.shape
        return super().dense(name, x, *args, **kwargs)


class Network:
    """What every loop's network object shares, framework-free: the vocabulary's layer words
    with normbench's signatures, each handed to `layer(name, x, activation, padding)`, the
    one method a framework writes for them (its layer knows its shapes from the plan; only
    the activation, and TensorFlow's named padding, come from the call). A framework's
    subclass writes `layer`, `activation` and the shape words (pools, add, concat, ...)."""

    def layer(self, name, x, activation, padding):
        raise NotImplementedError

    def weights(self, name):
        """(the declared layer, its kernel after the method's hook, its bias or None, the
        method's parameters of its slot, the slot's state suffixes) of layer `name`, read
        from `self.layers`, `self.params` (keyed `<layer>/<suffix>`) and `self.suffixes`
        (`slot_names` of every normalized layer), which a subclass sets."""
        layer = self.layers[name]
        kernel, bias = self.params[f"{name}/kernel"], self.params.get(f"{name}/bias")
        if not layer.normalized:
            return layer, kernel, bias, {}, ()
        param_names, state_names = self.suffixes[name]
        slot_params = {suffix: self.params[f"{name}/{suffix}"] for suffix in param_names}
        if self.reparameterize is not None:
            kernel = self.reparameterize(kernel, slot_params, self.method)
        return layer, kernel, bias, slot_params, state_names

    def activation(self, x, kind="relu"):
        raise NotImplementedError

    def conv(self, name, x, channels, kernel_size, stride=1, padding="same", groups=1, normalize=True,
             activation="relu", bias=True):
        return self.layer(name, x, activation, padding)

    def depthwise_conv(self, name, x, kernel_size, stride=1, multiplier=1, padding="same", normalize=True,
                       activation="relu", bias=True):
        return self.layer(name, x, activation, padding)

    def dense(self, name, x, units, normalize=True, activation="relu", bias=True, kernel_init="glorot_uniform",
              bias_init="zeros"):
        return self.layer(name, x, activation, None)

    def relu(self, x):
        return self.activation(x, "relu")


def scaled_dropout_masks(plan, seed: int, step: int, dtype) -> dict[str, np.ndarray]:
    """Step `step`'s dropout keep masks of run `seed`, drawn as normbench draws them
    (`Plan.dropout_masks`), scaled by 1 / (1 - rate) so that a step multiplies once, in
    `dtype`, by dropout name; empty for a network without dropout."""
    masks = plan.dropout_masks(seed, step, plan.spec.batch_size) or {}
    return {d.name: (masks[d.name] / (1.0 - d.rate)).astype(dtype) for d in plan.dropouts}


def dense_input_shapes(plan) -> dict[str, tuple[int, ...]]:
    """One example's canonical input shape of every dense layer, by name: a dense layer
    after a convolution reads an (H, W, C) map flattened in (h, w, c) order, which a loop in
    a channels-first framework (PyTorch) matches once, in the kernel's rows."""
    recorder = _InputRecorder()
    plan.arch.build(recorder, vocabulary._Shape(plan.arch.input_shape))
    return recorder.dense_inputs


def check_plan(plan) -> float:
    """The learning rate of a plan the loops can train (NotImplementedError, an asv skip,
    otherwise): plain SGD at a constant rate, on the stored batches (no augmentation)."""
    if plan.augments:
        raise NotImplementedError("hand-written reference loops train on the stored batches; "
                                  f"{plan.spec.name} augments them")
    return check_optimizer(plan)


def check_optimizer(plan) -> float:
    """The learning rate of a plan the loops can train: plain SGD at a constant rate."""
    optimizer, schedule = plan.spec.optimizer, plan.spec.schedule
    if optimizer.name != "sgd" or optimizer.momentum or schedule.name != "constant":
        raise NotImplementedError(f"hand-written reference loops train with plain SGD at a constant rate, not "
                                  f"{optimizer.name} with a {schedule.name} schedule")
    return float(optimizer.learning_rate)


def plugin_module(package: str, kind: str, name: str):
    """`<package>.<kind>.<name>`: the hand-written code of one method (kind
    "normalizations") or auxiliary loss ("auxiliary_losses"); NotImplementedError if absent."""
    module_name = f"{package}.{kind}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            path = module_name.replace(".", "/") + ".py"
            raise NotImplementedError(f"no hand-written {name} for this framework: add {path}") from None
        raise


def initial_values(plan, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """normbench's initial (params, state) of run `seed` in the spec's dtype, canonical
    layouts: both sides start from the same weights (the arithmetic, not only its cost, is
    then comparable). A loop trains in that dtype (float32 in every benchmark; the tests
    also check float64, where a difference of formula cannot hide behind rounding)."""
    params, state = plan.initial_parameters(seed)
    dtype = np.dtype(plan.spec.dtype)
    return ({k: np.asarray(v, dtype) for k, v in params.items()}, {k: np.asarray(v, dtype) for k, v in state.items()})


def slot_names(plan, layer) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(parameter suffixes of the method, state suffixes) of one normalized layer; `affine`'s
    own parameters are not the method's and are left out."""
    params, state = plan._suffixes[layer.name]
    return tuple(p for p in params if p not in ("affine_scale", "affine_shift")), state
