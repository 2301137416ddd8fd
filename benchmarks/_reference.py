"""What the hand-written reference loops share, framework-free: their contract, the part of
a plan they can run, and where each method's hand-written code lives.

A reference loop is the yardstick of `bench_ratios.ReferenceRatio`: the training step a
user of one framework writes by hand for the same network, method, batch and optimizer,
sharing no code with normbench's backends. One package per framework,
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

`step(i)` trains on batch i of run `seed`'s batch order and returns the step's
differentiated loss (cross entropy + weighted auxiliary losses, without the L2 term, as
`Trainer.step`'s first value) as a framework scalar, not read back: reading it is the
caller's choice (tests compare it with normbench's; timings do not read it).
"""

from __future__ import annotations

import importlib

import numpy as np

from normbench.architectures import layers as vocabulary


class _ChainRecorder(vocabulary._DeclaringNet):
    """Declares an architecture like `declare` does, and refuses every word of the
    vocabulary a plain chain of layers does not use."""

    def __init__(self):
        super().__init__()
        self.activations: list[str | None] = []

    def conv(self, name, x, channels, kernel_size, stride=1, padding="same", groups=1, normalize=True,
             activation="relu", bias=True):
        if groups != 1:
            raise NotImplementedError(f"layer {name}: grouped convolution")
        if not bias:
            raise NotImplementedError(f"layer {name}: a convolution without bias")
        self.activations.append(activation)
        return super().conv(name, x, channels, kernel_size, stride, padding, groups, normalize, activation)

    def dense(self, name, x, units, normalize=True, activation="relu", bias=True, kernel_init="glorot_uniform",
              bias_init="zeros"):
        if not bias or kernel_init != "glorot_uniform" or bias_init != "zeros":
            raise NotImplementedError(f"layer {name}: a dense layer without bias or with its own initializer")
        self.activations.append(activation)
        return super().dense(name, x, units, normalize, activation)

    # A chain has none of these: each one stops the recording with its name.
    def depthwise_conv(self, name, *args, **kwargs):
        raise NotImplementedError(f"layer {name}: depthwise convolution")

    def max_pool(self, *args, **kwargs):
        raise NotImplementedError("max pooling")

    def avg_pool(self, *args, **kwargs):
        raise NotImplementedError("average pooling")

    def global_avg_pool(self, *args, **kwargs):
        raise NotImplementedError("global average pooling")

    def global_max_pool(self, *args, **kwargs):
        raise NotImplementedError("global max pooling")

    def add(self, *args, **kwargs):
        raise NotImplementedError("a residual addition")

    def concat(self, *args, **kwargs):
        raise NotImplementedError("a concatenation")

    def dropout(self, *args, **kwargs):
        raise NotImplementedError("dropout")

    def matrix(self, *args, **kwargs):
        raise NotImplementedError("a predicted transform matrix")

    def point_transform(self, *args, **kwargs):
        raise NotImplementedError("a point transform")

    def orthogonality_loss(self, *args, **kwargs):
        raise NotImplementedError("an architecture-declared loss")


def chain(plan) -> list:
    """The plan's layers when its architecture is a chain the hand-written loops cover:
    convolutions and dense layers, each normalized and followed by ReLU, then one
    un-normalized dense head. NotImplementedError (an asv skip) otherwise."""
    recorder = _ChainRecorder()
    try:
        plan.arch.build(recorder, vocabulary._Shape(plan.arch.input_shape))
    except NotImplementedError as exc:
        raise NotImplementedError(f"hand-written reference loops cover chains of conv/dense layers; "
                                  f"{plan.arch.name} uses {exc}") from None
    layers = list(plan.layers)
    *hidden, head = layers
    if (any(not layer.normalized for layer in hidden) or head.normalized or head.kind != "dense"
            or recorder.activations != ["relu"] * len(hidden) + [None]):
        raise NotImplementedError(f"hand-written reference loops cover normalized conv/dense layers with ReLU and "
                                  f"a dense head; {plan.arch.name} is not such a chain")
    return layers


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
    """normbench's initial (params, state) of run `seed` in float32, canonical layouts: both
    sides start from the same weights (the arithmetic, not only its cost, is then comparable)."""
    params, state = plan.initial_parameters(seed)
    return ({k: np.asarray(v, np.float32) for k, v in params.items()},
            {k: np.asarray(v, np.float32) for k, v in state.items()})


def slot_names(plan, layer) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(parameter suffixes of the method, state suffixes) of one normalized layer; `affine`'s
    own parameters are not the method's and are left out."""
    params, state = plan._suffixes[layer.name]
    return tuple(p for p in params if p not in ("affine_scale", "affine_shift")), state
