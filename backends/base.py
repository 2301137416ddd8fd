"""The backend contract: primitives (`Ops`) and an execution engine (`Engine`, `Trainer`).

A backend implements only what differs between frameworks:
- `Ops`: the array primitives the neutral model, objective and optimizers are written in;
- `Engine`: moving data and parameters across the framework edge (layouts, dtypes,
  devices) and compiling/differentiating the neutral functions into a `Trainer`.

Canonical formats at the edge (see normbench.models): images NHWC, conv kernels HWIO,
dense kernels (in, out), activations NHWC, all as NumPy arrays. Each backend converts
once on import/export; inside, it may use whatever layout is natural (PyTorch: NCHW,
height and width stored reversed).

Every backend package has the same files: `ops.py` (class Ops) and `engine.py`
(classes Engine and Trainer), with the same public names.
"""

from __future__ import annotations

import abc
import ctypes
import os
import sys

import numpy as np

from normbench import resources
from normbench.auxiliary_losses import combine_moments
from normbench.plan import Plan


# glibc's malloc serves every block above its mmap threshold (128 KiB, rising to what was
# last freed) with a fresh mmap and returns it on free, so each of a step's large
# temporaries costs page faults and the kernel's zeroing of its pages, every step. Raised
# to glibc's maximum, freed blocks stay in the heap and are reused. It changes no value.
# cnn3 on the 2-core machine, steps alternating in one process, eager PyTorch: 8.6 -> 6.6
# ms without normalization, 12.5 -> 8.7 ms with the standardization loss. Setting a trim
# threshold switches the rising threshold off, and Dask's worker nannies set one
# (MALLOC_TRIM_THRESHOLD_=65536): JAX's step then took 38 ms instead of 17 on one core
# (mnist-cnn). Every engine on a CPU calls this. Left alone where the user set
# MALLOC_MMAP_THRESHOLD_, or where the C library is not glibc.
_MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD)  # keep freed memory at the heap's top too
    except (OSError, AttributeError):
        pass


class BackendUnavailable(RuntimeError):
    """The framework behind a backend is not installed, or the device is absent."""


