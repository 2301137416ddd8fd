"""JAX engine: parameters, optimizer state and batch-norm state are pytrees (dicts of
arrays); one `jax.jit`-compiled function per training step.

Compile cost: `Trainer.compile(batch_size)` compiles the training step ahead of time
and returns the seconds it took; `step` compiles lazily on first use otherwise, so a
timer around the first `step` measures compile + run. Evaluation compiles once per
chunk shape on first use. The trainers of one program (the seeds of a variant) share
these compiled functions (`Engine.step_functions`), so only a sweep's first seed of each
variant pays for compilation.
"""

from __future__ import annotations

import functools
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from normbench.backends import base
from normbench.backends.jax.ops import Ops

_DTYPES = {"float32": np.float32, "float64": np.float64}
STEP_FUNCTIONS_KEPT = 8  # programs whose compiled functions an engine keeps (Engine.step_functions)

# XLA:CPU hands each convolution and matrix product to YNNPACK on its own, and the bias add
# and ReLU between two convolutions run as XLA loops of their own. With elementwise ops
# admitted into YNNPACK's fusions, a convolution takes its bias, and the ReLU before the
# next one, into one YNNPACK graph: cnn3's evaluation of 250 images measured 1.25-1.35x
# faster, of the 10,000 test images through Trainer.evaluate 1.23-1.37x (every mnist-cnn
# variant, alternating in one process on the 2-core machine, values equal to 9e-9).
# The option is experimental: a jaxlib that refuses it compiles with XLA's defaults
# (`_inference_options`).
#
# Which fusion types the option lists matters: elementwise alone cost other networks.
# Predictions of 256 inputs, every case of bench_inference, two runs (jaxlib 0.10.2, the
# 2-core AVX-512 machine, the options alternating in one process), time over XLA's
# defaults with elementwise alone / with convolution, dot and reduction fusion listed
# too: pointnet-small 1.22-1.53 / 0.89-1.01; cnn3 with layer, group, instance or
# weight-standardized group norm 0.98-1.35 / 0.91-1.10, its other ten cases 0.48-0.76 /
# 0.47-0.73; inception-v2-small 0.81-0.91 / 0.79-0.93; mobilenet-v1-small 0.96-1.02 /
# 0.84-1.04; resnet-small 1.00-1.10 / 0.98-1.11, but with batch norm as trained 1.26-1.29
# / 1.25-1.28 and with group norm 1.09-1.14 / 1.24-1.27 (no list tried beat the defaults
# there). Trainer.evaluate of cnn3's 10,000 test images (none / batch norm / standardization
# loss, ms): defaults 425 / 397 / 446, elementwise alone 213 / 230 / 201, the four 196 /
# 231 / 193, the metrics equal to the bit.
#
# Training steps keep XLA's defaults. With elementwise fusion alone, cnn3's steps without
# normalization and with the standardization loss took 0.81-0.91x as long (batch norm's
# 0.96-1.44x), resnet-small's 1.11-1.23x, and cnn3 with the decorrelation loss failed at its
# first step ("unsupported layout in YNN fusion"); no choice was faster for every network.
# Measured again at 1e8f974 (side by side in one process per network): convolution, dot and
# elementwise listed took cnn3's steps 0.88-0.91x (none; 0.67 once, in a process holding
# thirty trainers) and 0.84-0.86x (standardization loss), but every small architecture's
# 1.04-1.72x (pointnet-small's the most), and the decorrelation loss still failed;
# convolution and dot alone (no YNNPACK reductions) measured 0.86-1.54x on cnn3, mlp3 and
# the small architectures, run to run.
CPU_INFERENCE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ",".join(
    f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("ELTWISE", "INDIVIDUAL_CONVOLUTION", "DOT", "REDUCE"))}


