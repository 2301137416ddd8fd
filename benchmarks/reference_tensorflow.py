"""A minimal hand-written TensorFlow training step of the paper's MNIST models.

It is the yardstick for normbench's TensorFlow backend: the speed ratio
"normbench step time / hand-written step time" (target <= 1.10) measures what the
framework-neutral formulation costs. Both sides do the same work per step: gather a
batch from a training set already on the device, a forward pass in training mode,
cross entropy + L2 weight decay (+ the standardization loss), gradients, plain SGD, and
the batch-norm running statistics. The reference is written the way a TensorFlow user
would write it (tf.Variables, one tf.function, GradientTape, tf.nn.moments and
tf.nn.batch_normalization) and shares no code with normbench.

    python benchmarks/reference_tensorflow.py            # ratios for every model x variant
    python benchmarks/reference_tensorflow.py --help
"""

from __future__ import annotations

import importlib.util
import os
import time

# torch must be loaded before TensorFlow when both end up in one process.
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# ---- hyperparameters of the paper's MNIST runs (normbench/specs/mnist-*.toml)
LEARNING_RATE = 1e-3  # plain SGD
WEIGHT_DECAY = 4e-5  # L2 on kernels only, applied as its gradient WEIGHT_DECAY * kernel (the cheaper form)
BN_DECAY = 0.99  # running = BN_DECAY * running + (1 - BN_DECAY) * batch statistic
BN_EPSILON = 1e-3  # added to the variance before the square root
LOG_EPSILON = 1e-8  # log(var + LOG_EPSILON) in the standardization loss
STD_LOSS_WEIGHT = 1.0
TRAIN_EXAMPLES = 60000  # synthetic MNIST-shaped training set (speed does not depend on the pixels)
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

# cnn3: 5x5 convolutions with stride 2, TensorFlow SAME padding written out for 28x28 inputs:
# (name, kernel shape HWIO, stride, (low, high) padding of both spatial axes).
CNN_LAYERS = (
    ("conv1", (5, 5, 1, 32), 2, (1, 2)),  # 28 -> 14
    ("conv2", (5, 5, 32, 16), 2, (1, 2)),  # 14 -> 7
    ("conv3", (5, 5, 16, 8), 2, (2, 2)),  # 7 -> 4
)
MLP_UNITS = (100, 100, 100)
NORMALIZATIONS = ("none", "batch_norm_shift", "batch_norm_scale_shift", "standardization_loss")
MODELS = ("cnn3", "mlp3")


def _tf_device(device: str | None) -> str:
    kind, _, index = (device or "cpu").lower().partition(":")
    if kind == "cpu":
        return "/CPU:0"
    if kind in ("gpu", "cuda"):
        return f"/GPU:{int(index or 0)}"
    raise ValueError(f"unknown device {device!r}")


