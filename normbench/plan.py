"""A spec variant resolved once into everything a run needs: the plan.

`resolve(spec, variant)` looks every name up in its registry exactly once (architecture,
normalization method, auxiliary losses, optimizer, data set) and returns a `Plan`. The
runner, the memory estimate, parity and the benchmarks consume the plan; backends run its
neutral functions (`loss`, `update`, `inspect`, `evaluation`) and never see the spec.

Initial weights are framework-free: Glorot-uniform kernels (TensorFlow's default: limit
sqrt(6 / (fan_in + fan_out)), receptive field in both fans) drawn in layer order from one
generator seeded by the run seed, independently of the method, so every variant of a
seed starts from the same kernels; zero biases and shifts, unit scales, and whatever else
a method declares.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from normbench import architectures, augmentations, auxiliary_losses, datasets, normalizations, optimizers
from normbench.data_order import augmentation_stream, dropout_stream, seed_streams
from normbench.spec import ExperimentSpec, PluginSpec, VariantSpec

AFFINE_PARAMETERS = ("affine_scale", "affine_shift")


def build_method(plugin: PluginSpec) -> normalizations.Normalization:
    """A configured normalization method (a `method` option, such as `then`, built too)."""
    cls = normalizations.get(plugin.name)
    options = {k: build_method(v) if isinstance(v, PluginSpec) else v for k, v in plugin.options}
    return cls(**options)


def build_loss(plugin: PluginSpec) -> auxiliary_losses.AuxiliaryLoss:
    return auxiliary_losses.get(plugin.name)(**plugin.settings())


def check_variant(spec: ExperimentSpec, variant: VariantSpec, slots) -> tuple[str, str] | None:
    """(field, why) when the variant's method or losses cannot run on the spec's
    architecture and batch size; None when they can."""
    method = build_method(variant.normalization)
    for slot in slots:
        problem = method.check_slot(slot) or method.check_batch(spec.batch_size_for(variant), slot)
        if problem:
            return "normalization", f"{method.describe()} cannot normalize layer {slot.layer} of {spec.model_for(variant)}: {problem}"
    for k, plugin in enumerate(variant.auxiliary_losses):
        loss = build_loss(plugin)
        for slot in slots:
            problem = loss.check_batch(spec.batch_size_for(variant), slot)
            if problem:
                return f"auxiliary_losses[{k}]", f"{loss.name} at layer {slot.layer} of {spec.model_for(variant)}: {problem}"
    return None


@dataclasses.dataclass
class ForwardOutput:
    logits: object
    preactivations: dict  # each slot's output after `affine`: the input of its activation
    taps: dict  # each slot's method output, before `affine`: what auxiliary losses see
    state: dict  # updated running statistics
    losses: dict = dataclasses.field(default_factory=dict)  # the architecture's own loss terms, by name


class Plan:
    """One variant of a spec, resolved: what a backend trains and evaluates."""

    def __init__(self, spec: ExperimentSpec, variant: VariantSpec, arch: architectures.Architecture | None = None):
        """`arch` replaces the spec's registered architecture (tests use networks of their own)."""
        self.spec, self.variant = spec, variant
        self.arch = arch or architectures.get(spec.model_for(variant))
        self.layers = self.arch.layers()
        self.dataset = datasets.info(spec.dataset)
        self.method = build_method(variant.normalization)
        self.losses = [build_loss(p) for p in variant.auxiliary_losses]
        self.affine = variant.affine
        self.optimizer = optimizers.build(spec.optimizer)
        self.steps = spec.steps_for(variant)
        self.batch_size = spec.batch_size_for(variant)
        # What `Trainer.step` returns per step, in this order.
        self.architecture_losses = self.arch.auxiliary_losses()  # (name, weight): terms the network itself adds
        self.dropouts = self.arch.dropouts()
        self.augmentations = [(augmentations.get(p.name), dict(p.options)) for p in spec.augmentations]
        self.step_loss_names = ("loss", "cross_entropy", *(f"{loss.name}_loss" for loss in self.losses),
                                *(f"{name}_loss" for name, _ in self.architecture_losses))
        reported = auxiliary_losses.always_reported()
        trained = variant.auxiliary_loss(reported.name)
        # The standardization loss is evaluated for every variant (metrics.csv's std_loss):
        # with the variant's own settings where it trains with it.
        self.std_metric = build_loss(trained) if trained else reported(weight=1.0, **_table_defaults(spec, reported.name))
        self.std_loss_weight = self.std_metric.weight if trained else 0.0
        self._suffixes: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for layer in self.layers:
            if layer.normalized:
                slot = layer.slot
                names = tuple(self.method.parameters(slot)) + self.method.kernel_parameter_names(slot)
                if self.affine:
                    names += AFFINE_PARAMETERS
                self._suffixes[layer.name] = (names, tuple(self.method.state(slot)))

    # ---- description
    @property
    def slots(self):
        return [layer.slot for layer in self.layers if layer.normalized]

    def has_bias(self, layer) -> bool:
        """A layer keeps its bias unless it declares none or something after it provides the offset."""
        return layer.bias and (not layer.normalized or not (self.method.provides_offset or self.affine))

    # ---- parameters
    def initial_parameters(self, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Initial (params, state) of run `seed`, canonical float64 NumPy."""
        init_seed, _ = seed_streams(seed)
        rng = np.random.Generator(np.random.PCG64(init_seed))
        params: dict[str, np.ndarray] = {}
        state: dict[str, np.ndarray] = {}
        for layer in self.layers:
            shape = layer.kernel_shape
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            # A zero kernel draws nothing: the stream of every other layer is unchanged.
            kernel = np.zeros(shape) if layer.kernel_init == "zeros" else rng.uniform(-limit, limit, size=shape)
            params[f"{layer.name}/kernel"] = kernel
            channels = shape[-1]
            if layer.normalized:
                slot = layer.slot
                from_kernel = self.method.kernel_parameters(slot, kernel)
                if tuple(from_kernel) != self.method.kernel_parameter_names(slot):
                    raise TypeError(f"{self.method.name}: kernel_parameters returned {tuple(from_kernel)}, but "
                                    f"kernel_parameter_names declares {self.method.kernel_parameter_names(slot)}")
                for suffix, value in {**self.method.parameters(slot), **from_kernel}.items():
                    params[f"{layer.name}/{suffix}"] = np.asarray(value, np.float64)
                if self.affine:
                    params[f"{layer.name}/affine_scale"] = np.ones(channels)
                    params[f"{layer.name}/affine_shift"] = np.zeros(channels)
                for suffix, value in self.method.state(slot).items():
                    state[f"{layer.name}/{suffix}"] = np.asarray(value, np.float64)
            if self.has_bias(layer):
                identity = layer.bias_init == "identity"
                params[f"{layer.name}/bias"] = np.eye(math.isqrt(channels)).ravel() if identity else np.zeros(channels)
        return params, state

    def dropout_masks(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray] | None:
        """Keep masks (1.0 keep, 0.0 drop; float64) of every dropout layer for training step
        `step` of run `seed`, or None for a network without dropout. Drawn on the host from
        the run's dropout stream, one generator per step (so any step's masks can be made
        without the ones before it), and passed to every backend alike."""
        if not self.dropouts:
            return None
        rng = np.random.Generator(np.random.PCG64(dropout_stream(seed, step)))
        return {d.name: (rng.random((batch_size, *d.shape)) >= d.rate).astype(np.float64) for d in self.dropouts}

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented (then `Trainer.step` takes `augmented_batch`'s images)."""
        return bool(self.augmentations)

    def augmented_batch(self, images: np.ndarray, seed: int, step: int) -> np.ndarray:
        """Training step `step`'s batch of run `seed` (canonical NumPy, the run dtype) after
        the spec's augmentations, in order, drawn from the run's augmentation stream, one
        generator per step (any step's batch can be made alone); `images` is left as it was."""
        rng = np.random.Generator(np.random.PCG64(augmentation_stream(seed, step)))
        for augmentation, options in self.augmentations:
            images = augmentation.apply(images, rng, **options)
        return images

    def check_batch(self, batch_size: int) -> str | None:
        """Why this variant's method or losses cannot take a batch of `batch_size`, or None."""
        for layer in self.layers:
            if layer.normalized:
                problem = self.method.check_batch(batch_size, layer.slot) or next(
                    (p for p in (loss.check_batch(batch_size, layer.slot) for loss in self.losses) if p), None)
                if problem:
                    return problem
        return None

    def learning_rate(self, step: int) -> float:
        steps_per_epoch = self.dataset.train_examples / self.batch_size
        base = (self.spec.learning_rate_for(self.variant)
                * optimizers.schedule_multiplier(self.spec.schedule, step, steps_per_epoch))
        return self.optimizer.effective_learning_rate(base, step)

    # ---- the network
    def forward(self, ops, params: dict, state: dict, images, training: bool, dropout_masks=None) -> ForwardOutput:
        preacts, taps, new_state = {}, {}, dict(state)
        method = self.method

        def linear(layer, x):
            kernel = params[f"{layer.name}/kernel"]
            if layer.normalized:
                kernel = method.kernel(ops, kernel, self._slot_params(params, layer.name))
            bias = params.get(f"{layer.name}/bias")
            if layer.kind == "conv":
                return ops.conv2d_bias(x, kernel, bias, layer.stride, layer.pads, layer.groups)
            return ops.dense_bias(x, kernel, bias)

        def slot(layer, z):
            p = self._slot_params(params, layer.name)
            s = {suffix: state[f"{layer.name}/{suffix}"] for suffix in self._suffixes[layer.name][1]}
            if training:
                y, updated = method.train(ops, z, p, s, layer.slot)
                new_state.update({f"{layer.name}/{k}": v for k, v in updated.items()})
            else:
                y = method.infer(ops, z, p, s, layer.slot)
            taps[layer.name] = y
            if self.affine:
                y = ops.add_channel_bias(ops.scale_channels(y, p["affine_scale"]), p["affine_shift"])
            preacts[layer.name] = y
            return y

        if training and self.dropouts and dropout_masks is None:
            raise ValueError(f"{self.arch.name} has dropout: a training-mode forward needs this step's masks "
                             "(Plan.dropout_masks)")
        net = architectures.layers.Net(ops, self.layers, params, linear, slot, dropout_masks if training else None)
        logits = self.arch.build(net, images)
        return ForwardOutput(logits=logits, preactivations=preacts, taps=taps, state=new_state, losses=net.losses)

    def _slot_params(self, params: dict, layer: str) -> dict:
        return {suffix: params[f"{layer}/{suffix}"] for suffix in self._suffixes[layer][0]}

    # ---- the objective
    def loss(self, ops, params: dict, state: dict, images, labels, dropout_masks=None):
        """The differentiated objective: cross entropy + sum of weight x auxiliary loss.
        Returns (total, aux); aux holds each component (`step_loss_names`) and the new state.

        The L2 term is not in this graph: `update` adds its gradient, weight_decay x
        kernel, directly. The mathematics is the same; in eager frameworks
        differentiating a sum of squares per kernel cost ~10% of an MLP step."""
        out = self.forward(ops, params, state, images, training=True, dropout_masks=dropout_masks)
        cross_entropy = ops.softmax_cross_entropy(out.logits, labels)
        total, aux = cross_entropy, {"cross_entropy": cross_entropy, "state": out.state}
        for loss in self.losses:
            value = loss.value(ops, out.taps)
            aux[f"{loss.name}_loss"] = value
            total = total + loss.weight * value
        for name, weight in self.architecture_losses:
            aux[f"{name}_loss"] = out.losses[name]
            total = total + weight * out.losses[name]
        aux["loss"] = total
        return total, aux

    def step_losses(self, aux: dict) -> list:
        """`loss`'s components in `step_loss_names` order (what a trainer stacks per step)."""
        return [aux[name] for name in self.step_loss_names]

    def objective_gradients(self, ops, params: dict, loss_grads: dict) -> dict:
        """Gradients of the full objective (`loss` + L2) from the gradients of `loss`."""
        return add_weight_decay_gradient(params, loss_grads, self.spec.optimizer.weight_decay)

    def update(self, ops, params: dict, loss_grads: dict, opt_state: dict, learning_rate):
        """One optimizer step from the gradients of `loss`: (new params, new optimizer state)."""
        grads = self.objective_gradients(ops, params, loss_grads)
        return self.optimizer.update(ops, params, grads, opt_state, learning_rate)

    def inspect(self, ops, params: dict, state: dict, images, labels, dropout_masks=None) -> dict:
        """Training-mode forward exposing every intermediate quantity (for parity tests),
        including the full objective's value `total_loss` (with the L2 penalty)."""
        out = self.forward(ops, params, state, images, training=True, dropout_masks=dropout_masks)
        cross_entropy = ops.softmax_cross_entropy(out.logits, labels)
        total = cross_entropy + weight_decay_penalty(ops, params, self.spec.optimizer.weight_decay)
        losses = {}
        for loss in self.losses:
            losses[f"{loss.name}_loss"] = loss.value(ops, out.taps)
            total = total + loss.weight * losses[f"{loss.name}_loss"]
        for name, weight in self.architecture_losses:
            losses[f"{name}_loss"] = out.losses[name]
            total = total + weight * out.losses[name]
        return {
            "logits": out.logits,
            "preactivations": out.preactivations,
            "moments": {name: ops.channel_moments(z) for name, z in out.preactivations.items()},
            "cross_entropy": cross_entropy,
            "losses": losses,
            "total_loss": total,
            "state": out.state,
        }

    def evaluation(self, ops, params: dict, state: dict, images, labels, track: tuple[str, ...] = ()):
        """Inference-mode statistics of one chunk (arrays only): the mean cross entropy, the
        number correct, every slot's pre-activation moments, each auxiliary loss's chunk
        statistics and the tracked pre-activations. Counts are `chunk_counts`."""
        out = self.forward(ops, params, state, images, training=False)
        return {
            "cross_entropy_mean": ops.softmax_cross_entropy(out.logits, labels),
            "correct": ops.correct_count(out.logits, labels),
            "moments": {name: ops.channel_moments(z) for name, z in out.preactivations.items()},
            "auxiliary": {loss.name: {name: loss.chunk_statistics(ops, z) for name, z in out.taps.items()}
                          for loss in self.losses if loss.metric_column != self.std_metric.metric_column},
            "tracked": {name: out.preactivations[name] for name in track},
        }

    def values_per_channel(self, examples: int) -> dict[str, int]:
        """How many values stand behind each channel's statistics of a slot for `examples` examples."""
        return {slot.layer: examples * int(np.prod(slot.shape[:-1])) for slot in self.slots}

    @property
    def metric_columns(self) -> list[str]:
        """metrics.csv columns of auxiliary losses beyond the standardization loss (always there)."""
        return [loss.metric_column for loss in self.losses if loss.metric_column != self.std_metric.metric_column]


