"""Shared machinery of the asv suite: the parameter grid, skips, timed steps, training runs.

Everything that touches a framework goes through `normbench.backends` (engines, trainers)
or, for device memory counters only, the framework's own query API; the library never
reads the variables below, only this harness does.

Environment variables:
  NORMBENCH_BENCH_QUICK=1             tiny budgets (CI smoke runs): 10 training steps, 500
                                      test images, 3 timing rounds. Numbers are meaningless;
                                      scripts/nightly.py refuses to record them.
  NORMBENCH_BENCH_DEVICE=cpu[,cuda]   devices to measure; the others are skipped.
  NORMBENCH_INJECT_STEP_SLEEP_MS=N    sleep N ms inside every timed backend step (to
                                      demonstrate that the nightly run catches a regression).

This file is also the worker of every measurement taken in a fresh process: `python
_harness.py --train '<json list>'` trains runs and prints their measurements (see
`train_all`); `--ratio` measures one ratio of bench_ratios, `--call` calls one function of
the `benchmarks` package (bench_throughput's concurrent workers).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from normbench import backends as registry
from normbench import folding
from normbench import spec as specs
from normbench.data_order import BatchOrder, seed_streams
from normbench.identity import legacy_columns
from normbench.plan import resolve
from normbench.runner import execute_run, load_data

# ----------------------------------------------------------------------------- the grid

BACKENDS = registry.names()  # every backend stays in the grid; unavailable ones are skipped
DEVICES = ["cpu", "cuda"]  # "cuda" is skipped where the backend reports no such device
BENCHMARK_SPECS = ("mnist-cnn", "mnist-mlp")  # the paper's MNIST setups: 1000 steps, SGD lr 1e-3, batch 128
# Every normalization method and auxiliary loss on the same two networks at the same
# settings: the step-time ratios' grid of methods (bench_ratios' Method* classes).
METHODS_SPEC = "mnist-norms"


def _variant_key(variant) -> str:
    """A variant's grid name: the normalization string its runs record (stable across releases)."""
    return (legacy_columns(variant) or (variant.label, 0.0))[0]


def _grid():
    """(model -> bundled spec, variant keys) from the bundled benchmark specs: their models and
    the variants they compare, so the grid follows the specs, not a list typed here."""
    models, keys = {}, []
    for name in BENCHMARK_SPECS:
        spec = specs.load(name)
        models[spec.model] = name
        keys += [_variant_key(v) for v in spec.variants if _variant_key(v) not in keys]
    return models, keys


SPEC_FOR_MODEL, NORMALIZATIONS = _grid()
MODELS = list(SPEC_FOR_MODEL)
METHOD_VARIANTS = [v.name for v in specs.load(METHODS_SPEC).variants]
# The paper's architectures at their small configurations: the model and variants of each
# bundled smoke spec (`smoke-<family>`), at its batch size; adding a smoke spec adds a row.
ARCHITECTURE_SPECS = {specs.load(name).model: name for name in specs.bundled_specs() if name.startswith("smoke-")}
ARCHITECTURES = list(ARCHITECTURE_SPECS)


def _methods(variant) -> tuple[str, tuple[str, ...]]:
    """What a variant computes, by plugin: (normalization method, auxiliary losses)."""
    return variant.normalization.name, tuple(sorted(loss.name for loss in variant.auxiliary_losses))


def _architecture_variants() -> list[str]:
    """The smoke specs' variants that use a method the MNIST benchmark specs compare, other
    than their baseline (first) variant's: the paper's comparison, batch norm against the
    standardization loss. The smoke specs' other variants (group norm, the unnormalized
    network) are trained by the tests, not timed nightly."""
    benchmark_specs = [specs.load(name) for name in BENCHMARK_SPECS]
    compared = {_methods(v) for spec in benchmark_specs for v in spec.variants[1:]}
    names = [v.name for name in ARCHITECTURE_SPECS.values() for v in specs.load(name).variants if _methods(v) in compared]
    return list(dict.fromkeys(names))


ARCHITECTURE_VARIANTS = _architecture_variants()


# One ResNet-50 training step at batch 8 (224 x 224 x 3, synthetic images): peak host memory.
PEAK_MEMORY_MODEL, PEAK_MEMORY_BATCH, PEAK_MEMORY_QUICK_MODEL = "resnet-50", 8, "resnet-small"
SEED = 0

# `track_steps_to_target` reads the paper's speed-up target (Section 4.3): the best test
# accuracy the model's baseline (its bundled spec's first variant, without normalization)
# reaches within the same 1000-step budget, one target per model, backend and device,
# shared by every method. Test-set evaluations are added on a geometric grid so every step
# count is known within STEP_RESOLUTION of itself (spec `eval_resolution`).
STEP_RESOLUTION = 0.05

