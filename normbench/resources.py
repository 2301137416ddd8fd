"""Will a sweep fit in memory? An estimate from the spec alone, checked before anything runs.

The estimate is deliberately simple and errs on the generous side, so it only stops specs
that cannot possibly run (a batch of 60,000 float64 images through a wide model on a
small machine), never ones that merely come close:

    parameters   (kernels, biases, shifts, scales) x (value + gradient + optimizer slots + update temporary)
    activations  per example: the input, and each hidden layer's output x TRAINING_COPIES
                 (pre-activation, normalized value, ReLU output, and their gradients),
                 times batch_size; evaluation chunks likewise (EVALUATION_CHUNK examples, or
                 a chunk sized by bytes, `evaluation_chunk`)
    data         the scaled training and test images as NumPy arrays, plus each backend's
                 copy of them (placed once per engine)

Available memory is the host's MemAvailable (lowered to the cgroup's limit when the
process runs in a container with one), or, for a device, what the engine reports through
an optional `memory_available()` method; where neither is known, nothing is checked.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from normbench import architectures, datasets
from normbench.spec import ExperimentSpec, SpecError

BYTES_PER_VALUE = {"float32": 4, "float64": 8}
TRAINING_COPIES = 6  # values kept per activation in a training step (see the module docstring)
EVALUATION_COPIES = 3  # inference: pre-activation, normalized value, ReLU output
EVALUATION_CHUNK = 500  # the largest of the trainers' evaluation_chunk_size (a test holds it)
# A trainer that sizes its chunks by bytes (`evaluation_chunk`) holds at most this much
# activation memory per chunk, and at most EVALUATION_CHUNK_MAX images (a test holds
# every trainer's evaluation_chunk_bytes to it).
EVALUATION_CHUNK_BYTES = 512 << 20
EVALUATION_CHUNK_MAX = 5000
OPTIMIZER_SLOTS = {"sgd": 1, "rmsprop": 2, "adam": 2}  # state tensors per parameter (sgd: momentum)


class ResourceError(SpecError):
    """A spec cannot run within the memory available. One line, naming the spec field to change.

    A SpecError, because the fix is in the spec (batch size, dtype, model)."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one sweep needs at its peak, by kind."""

    parameters: int
    activations: int  # training step at batch_size
    evaluation: int  # one evaluation chunk
    data: int  # images held as NumPy arrays and by the backends
    per_example: int  # activation bytes per training example (to size a batch that fits)

    @property
    def total(self) -> int:
        # Training and evaluation never run at once; the larger of the two counts.
        return self.parameters + max(self.activations, self.evaluation) + self.data


def _activation_values(arch: architectures.Architecture) -> tuple[int, int]:
    """(input values, layer output values + logits) per example."""
    hidden = sum(math.prod(layer.out_shape) for layer in arch.layers())
    return math.prod(arch.input_shape), hidden