def _table_defaults(spec: ExperimentSpec, plugin: str) -> dict:
    """Options of a plugin given in the spec's top-level tables (legacy names included)."""
    aliases = {short: loss for short, (loss, _) in auxiliary_losses.normalization_shorthands().items()}
    out = {}
    for table, fields in spec.plugin_defaults:
        if aliases.get(table, table) == plugin:
            out.update(dict(fields))
    return out


def architecture_counts(arch: architectures.Architecture, normalization: PluginSpec = PluginSpec("none")) -> dict:
    """{parameters, multiply_accumulates, flops} of `arch` with `normalization` in its slots,
    per example. Parameters are every trained value (kernels, biases, the method's own);
    running statistics are state, not parameters. FLOPs = 2 x multiply-accumulates.
    ValueError (one sentence) when the method cannot fill one of the slots."""
    method = build_method(normalization)
    for slot in arch.slots:
        problem = method.check_slot(slot)
        if problem:
            raise ValueError(f"{method.describe()} cannot normalize layer {slot.layer} of {arch.name}: {problem}")
    variant = VariantSpec("count", normalization=normalization)
    spec = ExperimentSpec(name="count", model=arch.name, dataset=datasets.names()[0], batch_size=1, steps=1,
                          eval_every=1, seeds=(0,), variants=(variant,))
    plan = Plan(spec, variant, arch)
    params, _ = plan.initial_parameters(0)
    macs = sum(layer.multiply_accumulates for layer in plan.layers)
    return {"parameters": int(sum(v.size for v in params.values())), "multiply_accumulates": macs, "flops": 2 * macs}


def resolve(spec: ExperimentSpec, variant: VariantSpec | str) -> Plan:
    """The plan of one variant (a VariantSpec or a variant name) of `spec`."""
    return Plan(spec, spec.variant(variant) if isinstance(variant, str) else variant)


# ----------------------------------------------------------------------------- weight decay


def _decayed(name: str) -> bool:
    return name.endswith("/kernel")  # biases and norm parameters are not decayed


def weight_decay_penalty(ops, params: dict, weight_decay: float):
    """0.5 * weight_decay * sum of squared kernels (biases and norm parameters excluded)."""
    total = 0.0
    for name, value in params.items():
        if _decayed(name):
            total = total + ops.sum(value * value)
    return 0.5 * weight_decay * total


def add_weight_decay_gradient(params: dict, grads: dict, weight_decay: float) -> dict:
    """grads + the gradient of `weight_decay_penalty`, weight_decay * kernel."""
    if not weight_decay:
        return grads
    return {k: g + weight_decay * params[k] if _decayed(k) else g for k, g in grads.items()}