# ----------------------------------------------------------------------------- budgets

WARMUP_STEPS = 5  # steps before any steady-state timing (allocator, kernel selection, JIT)
# Side-by-side ratios: alternating rounds (each times one step of each callable), at
# least RATIO_ROUNDS and until RATIO_SECONDS have been measured. A 1 ms MLP step needs
# about a thousand rounds for a median stable to ~1% on a noisy 2-core machine; 40
# rounds of it wandered by +-8%.
RATIO_ROUNDS, RATIO_SECONDS = 40, 3.0
# A ratio measured in one process can be one process's: in the throughput record at
# 1e8f974, TensorFlow's cnn3 batch-norm step over its step without normalization read 1.93
# in its asv process (both sides slow there, none at 7.18 ms against 5.17 ms in the next
# benchmark's), and 1.37 and 1.44 in two fresh processes afterwards. Ratios that declare
# `processes` (bench_ratios) record the median over that many fresh worker processes,
# measured one after another, so one slow process cannot set the published value.
RATIO_WORKER_TIMEOUT_S = 600
QUICK_STEPS, QUICK_EVAL_EVERY, QUICK_TEST_EXAMPLES, QUICK_RATIO_ROUNDS = 10, 5, 500, 3
# Inference: latency of one image; time per image of a batch (the quick batch keeps CI's
# every-combination run short).
LATENCY_BATCH, THROUGHPUT_BATCH, QUICK_THROUGHPUT_BATCH = 1, 256, 8
TRAIN_TIMEOUT_S = 3600  # one training run in its worker process
SETUP_CACHE_TIMEOUT_S = 4 * 3600  # all runs of one backend


def quick() -> bool:
    return os.environ.get("NORMBENCH_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no")


def selected_devices() -> list[str]:
    raw = os.environ.get("NORMBENCH_BENCH_DEVICE", "").strip()
    return [d.strip() for d in raw.split(",") if d.strip()] if raw else list(DEVICES)


def injected_sleep_s() -> float:
    return float(os.environ.get("NORMBENCH_INJECT_STEP_SLEEP_MS", "0") or 0) / 1000.0


def warmup_steps() -> int:
    return 1 if quick() else WARMUP_STEPS


def ratio_processes(declared: int) -> int:
    """Fresh processes a ratio that declares `declared` of them is measured in; 0: in this
    process (every ratio in quick runs, whose numbers are not recorded)."""
    return 0 if quick() or declared <= 1 else declared


def ratio_rounds() -> tuple[int, float]:
    """(minimum rounds, minimum measured seconds) for `side_by_side_medians`."""
    return (QUICK_RATIO_ROUNDS, 0.0) if quick() else (RATIO_ROUNDS, RATIO_SECONDS)


def throughput_batch() -> int:
    return QUICK_THROUGHPUT_BATCH if quick() else THROUGHPUT_BATCH




# ----------------------------------------------------------------------------- engines and data


@functools.cache
def _engine(backend: str, device: str, compile: bool = False):  # noqa: A002
    return registry.get_engine(backend, device=device, compile=compile)


def engine(backend: str, device: str, compile: bool = False):  # noqa: A002
    """The backend's engine on `device` (`compile`: see `Engine.__init__`), or
    NotImplementedError (asv's skip) when the adapter, the framework or the device is
    missing, or the device is deselected."""
    check_selected(backend, device)
    try:
        return _engine(backend, device, compile)
    except registry.BackendUnavailable as exc:
        raise NotImplementedError(str(exc)) from None


def check_selected(backend: str, device: str) -> None:
    """`engine`'s skips that need no framework imported: NotImplementedError where the
    backend is not installed, the device is deselected or no NVIDIA driver is present."""
    if not registry.is_available(backend):
        raise NotImplementedError(f"backend {backend!r} is not available here (see `normbench backends`)")
    if device not in selected_devices():
        raise NotImplementedError(f"device {device!r} not selected (NORMBENCH_BENCH_DEVICE={os.environ.get('NORMBENCH_BENCH_DEVICE')})")
    if device != "cpu" and not _nvidia_driver_present():
        # Decided without importing the framework: an import costs seconds per benchmark process.
        raise NotImplementedError(f"device {device!r}: no NVIDIA driver on this machine")