class Ops(abc.ABC):
    """Primitives on the backend's arrays. `x` is an activation in the backend layout
    (channel axis = the backend's choice; the primitives know where it is).

    Shapes and axes are always *canonical*: an activation of rank 4 is (N, H, W, C)
    whatever the backend stores, so normalization methods written against these
    primitives (`moments` over axes, `reshape` to group channels) mean the same thing in
    every backend. Methods that are compositions of others have a default here; a backend
    overrides one only with something faster that computes the same formula (the parity
    tests hold it to it)."""

    @abc.abstractmethod
    def ndim(self, x) -> int: ...
    @abc.abstractmethod
    def shape(self, x) -> tuple[int, ...]:
        """The canonical shape, as Python ints."""
    @abc.abstractmethod
    def reshape(self, x, shape: tuple[int, ...]):
        """Reshape in canonical (row-major NHWC) order: (N, H, W, C) -> (N, H, W, G, C // G)
        groups channels in every backend."""
    @abc.abstractmethod
    def moments(self, x, axes: tuple[int, ...], keepdims: bool = False):
        """(mean, biased variance) over canonical `axes`, two-pass (never E[x^2] - E[x]^2).
        With keepdims the results broadcast against `x` in arithmetic."""
    @abc.abstractmethod
    def mean(self, x, axes: tuple[int, ...], keepdims: bool = False):
        """Mean over canonical `axes`."""

    def rsqrt(self, x):
        return 1.0 / self.sqrt(x)
    @abc.abstractmethod
    def conv2d(self, x, kernel, stride: int, pads: tuple[tuple[int, int], tuple[int, int]], groups: int = 1):
        """Cross-correlation with explicit ((top, bottom), (left, right)) zero padding, no
        bias. With `groups` > 1 the input channels split into `groups` consecutive blocks,
        each convolved with its own block of output channels: the canonical kernel is
        (kh, kw, C_in / groups, C_out), output channel o sees input block o // (C_out /
        groups). groups = C_in is a depthwise convolution."""
    @abc.abstractmethod
    def dense(self, x, kernel):
        """x @ kernel for x of shape (batch, in)."""

    def conv2d_bias(self, x, kernel, bias, stride: int, pads, groups: int = 1):
        """`conv2d`, then `add_channel_bias` with `bias` (None: no bias). A backend may add
        the bias inside its convolution (PyTorch's F.conv2d does, saving a pass over the
        output and its gradient); the parity tests hold it to this composition."""
        z = self.conv2d(x, kernel, stride, pads, groups)
        return z if bias is None else self.add_channel_bias(z, bias)

    def dense_bias(self, x, kernel, bias):
        """`dense`, then `add_channel_bias` with `bias` (None: no bias); fusable as `conv2d_bias`."""
        z = self.dense(x, kernel)
        return z if bias is None else self.add_channel_bias(z, bias)
    @abc.abstractmethod
    def flatten(self, x):
        """(batch, ...) -> (batch, features), features ordered as canonical (h, w, c)."""
    # ---- pooling, merging and activations: the architecture vocabulary's primitives.
    # Windows and pads are canonical (height, width); pads are explicit ((top, bottom),
    # (left, right)), computed once by the architecture (TensorFlow's SAME rule).
    @abc.abstractmethod
    def max_pool2d(self, x, window: tuple[int, int], stride: int, pads):
        """Maximum over each window; padding never wins (it is -inf). Where a window's
        maximum is tied, the gradient goes to its first position in row-major order, as
        PyTorch's, XLA's and TensorFlow's max pooling all do."""
    @abc.abstractmethod
    def avg_pool2d(self, x, window: tuple[int, int], stride: int, pads):
        """Mean over each window's positions inside the input: padding is not counted
        (TensorFlow's SAME average pooling, PyTorch's count_include_pad=False)."""
    @abc.abstractmethod
    def max(self, x, axes: tuple[int, ...], keepdims: bool = False):
        """Maximum over canonical `axes` (global max pooling, over points too). The gradient
        is split evenly between tied maxima, as every framework's reduce-max does."""

    def add(self, a, b):
        """a + b of two activations of one shape (residual connections)."""
        return a + b
    @abc.abstractmethod
    def concat_channels(self, xs: list):
        """Activations of one batch and spatial shape joined along the channel axis, in order."""
    @abc.abstractmethod
    def relu6(self, x):
        """min(max(x, 0), 6); its gradient is 0 at exactly 0 and at exactly 6 (every framework's)."""
    @abc.abstractmethod
    def add_channel_bias(self, x, bias): ...
    @abc.abstractmethod
    def scale_channels(self, x, scale): ...
    @abc.abstractmethod
    def normalize(self, x, mean, var, epsilon: float):
        """(x - mean) / sqrt(var + epsilon), per channel."""
    def batch_norm_infer(self, x, mean, var, scale, shift, epsilon: float):
        """Inference-mode batch norm with given (running) statistics: (x - mean) /
        sqrt(var + epsilon) * scale + shift per channel; `scale` and `shift` may be None.
        Composed here; a backend may use its fused kernel (PyTorch does); the parity
        tests hold it to this formula."""
        y = self.normalize(x, mean, var, epsilon)
        if scale is not None:
            y = self.scale_channels(y, scale)
        return y if shift is None else self.add_channel_bias(y, shift)

    def batch_norm_train(self, x, scale, shift, epsilon: float):
        """Training-mode batch norm. Returns (y, mean, var): y = (x - mean) / sqrt(var +
        epsilon) * scale + shift with the batch's per-channel mean and *biased* variance,
        gradients flowing through both; and those mean and var as constants (no
        gradient), for the running averages. `scale` and `shift` may be None.

        Composed from `moments` here; a backend may use its fused kernel and reuse the
        statistics it computed (PyTorch does); the parity tests hold it to this formula."""
        axes = tuple(range(self.ndim(x) - 1))
        mean, var = self.moments(x, axes, keepdims=True)
        y = (x - mean) * self.rsqrt(var + epsilon)
        if scale is not None:
            y = self.scale_channels(y, scale)
        if shift is not None:
            y = self.add_channel_bias(y, shift)
        channels = self.shape(x)[-1]
        flat = lambda v: self.stop_gradient(self.reshape(v, (channels,)))
        return y, flat(mean), flat(var)

    def group_normalize(self, x, groups: int, epsilon: float, scale=None, shift=None):
        """(x - mean) / sqrt(var + epsilon) * scale + shift, with the mean and biased
        variance of each example's `groups` groups of consecutive channels, each over its
        channels and every position (groups = 1: layer norm; groups = channels: instance
        norm), and a per-channel `scale` and `shift` (None: none). Composed from `moments`
        here; a backend may use its fused group norm (PyTorch's F.group_norm); the parity
        tests hold it to this formula."""
        shape = self.shape(x)
        channels, rank = shape[-1], len(shape)
        if groups == 1:  # every unit of the example
            axes, grouped = tuple(range(1, rank)), x
        elif groups == channels:  # every position of each channel
            axes, grouped = tuple(range(1, rank - 1)), x
        else:  # (..., C) -> (..., G, C / G): positions and the channels within a group
            grouped = self.reshape(x, (*shape[:-1], groups, channels // groups))
            axes = (*range(1, rank - 1), rank)
        mean, var = self.moments(grouped, axes, keepdims=True)
        standardized = (grouped - mean) * self.rsqrt(var + epsilon)
        y = standardized if grouped is x else self.reshape(standardized, shape)
        if scale is not None:
            y = self.scale_channels(y, scale)
        return y if shift is None else self.add_channel_bias(y, shift)

    def moving_average(self, running, value, decay: float):
        """decay * running + (1 - decay) * value (batch norm's running statistics).
        A backend may use a fused interpolation (PyTorch's lerp): same value, fewer ops."""
        return running * decay + value * (1.0 - decay)
    def channel_moments(self, x):
        """Per-channel (mean, biased variance) over every axis but the channel axis,
        with a numerically stable algorithm (two-pass or Welford, never E[x^2] - E[x]^2).

        A backend that writes the gradient out must keep the term of the mean that centres
        the variance, d var / d mean = -2 mean(x - mean), although it is 0 in exact
        arithmetic. Through it the input gradient's sum over the batch, which a bias before
        the slot receives, cancels as it should: the variance's part of that sum is
        (2 g_var / n) sum(x - mean), rounding residue times g_var, and the standardization
        loss's g_var = 0.5 (1 - 1 / (var + eps)) is huge for a channel whose spread is tiny
        beside its mean. Without the term, on 16 x 128 float32 values with means ~1.9 and
        spreads 3e-5 to 3e-3, that sum was off by 4x its own size (float64 computed from the
        same float32 inputs: 8e-9); with it, 2e-5 to 7e-5 (a PointNet whose layer-normed fc1 units
        collapsed across the batch: torch and tensorflow 100% off in fc1's shift gradient,
        JAX, which differentiates the composition, 5e-5)."""
        return self.moments(x, tuple(range(self.ndim(x) - 1)))

    def standard_normal_kl(self, mean, var, log_epsilon: float):
        """KL(N(mean, diag var) || N(0, I)) of per-channel moments, the paper's equation (2)
        for one layer: 0.5 * sum(mean^2 + var - log(var + log_epsilon) - 1). `log_epsilon`
        keeps the log finite for a channel whose variance is exactly 0 (a dead input)."""
        return 0.5 * self.sum(mean * mean + var - self.log(var + log_epsilon) - 1.0)

    def standardization_loss(self, taps: list, log_epsilon: float):
        """`standard_normal_kl` of each tap's `channel_moments`, summed over the taps in
        their order (the standardization loss of a whole network). Composed here; PyTorch
        fuses it into one autograd Function with the gradient written out, because its
        eager dispatch of this composition's ~30 small ops per layer cost more than the
        arithmetic."""
        total = 0.0
        for x in taps:
            mean, var = self.channel_moments(x)
            total = total + self.standard_normal_kl(mean, var, log_epsilon)
        return total
    @abc.abstractmethod
    def reduced_count(self, x) -> int:
        """Number of values behind each channel's moments (batch x spatial positions)."""
    @abc.abstractmethod
    def relu(self, x): ...
    @abc.abstractmethod
    def log(self, x): ...
    @abc.abstractmethod
    def sqrt(self, x): ...
    @abc.abstractmethod
    def sum(self, x):
        """Sum of all elements (a scalar)."""
    @abc.abstractmethod
    def zeros_like(self, x): ...
    @abc.abstractmethod
    def stop_gradient(self, x): ...
    @abc.abstractmethod
    def softmax_cross_entropy(self, logits, labels):
        """Mean over the batch of -log softmax(logits)[label]."""
    @abc.abstractmethod
    def correct_count(self, logits, labels):
        """Number of rows whose argmax equals the label."""
    @abc.abstractmethod
    def clip(self, x, low, high):
        """min(max(x, low), high) elementwise. `low` and `high` are Python numbers, 0-d or
        one-element arrays (computed inside a compiled step, such as batch renorm's ramped
        r_max) or arrays of x's shape; per-channel bounds on an activation are not supported (the
        backend layout would decide how they broadcast). Exact: no composition that rounds."""

    # ---- kernels: the weight methods' primitives. A kernel is in the backend's own layout
    # (PyTorch conv kernels are OIHW; dense kernels are (in, out) everywhere); these know
    # where its output-channel axis is. The defaults hold for kernels stored canonically
    # (HWIO, (in, out): output channel last); a backend storing them otherwise overrides.
    def kernel_mean(self, kernel):
        """Per-output-channel mean of `kernel` over all its other axes, with kept
        dimensions: the result broadcasts against the kernel in arithmetic."""
        return self.mean(kernel, tuple(range(self.ndim(kernel) - 1)), keepdims=True)

    def kernel_moments(self, kernel):
        """Per-output-channel (mean, biased variance) of `kernel` over all its other axes,
        two-pass, with kept dimensions (both broadcast against the kernel)."""
        mean = self.kernel_mean(kernel)
        centered = kernel - mean
        return mean, self.kernel_mean(centered * centered)

    def kernel_count(self, kernel) -> int:
        """Values per output channel of `kernel` (kh * kw * in, or in): what `kernel_mean` divides by."""
        shape = self.shape(kernel)
        return int(np.prod(shape)) // shape[-1]

    def output_channels(self, vector, kernel):
        """A per-output-channel vector (shape (out,)) shaped to broadcast against `kernel`."""
        return vector

    # ---- small dense linear algebra (the decorrelation loss). Operands have rank 2 or 3
    # (a leading batch axis), which every backend stores in canonical order.
    @abc.abstractmethod
    def matmul(self, a, b, transpose_a: bool = False, transpose_b: bool = False):
        """a @ b over the last two axes (leading axes batched); `transpose_a` and
        `transpose_b` swap the last two axes of that operand first."""

    @abc.abstractmethod
    def matrix_transpose(self, matrix):
        """`matrix` with its last two axes swapped (leading axes batched)."""

    @abc.abstractmethod
    def add_to_diagonal(self, matrix, value: float):
        """matrix + value * I over the last two axes (leading axes batched); square matrices."""

    @abc.abstractmethod
    def log_det_gram(self, values, diagonal_shift: float = 0.0):
        """log det(V^T V + diagonal_shift * I) for V = values (n, k), leading axes batched:
        2 * sum(log |diag R|) with R the triangular factor of a Householder QR factorization
        of V stacked over sqrt(diagonal_shift) * I (R^T R is that matrix); differentiable
        through the factorization (d/dV = 2 V (V^T V + shift I)^-1).

        V^T V is never formed: in float32 its rounding, about 6e-8 * ||V^T V||, swamps a small
        shift in the directions where V^T V is singular (more channels than values per
        output, or than examples), while QR's backward error stays at the rounding of V.
        On cnn3's conv1 after batch norm (32 channels of rank 25, ||V^T V|| ~ 10, shift
        1e-5, 20 MNIST images), a float32 Cholesky of the product was off float64 by 4e-5
        to 1.5e-3 of log det and 5e-2 of the kernel's gradient, the QR by at most 4e-7 and
        1e-4; and once that rounding exceeds the shift, the rounded product need not be
        positive definite at all, and a Cholesky of it fails."""


def valid_counts(size: tuple[int, int], window: tuple[int, int], stride: int, pads) -> np.ndarray:
    """(out_h, out_w) float64: how many of each window's positions lie inside an input of
    spatial `size` (the divisor of `avg_pool2d`)."""
    per_axis = []
    for n, k, (low, high) in zip(size, window, pads):
        starts = np.arange(0, n + low + high - k + 1, stride) - low
        per_axis.append(np.minimum(starts + k, n) - np.maximum(starts, 0))
    return np.outer(per_axis[0], per_axis[1]).astype(np.float64)


class Engine(abc.ABC):
    """One framework on one device in one dtype."""

    name: str = ""
    framework: str = ""  # import name of the framework, for availability checks

    # Whether the training step and the evaluation run compiled (traced once, then executed
    # as a graph): JAX and TensorFlow always; PyTorch when asked (`compile`), eager otherwise.
    compiled_step: bool = True

    def __init__(self, device: str | None = None, dtype: str = "float32", compile: bool = False):  # noqa: A002
        """`compile`: compile the training step and the evaluation where the framework would
        otherwise run them eagerly (PyTorch); the frameworks that always compile ignore it."""
        self.dtype = dtype
        self.device = device

    # ---- description, for provenance
    @abc.abstractmethod
    def versions(self) -> dict[str, str]: ...
    @abc.abstractmethod
    def device_description(self) -> str: ...

    # ---- the edge
    @abc.abstractmethod
    def put_images(self, images_nhwc: np.ndarray): ...
    @abc.abstractmethod
    def put_labels(self, labels: np.ndarray): ...
    @abc.abstractmethod
    def import_tree(self, tree: dict[str, np.ndarray]) -> dict:
        """Canonical parameters or state -> backend arrays (layout, dtype, device)."""
    @abc.abstractmethod
    def export_tree(self, tree: dict) -> dict[str, np.ndarray]:
        """Backend arrays -> canonical NumPy arrays."""
    @abc.abstractmethod
    def activation_to_numpy(self, x) -> np.ndarray:
        """A backend activation -> canonical-layout NumPy (NHWC or (batch, features))."""
    @abc.abstractmethod
    def to_numpy(self, x) -> np.ndarray:
        """A layout-free array (scalar, per-channel vector) -> NumPy."""
    @abc.abstractmethod
    def stack_to_numpy(self, arrays: list) -> np.ndarray:
        """Equal-shaped backend arrays -> one NumPy array, stacked on a new first axis
        on the device and read back in a single transfer."""
    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block until queued device work is done (for honest timers)."""

    @abc.abstractmethod
    def trainer(self, program: Plan, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                train_images, train_labels, track: tuple[str, ...] = ()) -> "Trainer": ...

    def vectorized_group(self, program: Plan, members: list[tuple[dict, dict]], train_images, train_labels,
                         track: tuple[str, ...] = ()) -> "VectorizedGroup | None":
        """Runs of `program` from the initial (params, state) of each member, trained by
        one batched step (`VectorizedGroup`); None where this backend cannot batch them
        (the runner then steps them one by one, `LoopedGroup`)."""
        return None

    def fastest_group_size(self) -> int:
        """How many runs of one variant a sweep trains together by default on this
        engine's device: the fastest measured (see each backend), 1 where vectorizing
        does not pay."""
        return 1


class Trainer(abc.ABC):
    """Holds one run's parameters, optimizer state and BN state inside the framework."""

    def __init__(self, engine: Engine, program: Plan, track: tuple[str, ...]):
        self.engine, self.program, self.track = engine, program, track

    @abc.abstractmethod
    def step(self, indices: np.ndarray, learning_rate: float, dropout_masks: dict[str, np.ndarray] | None = None,
             images: np.ndarray | None = None):
        """One update on the training examples `indices` (with this step's
        `program.dropout_masks`, required when the network has dropout). `images`, for a
        program that augments (`program.augmented_batch`), is the batch's augmented images
        (canonical NumPy, in `indices` order), used instead of the placed ones; the labels
        still come from `indices`. Returns the batch's losses,
        `program.step_loss_names` in order, as one backend array that is *not* read back:
        `loss` is `program.loss` (cross entropy + weighted auxiliary losses; the L2 term
        acts through its gradient and is not included).

        Reading a device value back every step forces a host-device sync per step (on
        CPU ~4% of an MLP step, far more on a GPU); callers collect the arrays and read
        many steps at once with `read_losses`."""

    def read_losses(self, step_losses: list) -> np.ndarray:
        """Arrays returned by `step` -> float NumPy of shape (steps, losses), in one transfer."""
        return self.engine.stack_to_numpy(step_losses).reshape(len(step_losses), len(self.program.step_loss_names))

    def step_and_read(self, indices: np.ndarray, learning_rate: float, dropout_masks=None, images=None) -> dict[str, float]:
        """`step`, then its losses as Python floats (a sync per step: for tests and tools)."""
        values = self.read_losses([self.step(indices, learning_rate, dropout_masks, images)])[0]
        return {name: float(v) for name, v in zip(self.program.step_loss_names, values)}

    @abc.abstractmethod
    def export(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Current (params, running-statistics state), canonical NumPy."""

    @abc.abstractmethod
    def export_optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's slots (`program.optimizer.init`'s keys), canonical NumPy."""

    @abc.abstractmethod
    def load_state(self, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                   optimizer_state: dict[str, np.ndarray]) -> None:
        """Replace everything the run carries (parameters, running statistics, optimizer
        slots) with canonical arrays, converted to this trainer's dtype and layout. For
        parity's lockstep re-runs, which restart one side from the other's state."""

    @abc.abstractmethod
    def gradients(self, images, labels, dropout_masks=None) -> tuple[dict, dict]:
        """(canonical gradients of the full objective, L2 included; canonical training-mode intermediates)
        on one batch (with these dropout masks, where the network has dropout), without
        updating anything. For parity tests."""

    @abc.abstractmethod
    def predict(self, images) -> np.ndarray:
        """Inference-mode logits of placed `images`, canonical NumPy: `evaluate`'s forward
        pass without its metrics, compiled where the framework compiles (bench_inference)."""

    def _canonical_intermediates(self, seen: dict) -> dict[str, np.ndarray]:
        """`program.inspect` output as flat canonical NumPy, for `gradients`."""
        e = self.engine
        return {
            "total_loss": e.to_numpy(seen["total_loss"]), "cross_entropy": e.to_numpy(seen["cross_entropy"]),
            **{name: e.to_numpy(v) for name, v in seen["losses"].items()},
            "logits": e.activation_to_numpy(seen["logits"]),
            **{f"preactivation/{k}": e.activation_to_numpy(v) for k, v in seen["preactivations"].items()},
            **{f"mean/{k}": e.to_numpy(m) for k, (m, _) in seen["moments"].items()},
            **{f"var/{k}": e.to_numpy(v) for k, (_, v) in seen["moments"].items()},
            **{f"state/{k}": e.to_numpy(v) for k, v in seen["state"].items()},
        }

    def _chunk_to_numpy(self, out: dict) -> dict:
        return chunk_to_numpy(self.engine, out)

    @abc.abstractmethod
    def _evaluate_chunk(self, images, labels) -> dict:
        """`program.evaluation` on one chunk, converted to NumPy (tracked activations in
        the canonical layout)."""

    # Images per evaluated chunk, the fastest measured for the backend: evaluating 10,000
    # test images on cnn3 on the 2-core machine (seconds at chunks of 100 / 250 / 500 /
    # 1000 / 2000; none, standardization loss, batch norm alike): PyTorch 0.24 / 0.20 /
    # 0.17 / 0.36 / 0.47; larger chunks stop fitting the CPU caches. JAX's and
    # TensorFlow's are in their engines.
    evaluation_chunk_size = 500
    # Where set, chunks grow past evaluation_chunk_size to hold about this many bytes of
    # activations (`resources.evaluation_chunk`): for a backend whose fixed cost per call
    # outweighs the caches, and only for a run evaluated alone (a vectorized group's
    # chunks are `RunGroup.evaluation_chunk_size`).
    evaluation_chunk_bytes: int | None = None

    def default_chunk_size(self) -> int:
        """Images per evaluated chunk when `evaluate` is given none."""
        return resources.evaluation_chunk(self.program.arch, self.engine.dtype, self.evaluation_chunk_size,
                                          self.evaluation_chunk_bytes)

    def evaluate(self, images, labels, num_examples: int, chunk_size: int | None = None) -> dict:
        """Inference-mode metrics over a whole split, aggregated exactly across chunks of
        `chunk_size` images (default: `default_chunk_size`)."""
        chunk_size = chunk_size or self.default_chunk_size()
        chunks = [(stop - start, self._evaluate_chunk(images[start:stop], labels[start:stop]))
                  for start, stop in _chunk_bounds(num_examples, chunk_size)]
        return aggregate_evaluation(self.program, self.track, chunks, num_examples)


def chunk_to_numpy(engine: Engine, out: dict) -> dict:
    """`program.evaluation`'s output (already on the host for frameworks that transfer
    whole trees) -> NumPy, tracked activations in the canonical layout."""
    return {
        "cross_entropy_mean": float(engine.to_numpy(out["cross_entropy_mean"])),
        "correct": int(engine.to_numpy(out["correct"])),
        "moments": {k: (engine.to_numpy(m), engine.to_numpy(v)) for k, (m, v) in out["moments"].items()},
        "auxiliary": {loss: {k: tuple(engine.to_numpy(a) for a in stats) for k, stats in layers.items()}
                      for loss, layers in out["auxiliary"].items()},
        "tracked": {k: engine.activation_to_numpy(v) for k, v in out["tracked"].items()},
    }


def _chunk_bounds(num_examples: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_examples)) for start in range(0, num_examples, chunk_size)]


def aggregate_evaluation(program: Plan, track: tuple[str, ...], chunks: list[tuple[int, dict]], num_examples: int) -> dict:
    """One split's metrics from its chunks' `Trainer._chunk_to_numpy` outputs, given as
    (examples in the chunk, output): exact means, moments combined across chunks."""
    ce_sum, correct, parts, tracked = 0.0, 0, {}, {name: [] for name in track}
    auxiliary: dict[str, dict[str, list]] = {}
    for n, out in chunks:
        counts = program.values_per_channel(n)
        ce_sum += float(out["cross_entropy_mean"]) * n
        correct += int(out["correct"])
        for layer, (mean, var) in out["moments"].items():
            parts.setdefault(layer, []).append((mean, var, counts[layer]))
        for loss, layers in out["auxiliary"].items():
            for layer, statistics in layers.items():
                auxiliary.setdefault(loss, {}).setdefault(layer, []).append((statistics, counts[layer]))
        for layer, values in out["tracked"].items():
            tracked[layer].append(values)
    losses = {loss.name: loss for loss in program.losses}
    return {
        "cross_entropy": ce_sum / num_examples,
        "accuracy": correct / num_examples,
        "moments": {layer: combine_moments(p) for layer, p in parts.items()},
        "auxiliary": {name: {layer: losses[name].combine(p) for layer, p in layers.items()}
                      for name, layers in auxiliary.items()},
        "tracked": {layer: np.concatenate(v) for layer, v in tracked.items()},
    }


# ----------------------------------------------------------------------------- groups of runs


class RunGroup(abc.ABC):
    """Runs of one plan trained side by side (the seeds of a variant): member k has its
    own parameters, running statistics, optimizer slots, batches and dropout masks, and
    nothing of one member reaches another. Every method takes or returns all members at
    once, in member order."""

    def __init__(self, engine: Engine, program: Plan, size: int, track: tuple[str, ...]):
        self.engine, self.program, self.size, self.track = engine, program, size, track

    @abc.abstractmethod
    def step(self, indices: np.ndarray, learning_rate: float, dropout_masks: list[dict] | None = None,
             images: list[np.ndarray] | None = None):
        """One update of every member: `indices` is (members, batch), member k's batch in
        row k; `dropout_masks` one dict per member, or None; `images` one augmented batch
        per member, or None (`Trainer.step`). Returns the losses, not read back
        (`Trainer.step`); `read_losses` reads a list of them."""

    @abc.abstractmethod
    def read_losses(self, step_losses: list) -> np.ndarray:
        """What `step` returned, for several steps -> float NumPy (steps, members, losses), in one transfer."""

    @abc.abstractmethod
    def export(self, member: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Member's current (params, running-statistics state), canonical NumPy."""

    @abc.abstractmethod
    def evaluate(self, images, labels, num_examples: int) -> list[dict]:
        """`Trainer.evaluate` of every member on one split."""


class LoopedGroup(RunGroup):
    """Members as separate trainers stepped one after the other: exactly the runs alone.
    Every backend has it; a backend that vectorizes (`Engine.vectorized_group`) is held to it."""

    def __init__(self, trainers: list):
        first = trainers[0]
        super().__init__(getattr(first, "engine", None), getattr(first, "program", None), len(trainers),
                         getattr(first, "track", ()))
        self.trainers = trainers

    def step(self, indices, learning_rate, dropout_masks=None, images=None):
        masks = dropout_masks or [None] * self.size
        batches = images or [None] * self.size
        return [t.step(i, learning_rate, m, x) for t, i, m, x in zip(self.trainers, indices, masks, batches)]

    def read_losses(self, step_losses):
        per_member = [t.read_losses([losses[k] for losses in step_losses]) for k, t in enumerate(self.trainers)]
        return np.stack(per_member, axis=1)

    def export(self, member):
        return self.trainers[member].export()

    def evaluate(self, images, labels, num_examples):
        return [t.evaluate(images, labels, num_examples) for t in self.trainers]


class VectorizedGroup(RunGroup):
    """Members stacked on a new leading axis of every parameter, state and slot array and
    trained by one batched (vmapped) step. A backend subclass supplies the step and each
    member's evaluation of a chunk, and keeps the stacked trees in `params` and `state`;
    reading members out, chunking and aggregating evaluations are shared here. Each
    member's trajectory equals its run alone within the float32 trajectory tolerances of
    the parity tests (tests/test_vectorized_runs.py)."""

    evaluation_chunk_size = 500
    params: dict
    state: dict

    def read_losses(self, step_losses):
        return self.engine.stack_to_numpy(step_losses)  # each step's (members, losses)

    def export(self, member):
        return (self.engine.export_tree(member_of(self.params, member)),
                self.engine.export_tree(member_of(self.state, member)))

    def _per_member(self, tree) -> list:
        """A tree with the members on its first axis -> each member's tree, in member order."""
        return [member_of(tree, member) for member in range(self.size)]

    @abc.abstractmethod
    def _evaluate_members(self, images, labels) -> list:
        """`program.evaluation` of every member on one chunk of shared images: each
        member's output tree, in member order (on the host already, for frameworks that
        transfer whole trees), from one batched evaluation (`_per_member` splits it) or from
        each member's own."""

    def evaluate(self, images, labels, num_examples):
        per_member: list[list] = [[] for _ in range(self.size)]
        for start, stop in _chunk_bounds(num_examples, self.evaluation_chunk_size):
            for member, out in enumerate(self._evaluate_members(images[start:stop], labels[start:stop])):
                per_member[member].append((stop - start, chunk_to_numpy(self.engine, out)))
        return [aggregate_evaluation(self.program, self.track, chunks, num_examples) for chunks in per_member]


def member_of(tree, member: int):
    """Member `member`'s part of a tree (dicts, tuples, lists) of arrays stacked on a first axis."""
    if isinstance(tree, dict):
        return {k: member_of(v, member) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(member_of(v, member) for v in tree)
    return tree[member]
