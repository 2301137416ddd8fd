"""TensorFlow engine: tf.Variables updated by compiled steps (tf.function + GradientTape).

Each step is one call of a compiled function: it gathers the batch from the training set
already on the device, differentiates the neutral `program.loss`, applies the neutral
optimizer and assigns the results to the variables, and returns the three losses.
Functions are traced once per input shape and dtype (the neutral model needs static
shapes for its Python-int counts), so the learning rate enters as a scalar tensor and a
schedule never retraces.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

# torch must be loaded before TensorFlow when both end up in one process: the opposite
# order can crash (their bundled native libraries clash).
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from normbench import provenance, resources  # noqa: E402
from normbench.backends import base  # noqa: E402
from normbench.backends.tensorflow.ops import Ops  # noqa: E402

_DTYPES = {"float32": tf.float32, "float64": tf.float64}

# XLA (jit_compile=True) only where it measured faster than TensorFlow's graph executor.
# CPU (TF 2.21, float32, batch 128, paired interleaved timings): XLA steps were 9-21%
# slower for cnn3 and mlp3 in every variant, and compiled 2-5x longer. GPU: not measured
# yet, so the graph executor stays the default there too. Engine(jit_compile=True) forces it.
XLA_BY_DEVICE_TYPE = {"cpu": False, "gpu": False}


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs oneDNN's CPU kernels in this process (this package's
    __init__ says why normbench asks for them); None where this TensorFlow cannot say.
    TensorFlow's own test of it, which its test utilities call: no public API says."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def _parse_device(requested: str | None) -> tuple[str, str]:
    """normbench device name -> (canonical name, TensorFlow device string)."""
    text = (requested or "cpu").strip().lower()
    kind, _, index = text.partition(":")
    if kind == "cpu" and index in ("", "0"):
        return "cpu", "/CPU:0"
    if kind in ("cuda", "gpu") and (index == "" or index.isdigit()):
        number = int(index or 0)
        present = len(tf.config.list_physical_devices("GPU"))
        if number >= present:
            raise base.BackendUnavailable(
                f"tensorflow: device {requested!r} requested but {present} GPU(s) are visible to TensorFlow; use --device cpu")
        return f"gpu:{number}", f"/GPU:{number}"
    raise base.BackendUnavailable(f"tensorflow: unknown device {requested!r}; use cpu, gpu, gpu:N, cuda or cuda:N")


class Engine(base.Engine):
    name = "tensorflow"
    framework = "tensorflow"

    def __init__(self, device: str | None = None, dtype: str = "float32", compile: bool = False,  # noqa: A002
                 jit_compile: bool | None = None):
        super().__init__(device, dtype, compile)
        self.device, self.tf_device = _parse_device(device)
        self.device_type = self.device.partition(":")[0]
        if self.device_type == "gpu":
            # TF32 would make float32 matmuls/convs disagree with the other backends at ~1e-3.
            tf.config.experimental.enable_tensor_float_32_execution(False)
        self.tf_dtype = _DTYPES[dtype]
        self.jit_compile = XLA_BY_DEVICE_TYPE[self.device_type] if jit_compile is None else bool(jit_compile)
        # oneDNN's CPU kernels, or Eigen's: they differ in rounding and speed (the
        # package's __init__), and the paths and chunk sizes measured fastest differ too.
        self.onednn = onednn_enabled() if self.device_type == "cpu" else None
        if self.onednn is False and os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1":
            warnings.warn("tensorflow: oneDNN's CPU kernels are off in this process although TF_ENABLE_ONEDNN_OPTS=1 "
                          "(TensorFlow was loaded before normbench.backends.tensorflow set it, or this build has none): "
                          "Eigen's kernels run, slower and in other rounding; import normbench.backends.tensorflow "
                          "before tensorflow, or export TF_ENABLE_ONEDNN_OPTS=1", stacklevel=2)
        self.ops = Ops(self.device_type, onednn=self.onednn)
        if self.device_type == "cpu":
            base.keep_freed_memory()

    def versions(self):
        return {"tensorflow": tf.__version__}

    def device_description(self):
        compiler = "XLA" if self.jit_compile else "graph"
        if self.device_type == "gpu":
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[int(self.device[4:])])
            return f"gpu: {details.get('device_name', self.tf_device)} ({compiler})"
        # 0 (unset): TensorFlow sizes its intra-op pool by the cores this process may run
        # on, which a worker of `--executor processes` is bound to (one of the 2-core
        # machine's), not by every core of the machine.
        threads = tf.config.threading.get_intra_op_parallelism_threads() or provenance.schedulable_cores()
        kernels = {True: "oneDNN", False: "Eigen", None: "unknown"}[self.onednn]
        return f"cpu ({threads} threads, {compiler}, {kernels} kernels)"

    def _place(self, array: np.ndarray, dtype) -> tf.Tensor:
        with tf.device(self.tf_device):
            return tf.identity(tf.convert_to_tensor(array, dtype=dtype))

    def put_images(self, images_nhwc):
        return self._place(np.asarray(images_nhwc), self.tf_dtype)

    def put_labels(self, labels):
        return self._place(np.asarray(labels, dtype=np.int64), tf.int64)

    def import_tree(self, tree):
        # The canonical layouts (HWIO, (in, out), per-channel vectors) are TensorFlow's own.
        return {name: self._place(np.asarray(value), self.tf_dtype) for name, value in tree.items()}

    def export_tree(self, tree):
        return {name: self.to_numpy(value) for name, value in tree.items()}

    def activation_to_numpy(self, x):
        return self.to_numpy(x)

    def to_numpy(self, x):
        return x.numpy() if isinstance(x, (tf.Tensor, tf.Variable)) else np.asarray(x)

    def stack_to_numpy(self, arrays):
        with tf.device(self.tf_device):
            return tf.stack(arrays).numpy()

    def synchronize(self):
        # Calls from Python block until their results exist; queued GPU work from an
        # async eager context is flushed explicitly.
        if self.device_type == "gpu":
            tf.test.experimental.sync_devices()

    def trainer(self, program, params, state, train_images, train_labels, track=()):
        return Trainer(self, program, params, state, train_images, train_labels, track)

    # No vectorized_group: tf.vectorized_map (pfor) requires a convolution's filter to be
    # the same in every member ("Input 'filter' of op 'Conv2D' expected to be loop
    # invariant"), and TensorFlow's CPU kernels do not run the grouped convolution that
    # would batch per-member kernels by hand. Groups of runs are stepped one by one.


class Trainer(base.Trainer):
    # Each call of a traced function costs TensorFlow a fixed ~2 ms (the call, slicing the
    # chunk, a dozen tensors read back), which small networks feel and the caches do not
    # repay: 10,000 test images on the 2-core machine, chunks of 500 / 1000 / 2500 / 5000
    # / 10000 images, cnn3 none 247 / 221 / 213 / 213 / 202 ms, batch norm 310 / 262 / 257 /
    # 234 / 240, standardization loss 210 / 212 / 191 / 183 / 172; mlp3 at 500 / 1000 /
    # 5000 36 / 31 / 18 ms; resnet-small 78 / 81 ms at 500 / 1000 (neutral). So chunks hold
    # up to EVALUATION_CHUNK_BYTES of activations (cnn3: 5000 images, resnet-small: 1347).
    # On a later host under the same name (AVX2, no AVX-512, a 32 MiB L3; the record's
    # header lists the extensions) the large chunks fell off a cliff once a chunk's
    # activations left the last-level cache: cnn3, 10,000 images, chunks of 500 / 750 /
    # 1000 / 1125 / 1500 / 5000, none 422 / 501 / 477 / 522 / 641 / 638 ms, batch norm
    # 475 / 491 / - / 503 / 679 / 675, standardization loss (500 / 1000 / 5000) 470 / 438 /
    # 636; mlp3 still gains from 5000 (23 ms against 36 at 1000). So chunks hold 64 MiB
    # (cnn3: 750 images, mlp3: 5000, the larger networks: 500), clear of that cliff: 22-27%
    # faster there, where the first host would lose 5-15% against 5000 by the numbers above.
    # The cliff was Eigen's: that host runs Eigen's kernels unless asked for oneDNN's (the
    # package's __init__), and with oneDNN's the large chunks win again there (cnn3, 10,000
    # images, chunks of 750 / 5000: none 270 / 228 ms, batch norm 334 / 276, standardization
    # loss 319 / 235). So 512 MiB with oneDNN's kernels, 64 MiB with Eigen's.
    evaluation_chunk_bytes = 512 << 20
    EIGEN_EVALUATION_CHUNK_BYTES = 64 << 20

    def __init__(self, engine, program, params, state, train_images, train_labels, track):
        super().__init__(engine, program, track)
        if engine.onednn is False:
            self.evaluation_chunk_bytes = self.EIGEN_EVALUATION_CHUNK_BYTES
        self.ops = engine.ops
        with tf.device(engine.tf_device):
            self.params = {k: tf.Variable(v, trainable=True) for k, v in engine.import_tree(params).items()}
            self.state = {k: tf.Variable(v, trainable=False) for k, v in engine.import_tree(state).items()}
            self.opt_state = {k: tf.Variable(v, trainable=False)
                              for k, v in program.optimizer.init(self.ops, self.params).items()}
        self.train_images, self.train_labels = train_images, train_labels
        # autograph=False: the neutral code's Python control flow is static by design.
        self._functions = {
            name: tf.function(body, jit_compile=engine.jit_compile, autograph=False)
            for name, body in (("step", self._train_step_fn), ("augmented_step", self._augmented_step_fn),
                               ("gradients", self._gradients_fn), ("evaluation", self._evaluation_fn),
                               ("logits", self._logits_fn))
        }
        self._traced = {}
        self._steps, self._learning_rates = {}, {}  # (batch size, augmented) -> traced step; lr value -> tensor

    def _concrete(self, name, *args):
        """The traced function `name` for these argument shapes and dtypes (traced once).

        One trace per input shape, taken explicitly and called directly: the neutral
        model needs static shapes (its counts are Python ints), the learning rate is a
        tensor so schedules never retrace, and a direct call skips tf.function's dispatch
        (and its "frequent retracing" heuristics, which would misfire when a sweep builds
        one trainer after another from the same code)."""
        key = (name, *(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(a.items())) if isinstance(a, dict)
                       else (tuple(a.shape), a.dtype) for a in args))
        function = self._traced.get(key)
        if function is None:
            with tf.device(self.engine.tf_device):
                function = self._traced[key] = self._functions[name].get_concrete_function(*args)
        return function

    def _call(self, name, *args):
        with tf.device(self.engine.tf_device):
            return self._concrete(name, *args)(*args)

    # ---- compiled bodies (pure functions of the variables' current values)
    @staticmethod
    def _values(variables: dict) -> dict:
        # Reads are ordered before the step's assignments by tf.function's automatic
        # control dependencies, so the update sees one consistent snapshot.
        return {k: v.value() for k, v in variables.items()}

    def _loss_and_gradients(self, params, state, images, labels, masks):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            total, aux = self.program.loss(self.ops, params, state, images, labels, masks or None)
        grads = tape.gradient(total, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return total, aux, grads

    def _train_step_fn(self, indices, learning_rate, masks):
        return self._update(tf.gather(self.train_images, indices), tf.gather(self.train_labels, indices), learning_rate, masks)

    def _augmented_step_fn(self, images, indices, learning_rate, masks):
        # An augmented run's batch comes from the host, already in `indices` order.
        return self._update(images, tf.gather(self.train_labels, indices), learning_rate, masks)

    def _update(self, images, labels, learning_rate, masks):
        params, opt_state = self._values(self.params), self._values(self.opt_state)
        total, aux, grads = self._loss_and_gradients(params, self._values(self.state), images, labels, masks)
        new_params, new_opt_state = self.program.update(self.ops, params, grads, opt_state, learning_rate)
        for group, values in ((self.params, new_params), (self.opt_state, new_opt_state), (self.state, aux["state"])):
            for k, variable in group.items():
                variable.assign(values[k], read_value=False)
        return tf.stack(self.program.step_losses(aux))

    def _gradients_fn(self, images, labels, masks):
        params, state = self._values(self.params), self._values(self.state)
        _, _, grads = self._loss_and_gradients(params, state, images, labels, masks)
        return (self.program.objective_gradients(self.ops, params, grads),
                self.program.inspect(self.ops, params, state, images, labels, masks or None))

    def _evaluation_fn(self, images, labels):
        return self.program.evaluation(self.ops, self._values(self.params), self._values(self.state), images, labels, self.track)

    def _logits_fn(self, images):
        return self.program.forward(self.ops, self._values(self.params), self._values(self.state), images, training=False).logits

    # ---- the Trainer contract
    def _masks(self, dropout_masks) -> dict:
        # A dict of tensors (empty without dropout): a traced function's arguments are tensors.
        if dropout_masks is None:
            return {}
        with tf.device(self.engine.tf_device):
            return {k: tf.constant(v, dtype=self.engine.tf_dtype) for k, v in dropout_masks.items()}

    def step(self, indices, learning_rate, dropout_masks=None, images=None):
        masks = self._masks(dropout_masks)
        batch = None if images is None else self.engine.put_images(images)
        with tf.device(self.engine.tf_device):
            indices = tf.constant(np.asarray(indices, dtype=np.int64))
            lr = self._learning_rates.get(learning_rate)
            if lr is None:
                # Creating an eager tensor costs ~30 us, 3% of an MLP step; a schedule
                # repeats its values, so each is made once (warm-up ramps stay bounded).
                if len(self._learning_rates) >= 256:
                    self._learning_rates.clear()
                lr = self._learning_rates[learning_rate] = tf.constant(learning_rate, dtype=self.engine.tf_dtype)
            key = (len(indices), batch is not None)
            step = self._steps.get(key)
            if step is None:
                step = self._steps[key] = (self._concrete("step", indices, lr, masks) if batch is None else
                                           self._concrete("augmented_step", batch, indices, lr, masks))
        return step(indices, lr, masks) if batch is None else step(batch, indices, lr, masks)

    def export(self):
        return self.engine.export_tree(self.params), self.engine.export_tree(self.state)

    def export_optimizer_state(self):
        return self.engine.export_tree(self.opt_state)

    def load_state(self, params, state, optimizer_state):
        # Assigned into the existing variables, so the traced step functions stay valid.
        dtype = self.engine.tf_dtype.as_numpy_dtype
        for variables, values in ((self.params, params), (self.state, state), (self.opt_state, optimizer_state)):
            if set(values) != set(variables):
                raise ValueError(f"load_state: expected {sorted(variables)}, got {sorted(values)}")
            for k, tensor in self.engine.import_tree({k: np.asarray(v, dtype) for k, v in values.items()}).items():
                variables[k].assign(tensor, read_value=False)

    def gradients(self, images, labels, dropout_masks=None):
        grads, seen = self._call("gradients", images, labels, self._masks(dropout_masks))
        return self.engine.export_tree(grads), self._canonical_intermediates(seen)

    def predict(self, images):
        return self.engine.activation_to_numpy(self._call("logits", images))

    def _evaluate_chunk(self, images, labels):
        return self._chunk_to_numpy(self._call("evaluation", images, labels))