def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def training_spec(model: str, normalization: str):
    """(spec, variant) of the benchmark's training run: the bundled spec, seed 0."""
    spec = specs.load(SPEC_FOR_MODEL[model]).replace(seeds=[SEED], eval_resolution=STEP_RESOLUTION)
    if quick():
        spec = spec.replace(steps=QUICK_STEPS, eval_every=QUICK_EVAL_EVERY)
    variant = next((v for v in spec.variants if _variant_key(v) == normalization), None)
    if variant is None:
        raise NotImplementedError(f"{SPEC_FOR_MODEL[model]} has no variant {normalization!r}")
    return spec, variant


def training_plan(model: str, normalization: str):
    """The resolved plan of a (model, normalization) cell of the paper's grid."""
    return resolve(*training_spec(model, normalization))


def method_plan(variant: str):
    """The resolved plan of one variant of METHODS_SPEC (seed 0)."""
    return resolve(specs.load(METHODS_SPEC).replace(seeds=[SEED]), variant)


def method_baseline(variant: str) -> str:
    """The variant of METHODS_SPEC without normalization on the same network as `variant`
    (the denominator of a method's overhead)."""
    spec = specs.load(METHODS_SPEC)
    model = spec.model_for(spec.variant(variant))
    for v in spec.variants:
        if spec.model_for(v) == model and v.normalization.name == "none" and not v.auxiliary_losses and not v.affine:
            return v.name
    raise NotImplementedError(f"{METHODS_SPEC} has no variant without normalization on {model}")


def architecture_plan(model: str, variant: str, plain_sgd: bool = False):
    """The resolved plan of one variant of `model`'s smoke spec (seed 0); NotImplementedError
    (an asv skip) where that spec has no such variant. `plain_sgd`: trained with plain SGD
    at the spec's learning rate and weight decay, constant (what the hand-written loops
    train with; the smoke specs use momentum SGD with warm-up, and Adam)."""
    spec = specs.load(ARCHITECTURE_SPECS[model]).replace(seeds=[SEED])
    if variant not in {v.name for v in spec.variants}:
        raise NotImplementedError(f"{ARCHITECTURE_SPECS[model]} has no variant {variant!r}")
    if plain_sgd:
        optimizer = spec.optimizer
        spec = spec.replace(optimizer=type(optimizer)(name="sgd", learning_rate=optimizer.learning_rate,
                                                      weight_decay=optimizer.weight_decay),
                            schedule=type(spec.schedule)())
    return resolve(spec, variant)


@functools.cache
def dataset(name: str = "mnist"):
    """A data set as the runner loads it for a float32 spec (cached in ~/.cache/normbench;
    fetched once), through the first bundled spec that trains on it."""
    spec = next(s for s in map(specs.load, specs.bundled_specs()) if s.dataset == name)
    return load_data(spec.replace(dtype="float32"))


def mnist():
    """Real MNIST as the runner loads it."""
    return dataset("mnist")


@functools.cache
def _placed_training_set(backend: str, device: str, dataset_name: str = "mnist"):
    eng = engine(backend, device)
    data = dataset(dataset_name)
    return eng.put_images(data.train_images), eng.put_labels(data.train_labels)


# ----------------------------------------------------------------------------- timed steps


class Stepper:
    """A fresh backend trainer of `plan` walking through seed 0's batch order. `step()` is
    the unit every timing benchmark measures: one update, then `synchronize()`, then the
    injected sleep (if any), all inside the caller's timer."""

    def __init__(self, backend: str, plan, device: str, compile: bool = False):  # noqa: A002
        self.engine = engine(backend, device, compile)
        self.program = plan
        params, state = self.program.initial_parameters(SEED)
        images, labels = _placed_training_set(backend, device, plan.spec.dataset)
        self.trainer = self.engine.trainer(self.program, params, state, images, labels)
        _, data_seed = seed_streams(SEED)
        self.order = BatchOrder(data_seed, dataset(plan.spec.dataset).train_labels.shape[0], plan.batch_size)
        self.order.indices(0)  # draw the epoch's permutation now, not inside a timed step
        self.count = 0

    def step(self) -> None:
        # Stay inside the first epoch, so no permutation is ever drawn inside a timer.
        i = self.count % self.order.batches_per_epoch
        self.count += 1
        self.trainer.step(self.order.indices(i), self.program.learning_rate(i),
                          self.program.dropout_masks(SEED, i, self.program.batch_size))
        self.engine.synchronize()
        sleep = injected_sleep_s()
        if sleep:
            time.sleep(sleep)

    def warm_up(self, steps: int) -> "Stepper":
        for _ in range(steps):
            self.step()
        return self


_WARM: dict[tuple, Stepper] = {}