def _glorot(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    limit = np.sqrt(6.0 / ((shape[-2] + shape[-1]) * receptive))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def make_reference_step(model: str, normalization: str, batch_size: int = 128, device=None, *,
                        jit_compile: bool = False, seed: int = 0):
    """Build one hand-written training run. Returns (step(i) -> None, synchronize() -> None):
    `step(i)` performs SGD update number i on its batch; `synchronize()` blocks until
    queued device work is done."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    batch_norm = normalization.startswith("batch_norm")
    with_scale = normalization == "batch_norm_scale_shift"
    with_std_loss = normalization == "standardization_loss"
    convolutional = model == "cnn3"
    tf_device = _tf_device(device)
    rng = np.random.default_rng(seed)

    if convolutional:
        hidden = list(CNN_LAYERS)
        head_in = 4 * 4 * CNN_LAYERS[-1][1][-1]
    else:
        sizes = (int(np.prod(IMAGE_SHAPE)), *MLP_UNITS)
        hidden = [(f"dense{i + 1}", (sizes[i], sizes[i + 1]), None, None) for i in range(len(MLP_UNITS))]
        head_in = MLP_UNITS[-1]

    with tf.device(tf_device):
        images = tf.constant(rng.random((TRAIN_EXAMPLES, *IMAGE_SHAPE), dtype=np.float32))
        labels = tf.constant(rng.integers(0, NUM_CLASSES, TRAIN_EXAMPLES))
        kernels = [tf.Variable(_glorot(rng, shape), name=name) for name, shape, _, _ in hidden]
        head_kernel = tf.Variable(_glorot(rng, (head_in, NUM_CLASSES)), name="logits_kernel")
        head_bias = tf.Variable(tf.zeros(NUM_CLASSES), name="logits_bias")
        channels = [shape[-1] for _, shape, _, _ in hidden]
        # Biases, or with batch norm the shifts (a bias before it would be cancelled by the mean subtraction).
        offsets = [tf.Variable(tf.zeros(c)) for c in channels]
        scales = [tf.Variable(tf.ones(c)) for c in channels] if with_scale else [None] * len(channels)
        if batch_norm:
            running_means = [tf.Variable(tf.zeros(c), trainable=False) for c in channels]
            running_vars = [tf.Variable(tf.ones(c), trainable=False) for c in channels]
    trainable = [*kernels, *offsets, *(s for s in scales if s is not None), head_kernel, head_bias]
    decayed = [*kernels, head_kernel]

    def forward(x):
        moments = []  # (mean, variance) of each hidden layer's pre-activation
        for i, (_, _, stride, pad) in enumerate(hidden):
            if convolutional:
                z = tf.nn.conv2d(x, kernels[i], strides=stride, padding=[[0, 0], list(pad), list(pad), [0, 0]])
            else:
                z = tf.matmul(x, kernels[i])
            axes = [0, 1, 2] if convolutional else [0]
            if batch_norm:
                mean, variance = tf.nn.moments(z, axes)
                moments.append((mean, variance))
                z = tf.nn.batch_normalization(z, mean, variance, offsets[i], scales[i], BN_EPSILON)
            else:
                z = tf.nn.bias_add(z, offsets[i])
                if with_std_loss:
                    moments.append(tf.nn.moments(z, axes))
            x = tf.nn.relu(z)
        x = tf.reshape(x, [-1, head_in])
        return tf.nn.bias_add(tf.matmul(x, head_kernel), head_bias), moments

    def train_step(indices):
        x = tf.gather(images, indices)
        if not convolutional:
            x = tf.reshape(x, [batch_size, -1])
        y = tf.gather(labels, indices)
        with tf.GradientTape() as tape:
            logits, moments = forward(x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            if with_std_loss:
                loss += STD_LOSS_WEIGHT * tf.add_n([
                    0.5 * tf.reduce_sum(tf.square(m) + v - tf.math.log(v + LOG_EPSILON) - 1.0) for m, v in moments])
        grads = tape.gradient(loss, trainable)
        for variable, grad in zip(trainable, grads):
            if any(variable is k for k in decayed):
                grad = grad + WEIGHT_DECAY * variable
            variable.assign_sub(LEARNING_RATE * grad)
        if batch_norm:
            for (mean, variance), running_mean, running_var in zip(moments, running_means, running_vars):
                running_mean.assign(BN_DECAY * running_mean + (1.0 - BN_DECAY) * mean)
                running_var.assign(BN_DECAY * running_var + (1.0 - BN_DECAY) * variance)

    batches_per_epoch = TRAIN_EXAMPLES // batch_size
    order = rng.permutation(TRAIN_EXAMPLES)[: batches_per_epoch * batch_size].reshape(batches_per_epoch, batch_size)
    compiled = []

    def step(i: int) -> None:
        with tf.device(tf_device):
            if not compiled:
                # Traced on the first call and then called directly: the fastest dispatch
                # TensorFlow offers (and no "frequent retracing" warning when a benchmark
                # builds many references in one process).
                compiled.append(tf.function(train_step, jit_compile=jit_compile).get_concrete_function(
                    tf.TensorSpec([batch_size], tf.int64)))
            compiled[0](tf.constant(order[i % batches_per_epoch]))

    def synchronize() -> None:
        if tf_device.startswith("/GPU"):
            tf.test.experimental.sync_devices()

    return step, synchronize


# ----------------------------------------------------------------------------- side-by-side timing


def _normbench_step(model: str, normalization: str, batch_size: int, device, jit_compile: bool):
    """The same run through normbench's TensorFlow backend, as the runner drives it."""
    from normbench import spec as specs
    from normbench.backends.tensorflow.engine import Engine
    from normbench.data_order import BatchOrder, seed_streams
    from normbench.program import TrainingProgram

    base = specs.load("mnist-cnn" if model == "cnn3" else "mnist-mlp")
    weight = STD_LOSS_WEIGHT if normalization == "standardization_loss" else 0.0
    spec = base.replace(batch_size=batch_size, seeds=1, variants=[
        {"name": normalization, "normalization": normalization, "standardization_loss_weight": weight}])
    program = TrainingProgram(spec, spec.variants[0])
    engine = Engine(device=device, dtype="float32", jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    images = engine.put_images(rng.random((TRAIN_EXAMPLES, *IMAGE_SHAPE), dtype=np.float32))
    labels = engine.put_labels(rng.integers(0, NUM_CLASSES, TRAIN_EXAMPLES))
    trainer = engine.trainer(program, *program.initial_parameters(0), images, labels)
    order = BatchOrder(seed_streams(0)[1], TRAIN_EXAMPLES, batch_size)

    def step(i: int) -> None:
        trainer.step(order.indices(i), program.learning_rate(i))

    return step, engine.synchronize


def _timed(step, synchronize, first: int, count: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds per step for steps first .. first + count - 1."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(first, first + count):
        step(i)
    synchronize()
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def compare(model: str, normalization: str, *, batch_size: int = 128, device=None, jit_compile: bool = False,
            warmup: int = 20, repeats: int = 21, steps_per_repeat: int = 10) -> dict:
    """Time normbench and the reference side by side in this process.

    Rounds alternate which side goes first, so slow drifts in machine load hit both.
    Reported: the median over rounds of the paired per-step ratios of wall-clock time
    and of process CPU time (all threads; on a shared machine it is the steadier of the
    two, since time spent descheduled is not counted). The first call of each side
    (tracing, graph optimization, XLA compilation) is timed separately.
    """
    sides = {"normbench": _normbench_step(model, normalization, batch_size, device, jit_compile),
             "reference": make_reference_step(model, normalization, batch_size, device, jit_compile=jit_compile)}
    first_call = {name: _timed(step, sync, 0, 1)[0] for name, (step, sync) in sides.items()}
    for step, sync in sides.values():
        _timed(step, sync, 1, warmup)
    per_step = {name: [] for name in sides}
    position = 1 + warmup
    for round_index in range(repeats):
        names = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for name in names:
            per_step[name].append(_timed(*sides[name], position, steps_per_repeat))
        position += steps_per_repeat
    normbench, reference = np.array(per_step["normbench"]), np.array(per_step["reference"])
    return {
        "model": model, "normalization": normalization, "xla": jit_compile,
        "normbench_ms": 1e3 * float(np.median(normbench[:, 0])),
        "reference_ms": 1e3 * float(np.median(reference[:, 0])),
        "ratio": float(np.median(normbench[:, 0] / reference[:, 0])),
        "cpu_ratio": float(np.median(normbench[:, 1] / reference[:, 1])),
        "normbench_first_call_s": first_call["normbench"], "reference_first_call_s": first_call["reference"],
    }


def main(argv=None) -> None:
    import argparse
    import platform

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--normalizations", nargs="+", default=list(NORMALIZATIONS), choices=NORMALIZATIONS)
    parser.add_argument("--xla", choices=["off", "on", "both"], default="both", help="jit_compile on both sides")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--steps-per-repeat", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"# tensorflow {tf.__version__}, python {platform.python_version()}, device {args.device or 'cpu'}, "
          f"{os.cpu_count()} cpus, batch {args.batch_size}, median of {args.repeats} rounds x {args.steps_per_repeat} steps")
    print(f"{'model':6s} {'normalization':24s} {'xla':4s} {'normbench ms':>12s} {'reference ms':>12s} {'ratio':>6s} "
          f"{'cpu ratio':>9s} {'first call s (nb / ref)':>24s}")
    for model in args.models:
        for normalization in args.normalizations:
            for jit in {"off": [False], "on": [True], "both": [False, True]}[args.xla]:
                r = compare(model, normalization, batch_size=args.batch_size, device=args.device, jit_compile=jit,
                            warmup=args.warmup, repeats=args.repeats, steps_per_repeat=args.steps_per_repeat)
                print(f"{model:6s} {normalization:24s} {'on' if jit else 'off':4s} {r['normbench_ms']:12.3f} "
                      f"{r['reference_ms']:12.3f} {r['ratio']:6.3f} {r['cpu_ratio']:9.3f} "
                      f"{r['normbench_first_call_s']:13.2f} / {r['reference_first_call_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