def evaluation_chunk(arch: architectures.Architecture, dtype: str, images: int = EVALUATION_CHUNK,
                     budget_bytes: int | None = None) -> int:
    """Images per evaluation chunk of one run of `arch`: `images`, or with a budget, as many
    as fit its activations (the input and EVALUATION_COPIES of every layer's output) in
    `budget_bytes`, never fewer than `images` nor more than EVALUATION_CHUNK_MAX."""
    if budget_bytes is None:
        return images
    inputs, hidden = _activation_values(arch)
    per_example = (inputs + EVALUATION_COPIES * hidden) * BYTES_PER_VALUE[dtype]
    return max(images, min(EVALUATION_CHUNK_MAX, budget_bytes // per_example))


def parameter_count(arch: architectures.Architecture) -> int:
    """Kernels plus two per-channel vectors (bias or shift, and a scale) per layer (an upper bound for most methods)."""
    return sum(math.prod(layer.kernel_shape) + 2 * layer.kernel_shape[-1] for layer in arch.layers())


def estimate(spec: ExperimentSpec, backends: int = 1, runs_together: int = 1) -> MemoryEstimate:
    """Peak memory of a sweep of `spec` on `backends` engines sharing one memory (its
    largest architecture, where variants train different ones), each training
    `runs_together` runs at once (a vectorized group holds all their parameters and
    activations)."""
    archs = [architectures.get(m) for m in dict.fromkeys([spec.model, *(spec.model_for(v) for v in spec.variants)])]
    arch = max(archs, key=lambda a: (_activation_values(a)[1], parameter_count(a)))
    size = BYTES_PER_VALUE[spec.dtype]
    inputs, hidden = _activation_values(arch)
    per_example = (inputs + TRAINING_COPIES * hidden) * size
    info = datasets.info(spec.dataset)
    examples = max(spec.train_eval_examples, info.test_examples)
    # A run evaluated alone may take a chunk sized by bytes; a vectorized group's chunk
    # holds EVALUATION_CHUNK images of every member. The larger of the two counts.
    largest_chunk = min(evaluation_chunk(arch, spec.dtype, budget_bytes=EVALUATION_CHUNK_BYTES), examples)
    grouped_chunk = min(EVALUATION_CHUNK, examples)
    image_values = math.prod(info.image_shape)
    dataset_images = info.train_examples + info.test_examples
    if datasets.streams_from_disk(info, host_memory_available()):
        # Read from disk a training batch and an evaluation chunk at a time (the runner's
        # ScaledImages): one of each, in the run dtype, on the host and on every backend.
        batch = max(spec.batch_size_for(v) for v in spec.variants)
        data = image_values * size * (batch + largest_chunk) * (1 + backends)
    else:
        # NumPy copies in the run dtype, plus each backend's train, test and train-subset copies.
        data = image_values * size * (dataset_images + backends * (dataset_images + spec.train_eval_examples))
    slots = OPTIMIZER_SLOTS.get(spec.optimizer.name, 2)
    parameters = backends * runs_together * parameter_count(arch) * size * (3 + slots)
    per_example *= runs_together  # one example of every run of the group
    batch = max(spec.batch_size_for(v) for v in spec.variants)  # the largest, where variants set their own
    evaluation = max(grouped_chunk * (inputs + runs_together * EVALUATION_COPIES * hidden),
                     largest_chunk * (inputs + EVALUATION_COPIES * hidden)) * size
    return MemoryEstimate(parameters=parameters, activations=batch * per_example, evaluation=evaluation, data=data,
                          per_example=per_example)


def host_memory_available() -> int | None:
    """Bytes the host can still give this process: MemAvailable, capped by a cgroup limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    limit = _cgroup_headroom()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's memory cgroup (v2, then v1), or None without a limit."""
    candidates = [(Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
                  (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"))]
    for limit_path, usage_path in candidates:
        try:
            raw = limit_path.read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(usage_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1 "unlimited"
            return None
        return max(limit - usage, 0)
    return None


def memory_available(engine) -> tuple[int | None, str]:
    """(bytes available to `engine`, where) — None when it cannot be known."""
    report = getattr(engine, "memory_available", None)
    if callable(report):
        value = report()
        if value is not None:
            return int(value), f"{engine.name} device {engine.device}"
    device = str(getattr(engine, "device", None) or "cpu")
    if device.split(":")[0] == "cpu":
        return host_memory_available(), "host (MemAvailable)"
    return None, f"{engine.name} device {device}"


def check_fits(spec: ExperimentSpec, engines: list, runs_together: int = 1) -> MemoryEstimate:
    """Raise ResourceError when the sweep cannot fit; returns the estimate otherwise.

    Engines on the host share its memory, so their needs add up; a device is checked
    on its own. `runs_together`: the largest group of runs any engine trains at once.
    """
    groups: dict[str, tuple[int | None, int]] = {}  # where -> (available, engines sharing it)
    for engine in engines:
        available, where = memory_available(engine)
        groups[where] = (available, groups.get(where, (None, 0))[1] + 1)
    result = estimate(spec, backends=max([n for _, n in groups.values()], default=1), runs_together=runs_together)
    for where, (available, members) in groups.items():
        need = estimate(spec, backends=members, runs_together=runs_together)
        if available is None or need.total <= available:
            continue
        fixed = need.total - need.activations if need.activations >= need.evaluation else need.total
        fits = (available - fixed) // need.per_example if available > fixed else 0
        advice = (f"use batch_size <= {fits}" if fits >= 1 else "the data and parameters alone do not fit; use a smaller model")
        if spec.dtype == "float64":
            advice += ' or dtype = "float32"'
        if runs_together > 1:
            advice += f" or a --group-size below {runs_together}"
        raise ResourceError(
            f"{spec.source}: batch_size: {max(spec.batch_size_for(v) for v in spec.variants)} examples of {spec.model} "
            f"in {spec.dtype} need about "
            f"{_gib(need.total)} (activations {_gib(need.activations)}, data {_gib(need.data)}, parameters "
            f"{_gib(need.parameters)}) but only {_gib(available)} is available on the {where}; {advice}")
    return result


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