def warm_stepper(backend: str, model: str, normalization: str, device: str, compile: bool = False) -> Stepper:  # noqa: A002
    """A warmed-up Stepper of a (model, normalization) cell, created once per process. This
    asv re-runs `setup` before every timed sample (asv#966), so setup must fetch rather than rebuild."""
    key = (backend, model, normalization, device, compile)
    if key not in _WARM:
        _WARM[key] = Stepper(backend, training_plan(model, normalization), device, compile).warm_up(warmup_steps())
    return _WARM[key]


def warm_architecture_stepper(backend: str, model: str, variant: str, device: str, plain_sgd: bool = False) -> Stepper:
    """`warm_stepper` for a variant of an architecture's smoke spec (`architecture_plan`)."""
    key = (backend, ARCHITECTURE_SPECS[model], variant, device, plain_sgd)
    if key not in _WARM:
        _WARM[key] = Stepper(backend, architecture_plan(model, variant, plain_sgd), device).warm_up(warmup_steps())
    return _WARM[key]


def peak_memory_of_one_step(backend: str, device: str) -> int:
    """Host RSS growth (bytes) over one training step of PEAK_MEMORY_MODEL at
    PEAK_MEMORY_BATCH on synthetic images (its reference input, 224 x 224 x 3, has no
    bundled data set), batch norm in every slot, plain SGD; the trainer is built and its
    first step (compilation, allocator growth) taken before the peak is reset. Under
    NORMBENCH_BENCH_QUICK the small ResNet stands in (same code path, seconds)."""
    import numpy as np

    model, dataset_name = (PEAK_MEMORY_QUICK_MODEL, "mnist") if quick() else (PEAK_MEMORY_MODEL, "imagenet_folder")
    # The data set only declares shapes and classes here: the images are synthetic.
    spec = specs.load("smoke-resnet").replace(model=model, dataset=dataset_name, batch_size=PEAK_MEMORY_BATCH,
                                              seeds=[SEED], test_examples=None)
    plan = resolve(spec, next(v.name for v in spec.variants if v.name in ARCHITECTURE_VARIANTS))  # batch norm
    eng = engine(backend, device)
    rng = np.random.default_rng(SEED)
    images = rng.random((2 * PEAK_MEMORY_BATCH, *plan.arch.input_shape), dtype=np.float32)
    labels = rng.integers(0, plan.arch.num_classes, size=2 * PEAK_MEMORY_BATCH)
    params, state = plan.initial_parameters(SEED)
    trainer = eng.trainer(plan, params, state, eng.put_images(images), eng.put_labels(labels))
    batches = [np.arange(PEAK_MEMORY_BATCH), np.arange(PEAK_MEMORY_BATCH, 2 * PEAK_MEMORY_BATCH)]
    trainer.read_losses([trainer.step(batches[0], 0.01)])
    before = _proc_status_bytes("VmRSS")
    if not _reset_peak_rss():
        raise NotImplementedError("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    trainer.read_losses([trainer.step(batches[1], 0.01)])
    return max(_proc_status_bytes("VmHWM") - before, 0)


def warm_method_stepper(backend: str, variant: str, device: str) -> Stepper:
    """`warm_stepper` for a variant of METHODS_SPEC."""
    key = (backend, METHODS_SPEC, variant, device)
    if key not in _WARM:
        _WARM[key] = Stepper(backend, method_plan(variant), device).warm_up(warmup_steps())
    return _WARM[key]


def side_by_side_medians(steps, rounds: int, min_seconds: float = 0.0) -> list[float]:
    """Median wall time of each callable, measured alternately in the same process
    (the order reverses every round, so drift and caches hit every callable alike),
    over at least `rounds` rounds and until `min_seconds` of steps have been timed."""
    samples = [[] for _ in steps]
    measured, r = 0.0, 0
    while r < rounds or measured < min_seconds:
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for k in order:
            start = time.perf_counter()
            steps[k]()
            elapsed = time.perf_counter() - start
            samples[k].append(elapsed)
            measured += elapsed
        r += 1
    return [statistics.median(s) for s in samples]


class Predictor:
    """Inference-mode logits of `plan` for one fixed batch of `batch_size` synthetic inputs,
    through the backend trainer's `predict` (jax.jit, tf.function; torch eager under
    inference_mode). `folded`: the plain network with batch norm and `affine` folded into
    the layers (normbench.folding); NotImplementedError (a skip) where the method cannot
    fold or the network is the plain one already. `predict()` is the unit the inference
    benchmarks time: one forward pass, its logits read back to the host (which waits for
    the device)."""

    def __init__(self, backend: str, plan, device: str, batch_size: int, folded: bool):
        import numpy as np

        params, state = plan.initial_parameters(SEED)
        if folded:
            if not folding.folds_anything(plan):
                raise NotImplementedError(f"{plan.variant.name} on {plan.arch.name} is the plain network already")
            try:
                plan, params = folding.fold(plan, params, state)
            except ValueError as exc:
                raise NotImplementedError(str(exc)) from None
            state = {}
        eng = engine(backend, device)
        # A forward pass costs the same whatever the input values: no data set is needed.
        self.images = eng.put_images(np.random.default_rng(SEED).standard_normal((batch_size, *plan.arch.input_shape)))
        self.trainer = eng.trainer(plan, params, state, self.images, eng.put_labels(np.zeros(batch_size, np.int64)))
        self.batch_size = batch_size
        for _ in range(warmup_steps()):
            self.predict()

    def predict(self) -> None:
        self.trainer.predict(self.images)


def inference_plan(architecture: str, variant: str):
    """`variant` of METHODS_SPEC on its own network, or of `architecture`'s smoke spec;
    NotImplementedError (an asv skip) for a pair that no spec has."""
    if architecture in ARCHITECTURE_SPECS:
        return architecture_plan(architecture, variant)
    spec = specs.load(METHODS_SPEC)
    if not any(v.name == variant and spec.model_for(v) == architecture for v in spec.variants):
        raise NotImplementedError(f"{METHODS_SPEC} has no variant {variant!r} on {architecture}")
    return method_plan(variant)


def _folds(plan) -> bool:
    """Whether `plan`'s method folds (`folding.fold` accepts it) and folding changes its network."""
    try:
        folding.fold(plan, *plan.initial_parameters(SEED))
    except ValueError:
        return False
    return folding.folds_anything(plan)


def inference_cases() -> list[str]:
    """The inference grid, '<architecture>:<variant>:<form>': every variant of METHODS_SPEC
    on its own network and of the smoke specs on their architectures, 'unfolded' (as
    trained, batch norm with its running statistics) and, where its method folds, 'folded'
    (the plain network, batch norm and `affine` folded in). One axis of valid cases: a
    product of architectures, variants and forms would spawn a process per invalid
    combination too (about 1,800 of them). Under NORMBENCH_BENCH_QUICK (CI runs every case
    once, each a process with a framework import: the full grid took 18 minutes there),
    METHODS_SPEC's first variant that folds, both forms, and its first whose normalization
    is computed at every prediction."""
    methods = specs.load(METHODS_SPEC)
    pairs = [(methods.model, v.name) for v in methods.variants if methods.model_for(v) == methods.model]
    if not quick():
        pairs += [(arch, v.name) for arch, name in ARCHITECTURE_SPECS.items() for v in specs.load(name).variants]
    folds = {pair: _folds(inference_plan(*pair)) for pair in pairs}
    if quick():
        computed = [p for p in pairs if not folds[p] and folding.folds_anything(inference_plan(*p))]  # e.g. layer norm
        pairs = [next(p for p in pairs if folds[p]), computed[0]]
    return [f"{arch}:{variant}:{form}" for arch, variant in pairs
            for form in (("unfolded", "folded") if folds[(arch, variant)] else ("unfolded",))]


def inference_baseline(case: str) -> str:
    """The unfolded case of `case`'s architecture without normalization, auxiliary loss or
    `affine` (the plain network: the denominator of an inference overhead)."""
    architecture, variant, _ = case.split(":")
    if architecture not in ARCHITECTURE_SPECS:
        return f"{architecture}:{method_baseline(variant)}:unfolded"
    for v in specs.load(ARCHITECTURE_SPECS[architecture]).variants:
        if v.normalization.name == "none" and not v.auxiliary_losses and not v.affine:
            return f"{architecture}:{v.name}:unfolded"
    raise NotImplementedError(f"{ARCHITECTURE_SPECS[architecture]} has no variant without normalization")


def inference_overhead_cases() -> list[str]:
    """`inference_cases` less the plain networks themselves (their ratio is 1 by definition);
    under NORMBENCH_BENCH_QUICK the first of them (each case builds four predictors)."""
    cases = [case for case in inference_cases() if inference_baseline(case) != case]
    return cases[:1] if quick() else cases


_WARM_PREDICTORS: dict[tuple, Predictor] = {}


def warm_predictor(backend: str, case: str, batch_size: int, device: str) -> Predictor:
    """A warmed-up Predictor of an `inference_cases` case, created once per process (asv
    re-runs setup before every sample)."""
    key = (backend, case, batch_size, device)
    if key not in _WARM_PREDICTORS:
        architecture, variant, form = case.split(":")
        _WARM_PREDICTORS[key] = Predictor(backend, inference_plan(architecture, variant), device, batch_size,
                                          folded=form == "folded")
    return _WARM_PREDICTORS[key]


def seconds_per_image(predictor: Predictor) -> float:
    """Median seconds of `predictor.predict()` (at least the ratios' rounds and seconds) over its batch size."""
    return side_by_side_medians([predictor.predict], *ratio_rounds())[0] / predictor.batch_size


def reference_module(backend: str):
    """benchmarks/reference_<backend>/, or NotImplementedError when it does not exist."""
    name = f"{__package__}.reference_{backend}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise NotImplementedError(f"no reference loop for {backend} (benchmarks/reference_{backend}/)") from None
        raise


def reference_device(backend: str, device: str):
    """The `device` argument each reference loop takes: reference_jax wants a jax Device
    (None = jax's default, which is the GPU where there is one); reference_torch and
    reference_tensorflow take the device name ("cpu", "cuda")."""
    return engine(backend, device).jax_device if backend == "jax" else device


class ReferenceStepper:
    """The hand-written loop of `backend` for `plan` (benchmarks/reference_<backend>/), with
    the same unit as `Stepper.step`: one update, then synchronize, inside the caller's timer.
    NotImplementedError (asv's skip) where the loop does not cover the plan. `options` go
    to the loop (reference_torch's `same_alignment`)."""

    def __init__(self, backend: str, plan, device: str, **options):
        engine(backend, device)  # the same skips as the backend's side
        data = dataset(plan.spec.dataset)
        self._step, self._synchronize = reference_module(backend).make_reference_step(
            plan, device=reference_device(backend, device), seed=SEED, data=(data.train_images, data.train_labels),
            **options)
        self.count = 0
        for _ in range(warmup_steps()):
            self.step()

    def step(self) -> None:
        self._step(self.count)
        self._synchronize()
        self.count += 1


# ----------------------------------------------------------------------------- memory


def _proc_status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak covers training only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _device_peak_probe(backend: str, eng, device: str):
    """Reset the framework's device peak counter; return a callable reading it, or None
    where it is not exposed. CPU: never (torch has no host counter, jax's CPU
    `memory_stats()` is None and TensorFlow reports 0 for CPU:0)."""
    if device == "cpu":
        return None
    if backend == "torch":
        import torch
        dev = eng.torch_device
        torch.cuda.reset_peak_memory_stats(dev)
        return lambda: int(torch.cuda.max_memory_allocated(dev))
    if backend == "jax":
        dev = eng.jax_device
        if dev.memory_stats() is None:
            return None
        # jax cannot reset its peak; the worker process is fresh, so the peak is this run's.
        return lambda: int(dev.memory_stats()["peak_bytes_in_use"])
    if backend == "tensorflow":
        import tensorflow as tf
        name = eng.tf_device.lstrip("/")  # "/GPU:0" -> "GPU:0"
        tf.config.experimental.reset_memory_stats(name)
        return lambda: int(tf.config.experimental.get_memory_info(name)["peak"])
    return None


# ----------------------------------------------------------------------------- training runs


class _TestSetEvaluator:
    """`execute_run`'s evaluator, restricted to the test split (the only one the metrics use)."""

    def __init__(self, eng, data, examples: int):
        self.splits = {"test": (eng.put_images(data.test_images[:examples]), eng.put_labels(data.test_labels[:examples]), examples)}


def train_and_measure(backend: str, model: str, normalization: str, device: str) -> dict:
    """One real training run (the bundled spec, seed 0, test-set eval every 50 steps),
    with its host RSS growth and device peak memory. Meant for a fresh process."""
    eng = engine(backend, device)
    spec, variant = training_spec(model, normalization)
    data = mnist()
    train_images, train_labels = _placed_training_set(backend, device)
    evaluator = _TestSetEvaluator(eng, data, QUICK_TEST_EXAMPLES if quick() else len(data.test_labels))
    device_peak = _device_peak_probe(backend, eng, device)
    rss_before = _proc_status_bytes("VmRSS")
    peak_reset = _reset_peak_rss()
    sampled = [rss_before]  # per-step samples: a fallback where VmHWM cannot be reset
    outcome = execute_run(eng, resolve(spec, variant), SEED, train_images, train_labels, evaluator,
                          on_step=lambda _: sampled.append(_proc_status_bytes("VmRSS")))
    rss_peak = max(max(sampled), _proc_status_bytes("VmHWM") if peak_reset else 0)
    curve = [(int(r["step"]), float(r["accuracy"])) for r in outcome["rows"] if r["split"] == "test"]
    full_steps = {s for s, full in spec.evaluation_steps(variant) if full}
    return {
        "status": outcome["status"],
        "budget": spec.steps_for(variant),
        "steps_completed": outcome["steps_completed"],
        "test_accuracy": curve,
        # The last full evaluation (the grid's extra points evaluate the same test set).
        "final_test_error": 1.0 - [a for s, a in curve if s in full_steps][-1],
        "host_rss_growth_bytes": max(rss_peak - rss_before, 0),
        "device_peak_bytes": device_peak() if device_peak is not None else None,
        "train_time_s": outcome["train_time_s"],
        "device_description": eng.device_description(),
    }


_RESULT_MARKER = "NORMBENCH_BENCH_RESULT "


def _start_worker(mode: str, payload, cores: list[int] | None = None, threads: int | None = None) -> subprocess.Popen:
    """This file's worker (`python _harness.py <mode> <json payload>`) started in a new
    process, its stdout to a temporary file (a pipe nobody reads until the worker exits could
    fill and stop it), its stderr this process's. With `cores`, the process is
    bound to them before anything is imported, so every thread it starts stays there (JAX's
    XLA and TensorFlow size their thread pools by the cores they may run on); with
    `threads`, the intra-op thread variables are set as `--executor processes` sets them."""
    # The repository root on the path: a ratio worker imports the `benchmarks` package.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    if threads is not None:
        from normbench.executors.processes import THREAD_VARIABLES

        env.update({name: str(threads) for name in THREAD_VARIABLES})
    command = [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(payload)]
    if cores is not None:
        # A one-line Python binds itself, then becomes the worker (exec keeps the binding):
        # a preexec_fn could deadlock where this process already runs threads (a framework's).
        command = [sys.executable, "-c", "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])",
                   ",".join(map(str, cores)), *command[1:]]
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, stdout=output, text=True, env=env)
    proc.output = output  # read by _worker_result once the worker has exited
    return proc