@functools.cache
def _inference_options(platform: str) -> dict:
    """The compiler options of inference-mode functions on `platform`: the CPU ones where
    this jaxlib compiles a small function with them, none elsewhere."""
    if platform != "cpu":
        return {}
    try:
        jax.jit(lambda x: jnp.maximum(x + 1.0, 0.0), compiler_options=CPU_INFERENCE_COMPILER_OPTIONS).lower(
            jnp.zeros((2, 2), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - any refusal (unknown option or value) means: defaults
        return {}
    return dict(CPU_INFERENCE_COMPILER_OPTIONS)


def _find_device(requested: str):
    kind, _, index_text = requested.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    if kind not in ("cpu", "gpu") or (index_text and not index_text.isdigit()):
        raise base.BackendUnavailable(f"jax: device {requested!r} is not supported; use cpu, gpu, cuda or cuda:N")
    try:
        devices = jax.devices(kind)
    except RuntimeError:
        raise base.BackendUnavailable(f"jax: device {requested!r} requested but jax has no {kind} backend here; use --device cpu") from None
    index = int(index_text or 0)
    if index >= len(devices):
        raise base.BackendUnavailable(f"jax: device {requested!r} does not exist; {len(devices)} {kind} device(s) present")
    return devices[index]


class Engine(base.Engine):
    name = "jax"
    framework = "jax"

    def __init__(self, device: str | None = None, dtype: str = "float32", compile: bool = False):  # noqa: A002
        super().__init__(device, dtype, compile)
        if dtype == "float64":
            # Without x64 JAX silently computes float64 requests in float32. The switch is
            # process-global (every later JAX computation may use 64-bit types); float32
            # engines are unaffected because this engine casts every input explicitly.
            jax.config.update("jax_enable_x64", True)
        self.jax_device = _find_device((device or "cpu").lower())
        self.device = f"{self.jax_device.platform}:{self.jax_device.id}"
        self.np_dtype = _DTYPES[dtype]
        self.ops = Ops(self.jax_device.platform)
        if self.jax_device.platform == "cpu":
            base.keep_freed_memory()
        self._trainers: weakref.WeakSet = weakref.WeakSet()
        self._step_functions: dict[tuple, StepFunctions] = {}

    def versions(self):
        import jaxlib

        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}

    def device_description(self):
        if self.jax_device.platform == "cpu":
            return f"cpu (XLA, {len(jax.devices('cpu'))} device(s))"
        return f"{self.jax_device.platform}: {self.jax_device.device_kind}"

    def _put(self, array, dtype):
        return jax.device_put(np.asarray(array, dtype=dtype), self.jax_device)

    def put_images(self, images_nhwc):
        return self._put(images_nhwc, self.np_dtype)

    def put_labels(self, labels):
        return self._put(labels, np.int32)

    def import_tree(self, tree):
        return {name: self._put(value, self.np_dtype) for name, value in tree.items()}

    def export_tree(self, tree):
        return {name: np.asarray(value) for name, value in jax.device_get(tree).items()}

    def activation_to_numpy(self, x):
        return np.asarray(jax.device_get(x))

    def to_numpy(self, x):
        return np.asarray(jax.device_get(x))

    def stack_to_numpy(self, arrays):
        return np.asarray(jax.device_get(jnp.stack(arrays)))

    def synchronize(self):
        # JAX has no device-wide barrier; wait for the arrays of every live trainer.
        for trainer in list(self._trainers):
            jax.block_until_ready((trainer.params, trainer.opt_state, trainer.state))

    def step_functions(self, program, track=()) -> StepFunctions:
        """`program`'s StepFunctions, made once per program: a program is a variant (the
        whole VariantSpec: a plan may carry one its spec does not list, as folding's plain
        network does) of a spec (its hash covers every field) on a network (the same
        Architecture object for every seed of a sweep)."""
        key = (program.spec.hash(), program.variant, id(program.arch), tuple(track))
        functions = self._step_functions.pop(key, None) or StepFunctions(self.ops, program, tuple(track))
        self._step_functions[key] = functions  # the most recently used last
        while len(self._step_functions) > STEP_FUNCTIONS_KEPT:
            # A sweep trains a variant's seeds one after another: the last few programs
            # are all it reuses, and each holds compiled executables in memory.
            self._step_functions.pop(next(iter(self._step_functions)))
        return functions

    def trainer(self, program, params, state, train_images, train_labels, track=()):
        trainer = Trainer(self, program, params, state, train_images, train_labels, track)
        self._trainers.add(trainer)
        return trainer

    def vectorized_group(self, program, members, train_images, train_labels, track=()):
        group = VectorizedGroup(self, program, members, train_images, train_labels, track)
        self._trainers.add(group)
        return group

    def fastest_group_size(self):
        # On CPU a vectorized group is slower than its runs one after another, even with
        # its convolutions one member at a time (ops._member_convolution): mnist-cnn's
        # projected seconds per run (1000 steps, 21 evaluations of 20,000 images; none /
        # batch norm / standardization loss, the 2-core machine, steps side by side in one
        # process): alone 17.7 / 20.7 / 19.7, groups of 4 21.6 / 24.2 / 21.5 (with XLA's
        # grouped convolutions and a vmapped evaluation 138 / 148 / 144), groups of 10
        # 20.2 / 23.3 / 22.9. Accelerators are where batching pays: on an H200
        # (results/benchmarks/gpu/, two leases) cnn3's main job cost 2.5-3.2 s per run
        # alone, 1.0-1.3 in groups of 4 and 0.64-0.71 in groups of 10.
        return 1 if self.jax_device.platform == "cpu" else 10


class StepFunctions:
    """The jitted functions of one program (a spec's variant on its network) and their
    compiled executables, shared by every trainer of it on an engine: the seeds of a
    sweep trace and compile their step and evaluation once, not once per run (2-3 s per
    run on cnn3 on the 2-core CPU). Parameters, state and data are arguments, never
    captured, so one executable serves every seed."""

    def __init__(self, ops, program, track):
        self.program = program  # held: the key's id(program.arch) stays this network's

        def objective(params, state, images, labels, masks):
            return program.loss(ops, params, state, images, labels, masks)

        value_and_grad = jax.value_and_grad(objective, has_aux=True)

        def batch_step(params, opt_state, state, images, labels, lr, masks):
            (total, aux), grads = value_and_grad(params, state, images, labels, masks)
            params, opt_state = program.update(ops, params, grads, opt_state, lr)
            losses = jnp.stack(program.step_losses(aux))
            return params, opt_state, aux["state"], losses

        def train_step(params, opt_state, state, train_images, train_labels, indices, lr, masks):
            # The batch is gathered on the device from the resident training set: only
            # the indices (and dropout masks) cross the host boundary each step.
            return batch_step(params, opt_state, state, train_images[indices], train_labels[indices], lr, masks)

        def augmented_step(params, opt_state, state, images, train_labels, indices, lr, masks):
            # An augmented run's batch comes from the host, already in `indices` order.
            return batch_step(params, opt_state, state, images, train_labels[indices], lr, masks)

        def gradients(params, state, images, labels, masks):
            _, grads = value_and_grad(params, state, images, labels, masks)
            return program.objective_gradients(ops, params, grads), program.inspect(ops, params, state, images, labels, masks)

        def evaluation(params, state, images, labels):
            return program.evaluation(ops, params, state, images, labels, track)

        def logits(params, state, images):
            return program.forward(ops, params, state, images, training=False).logits

        # Donating the old params / optimizer state / BN state lets XLA update them in
        # place (no second copy of every buffer per step).
        self.train_steps = {augmented: jax.jit(body, donate_argnums=(0, 1, 2))
                            for augmented, body in ((False, train_step), (True, augmented_step))}
        self.compiled: dict[tuple, object] = {}  # Trainer._compiled_key -> executable
        self.gradients = jax.jit(gradients)
        inference = _inference_options(ops.platform)
        self.evaluation = jax.jit(evaluation, compiler_options=inference)
        self.logits = jax.jit(logits, compiler_options=inference)


class Trainer(base.Trainer):
    # cnn3, 10,000 test images (see base.Trainer), compiled with CPU_INFERENCE_COMPILER_OPTIONS,
    # the chunks alternating in one process (none / batch norm / standardization loss, ms):
    # 125: 412 / 388 / 414, 250: 352 / 355 / 345, 500: 305 / 322 / 318, 1000: 276 / 303 /
    # 287; a second process gave 500: 301 / 307 / 324, 1000: 287 / 319 / 292, 2000: 458 /
    # 478 / 447. Before the option, 250 was the fastest (0.30 s, with 500 at 0.35 s).
    # 500, not 1000: the gain past 500 is within the noise, and 500 is the largest chunk
    # resources.EVALUATION_CHUNK budgets for.
    evaluation_chunk_size = 500

    def __init__(self, engine, program, params, state, train_images, train_labels, track):
        super().__init__(engine, program, track)
        ops = self.ops = engine.ops
        self.params = engine.import_tree(params)
        self.state = engine.import_tree(state)
        self.opt_state = program.optimizer.init(ops, self.params)
        self.train_images, self.train_labels = train_images, train_labels
        self.compile_seconds: dict[int, float] = {}
        functions = engine.step_functions(program, track)
        self._train_steps, self._compiled = functions.train_steps, functions.compiled
        self._gradients, self._evaluation, self._logits = functions.gradients, functions.evaluation, functions.logits

    def _arguments(self, indices, learning_rate, dropout_masks, images=None):
        e = self.engine
        # lr is a 0-d array of the run dtype, so a changing schedule never retraces; the
        # per-step inputs go to the device in one batched transfer.
        masks = None if dropout_masks is None else {k: np.asarray(v, e.np_dtype) for k, v in dropout_masks.items()}
        batch = None if images is None else np.asarray(images, e.np_dtype)
        indices, lr, masks, batch = jax.device_put(
            (np.asarray(indices, np.int32), np.asarray(learning_rate, e.np_dtype), masks, batch), e.jax_device)
        images = self.train_images if batch is None else batch
        return self.params, self.opt_state, self.state, images, self.train_labels, indices, lr, masks

    def compile(self, batch_size: int, augmented: bool = False) -> float:
        """Compile the training step for batches of `batch_size` (taking augmented images
        from the host when `augmented`) ahead of time (idempotent). Returns the seconds
        spent tracing, lowering and compiling (0.0 if already done)."""
        key = self._compiled_key(batch_size, augmented)
        if key in self._compiled:
            return 0.0
        start = time.perf_counter()
        images = np.zeros((batch_size, *self.program.dataset.image_shape)) if augmented else None
        args = self._arguments(np.zeros(batch_size, np.int32), 0.0, self.program.dropout_masks(0, 0, batch_size), images)
        self._compiled[key] = self._train_steps[augmented].lower(*args).compile()
        self.compile_seconds[batch_size] = time.perf_counter() - start
        return self.compile_seconds[batch_size]

    def _compiled_key(self, batch_size: int, augmented: bool) -> tuple:
        # The executables are shared by the program's trainers (StepFunctions), which may
        # hold training sets of other sizes: an executable is specialized to its shapes.
        return batch_size, augmented, tuple(self.train_images.shape), tuple(self.train_labels.shape)

    def step(self, indices, learning_rate, dropout_masks=None, images=None):
        augmented = images is not None
        self.compile(len(indices), augmented)
        arguments = self._arguments(indices, learning_rate, dropout_masks, images)
        self.params, self.opt_state, self.state, losses = self._compiled[self._compiled_key(len(indices), augmented)](*arguments)
        return losses

    def export(self):
        return self.engine.export_tree(self.params), self.engine.export_tree(self.state)

    def export_optimizer_state(self):
        return self.engine.export_tree(self.opt_state)

    def load_state(self, params, state, optimizer_state):
        e = self.engine
        self.params, self.state, self.opt_state = e.import_tree(params), e.import_tree(state), e.import_tree(optimizer_state)

    def gradients(self, images, labels, dropout_masks=None):
        masks = None if dropout_masks is None else self.engine.import_tree(dropout_masks)
        grads, seen = self._gradients(self.params, self.state, images, labels, masks)
        return self.engine.export_tree(grads), self._canonical_intermediates(seen)

    def predict(self, images):
        return self.engine.activation_to_numpy(self._logits(self.params, self.state, images))

    def _evaluate_chunk(self, images, labels):
        # One transfer for the whole tree.
        return self._chunk_to_numpy(jax.device_get(self._evaluation(self.params, self.state, images, labels)))


def _stacked(trees: list[dict]) -> dict:
    return {k: jnp.stack([tree[k] for tree in trees]) for k in trees[0]}


class VectorizedGroup(base.VectorizedGroup):
    """`jax.vmap` of the training step over members stacked on a first axis, one `jit`."""

    evaluation_chunk_size = Trainer.evaluation_chunk_size

    def __init__(self, engine, program, members, train_images, train_labels, track):
        super().__init__(engine, program, len(members), track)
        ops = Ops(engine.jax_device.platform)
        self.params = _stacked([engine.import_tree(p) for p, _ in members])
        self.state = _stacked([engine.import_tree(s) for _, s in members])
        self.opt_state = jax.vmap(lambda p: program.optimizer.init(ops, p))(self.params)
        self.train_images, self.train_labels = train_images, train_labels

        value_and_grad = jax.value_and_grad(
            lambda params, state, images, labels, masks: program.loss(ops, params, state, images, labels, masks),
            has_aux=True)

        def batch_step(params, opt_state, state, images, indices, lr, masks):
            (_, aux), grads = value_and_grad(params, state, images, train_labels[indices], masks)
            params, opt_state = program.update(ops, params, grads, opt_state, lr)
            return params, opt_state, aux["state"], jnp.stack(program.step_losses(aux))

        def member_step(params, opt_state, state, indices, lr, masks):
            return batch_step(params, opt_state, state, train_images[indices], indices, lr, masks)

        def evaluation(params, state, images, labels):
            return program.evaluation(ops, params, state, images, labels, track)

        self._train_step = jax.jit(jax.vmap(member_step, in_axes=(0, 0, 0, 0, None, 0)), donate_argnums=(0, 1, 2))
        # Augmented runs: each member's batch comes from the host (members, batch, ...).
        self._augmented_step = jax.jit(jax.vmap(batch_step, in_axes=(0, 0, 0, 0, 0, None, 0)), donate_argnums=(0, 1, 2))
        self._evaluation = jax.jit(jax.vmap(evaluation, in_axes=(0, 0, None, None)),
                                   compiler_options=_inference_options(ops.platform))
        # On CPU each member is evaluated alone, by the function its runs alone share: cnn3's
        # 20,000 evaluated images with the standardization loss took 0.36 s alone, 4.8 s for
        # 4 members vmapped (its unrolled convolutions sliced from and stacked into the
        # members' activations around single-threaded fusions), 17.7 s before they were
        # unrolled (XLA's grouped convolutions). Same functions, so the same values.
        self._members_evaluation = (engine.step_functions(program, track).evaluation
                                    if ops.platform == "cpu" else None)
        self._members = None  # (the stacked params and state, each member's own), read at an evaluation

    def step(self, indices, learning_rate, dropout_masks=None, images=None):
        e = self.engine
        masks = None if dropout_masks is None else {
            k: np.stack([np.asarray(m[k], e.np_dtype) for m in dropout_masks]) for k in dropout_masks[0]}
        batch = None if images is None else np.stack([np.asarray(x, e.np_dtype) for x in images])
        indices, lr, masks, batch = jax.device_put(
            (np.asarray(indices, np.int32), np.asarray(learning_rate, e.np_dtype), masks, batch), e.jax_device)
        if batch is None:
            self.params, self.opt_state, self.state, losses = self._train_step(
                self.params, self.opt_state, self.state, indices, lr, masks)
        else:
            self.params, self.opt_state, self.state, losses = self._augmented_step(
                self.params, self.opt_state, self.state, batch, indices, lr, masks)
        return losses

    def _evaluate_members(self, images, labels):
        if self._members_evaluation is None:
            return self._per_member(jax.device_get(self._evaluation(self.params, self.state, images, labels)))
        if self._members is None or self._members[0] is not self.params:  # sliced once per evaluated state
            self._members = (self.params, list(zip(self._per_member(self.params), self._per_member(self.state))))
        return jax.device_get([self._members_evaluation(params, state, images, labels)
                               for params, state in self._members[1]])