def _worker_result(proc: subprocess.Popen, who: str, timeout_s: float):
    """What a started worker (`who`, for errors) printed after the result marker, once it has exited."""
    with proc.output:  # closed on every path, the timeout's too
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{who} ran past {timeout_s:.0f} s and was stopped") from None
        proc.output.seek(0)
        lines = [ln for ln in proc.output.read().splitlines() if ln.startswith(_RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{who} failed (exit {proc.returncode}); its traceback is on stderr above")
    return json.loads(lines[-1][len(_RESULT_MARKER):])


def _in_fresh_process(mode: str, payload, what: str, timeout_s: float):
    """This file's worker in a new process, waited for: what it printed after the result marker."""
    return _worker_result(_start_worker(mode, payload), f"{what} worker", timeout_s)


def in_concurrent_processes(calls: list[dict], cores: list[list[int]], threads: int, what: str, timeout_s: float) -> list:
    """Each of `calls` ({"module", "function", "kwargs"}: a function of the `benchmarks`
    package and its keyword arguments) in its own new worker process, all running at once,
    call i bound to `cores[i]` with `threads` intra-op threads; their return values, in order.
    A worker that fails stops the others."""
    procs = [_start_worker("--call", call, share, threads) for call, share in zip(calls, cores)]
    results, pending, deadline = [None] * len(procs), set(range(len(procs))), time.monotonic() + timeout_s
    try:
        # Each as it exits, so that one that failed stops the others at once instead of
        # leaving them waiting for it (bench_throughput's workers meet before timing).
        while pending:
            for i in [i for i in sorted(pending) if procs[i].poll() is not None]:
                results[i] = _worker_result(procs[i], f"{what} worker {i}", timeout_s)
                pending.discard(i)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{what} worker {min(pending)} ran past {timeout_s:.0f} s and was stopped")
            time.sleep(0.05)
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.output.close()


def _train_in_fresh_process(runs: list[dict]) -> list[dict]:
    """`train_and_measure` for each run, in one new worker process."""
    return _in_fresh_process("--train", runs, "training " + ", ".join("/".join(r.values()) for r in runs),
                             TRAIN_TIMEOUT_S * len(runs))


def median_ratio_in_fresh_processes(benchmark: type, params: tuple, processes: int) -> tuple[float, list[dict]]:
    """The median of `benchmark`'s ratio (a bench_ratios class: `prepare(*params)`, then
    `measure(*params)` -> (ratio, its two medians)) over `processes` new worker processes,
    one after another; and each process's measurement."""
    target = {"module": benchmark.__module__, "class": benchmark.__qualname__, "params": list(params)}
    name = f"{target['class']}{tuple(params)}"
    measured = [_in_fresh_process("--ratio", target, f"ratio {name}", RATIO_WORKER_TIMEOUT_S) for _ in range(processes)]
    return statistics.median(m["ratio"] for m in measured), measured


def _measure_ratio(target: dict) -> dict:
    """One ratio of a bench_ratios class, in this (worker) process."""
    benchmark = getattr(importlib.import_module(target["module"]), target["class"])()
    benchmark.prepare(*target["params"])
    ratio, mine, other = benchmark.measure(*target["params"])
    return {"ratio": ratio, "mine_s": mine, "other_s": other, "pid": os.getpid()}


def run_key(model: str, normalization: str, device: str) -> str:
    return f"{model}/{normalization}/{device}"


def train_all(backend: str) -> dict:
    """The body of each backend's asv `setup_cache`: every model x normalization x device
    trained once; skipped combinations are recorded with the reason.

    Each run gets a fresh worker process, so its peak RSS, device peak and allocator
    caches are its own, not left over from the runs before it. Under NORMBENCH_BENCH_QUICK
    all runs share one worker (the same code path, one framework import instead of six)."""
    results, todo = {}, []
    for model, normalization, device in itertools.product(MODELS, NORMALIZATIONS, DEVICES):
        try:
            engine(backend, device)
        except NotImplementedError as exc:
            results[run_key(model, normalization, device)] = {"skipped": str(exc)}
            continue
        todo.append({"backend": backend, "model": model, "normalization": normalization, "device": device})
    for batch in ([todo] if quick() and todo else [[run] for run in todo]):
        started = time.perf_counter()
        for run, result in zip(batch, _train_in_fresh_process(batch)):
            results[run_key(run["model"], run["normalization"], run["device"])] = result
        print(f"trained {len(batch)} {backend} run(s) in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return {"backend": backend, "quick": quick(), "runs": results}


def baseline_normalization(model: str) -> str:
    """The grid name of the model's baseline: its bundled spec's variant without normalization."""
    spec = specs.load(SPEC_FOR_MODEL[model])
    for v in spec.variants:
        if v.normalization.name == "none" and not v.auxiliary_losses and not v.affine:
            return _variant_key(v)
    raise NotImplementedError(f"{SPEC_FOR_MODEL[model]} has no variant without normalization: no speed-up target")


def steps_to_target(cache: dict, model: str, normalization: str, device: str) -> dict:
    """The speed-up reading of one run: the target (the baseline's best test accuracy in
    its budget, same model, backend and device), the first evaluated step at or above it
    (None: not reached) and that step's resolution (the gap to the evaluation before it)."""
    baseline = training_result(cache, model, baseline_normalization(model), device)
    run = training_result(cache, model, normalization, device)
    target = max(a for _, a in baseline["test_accuracy"])
    curve = run["test_accuracy"]
    hit = next((i for i, (_, a) in enumerate(curve) if a >= target), None)
    return {"target": target, "budget": run["budget"], "final_accuracy": 1.0 - run["final_test_error"],
            "steps": curve[hit][0] if hit is not None else None,
            "resolution": curve[hit][0] - curve[hit - 1][0] if hit else 0}


def training_result(cache: dict, model: str, normalization: str, device: str) -> dict:
    """One run's measurements from a `train_all` cache, or NotImplementedError (skip)."""
    run = cache["runs"][run_key(model, normalization, device)]
    if "skipped" in run:
        raise NotImplementedError(run["skipped"])
    return run


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("--train", "--ratio", "--call"):
        sys.exit("usage: python _harness.py --train '[{\"backend\": ..., \"model\": ..., \"normalization\": ..., \"device\": ...}, ...]'\n"
                 "       python _harness.py --ratio '{\"module\": \"benchmarks.bench_ratios\", \"class\": ..., \"params\": [...]}'\n"
                 "       python _harness.py --call '{\"module\": \"benchmarks.bench_throughput\", \"function\": ..., \"kwargs\": {...}}'")
    if sys.argv[1] == "--train":
        measured = [train_and_measure(**run) for run in json.loads(sys.argv[2])]
    elif sys.argv[1] == "--ratio":
        # Through the package's copy of this module, which the benchmark classes use (this
        # script's own copy, __main__, would hold a second set of engines and steppers).
        measured = importlib.import_module("benchmarks._harness")._measure_ratio(json.loads(sys.argv[2]))
    else:
        call = json.loads(sys.argv[2])
        measured = getattr(importlib.import_module(call["module"]), call["function"])(**call["kwargs"])
    print(_RESULT_MARKER + json.dumps(measured), flush=True)
