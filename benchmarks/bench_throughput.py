"""Throughput of the README's main job (`normbench reproduce mnist-cnn`: every variant of
mnist-cnn, ten seeds, on every backend): runs per hour at each group size, the main job's
wall time, evaluation time, and a run's cost against its FLOP floor.

Everything is measured in one process per backend, in `setup_cache` (asv runs it once,
then the `track_` methods read it), with real MNIST placed once:

- Steps: for each group size in GROUP_SIZES and each variant of MAIN_JOB_SPEC, one group
  of that many seeds (`runner.make_group`: vectorized where the backend can), timed side
  by side: each round times one step of every group, the order reversing every round;
  the median per group.
- Evaluations: each group's evaluation of both splits (the 10,000 test images and the
  fixed 10,000-image training subset), after one untimed evaluation (compilation), timed
  side by side like the steps: EVALUATION_ROUNDS rounds over every group, the order
  reversing every round; the median per group. The faster of two evaluations timed one
  group after another (the record at 0fe77fa) let one noisy sample pass: PyTorch's batch
  norm alone 0.52 s against 0.37 s per run in a group of 4, so groups of 4 read 14.3 s per
  run against 15.6 s alone, where their steps per run were equal (6.13-8.04 ms against
  6.21-7.84) and both evaluations measured 0.36-0.41 s again side by side.
- A run's time is projected from them: the spec's steps times the step, plus its
  evaluations (`spec.evaluation_steps`) times the evaluation, divided by the runs of the
  group. The whole main job trains for minutes per run; a projection from medians over
  dozens of steps is what fits a nightly asv run, and `train_time_s` in the provenance of
  any real run checks it.
- The FLOP floor: the multiply-adds of one training step and one evaluated image, counted
  with PyTorch's FlopCounterMode (matrix multiplies and convolutions, forward and
  backward; the network is the same in every backend), over the matrix-multiply rate
  (float32 2048 x 2048 products with the framework's own matmul) timed as one more
  callable in the steps' side-by-side rounds, so it sees the machine the steps saw.
  Timed on its own for a second, it measured 1.7x slower in one process than in another
  minutes later (at 3097b59: torch --compile's run took 0.87x eager's, its floor ratio
  read 0.52x). Timed with torch in every process, the same FLOPs gave floors of 7.3 s in
  torch's, 7.6 s in TensorFlow's and 10.2 s in JAX's (at 143490d); with the framework the
  steps use, the product runs on the threads the steps run on, and no second framework's
  threads share the cores with the steps. On the 2-core machine, 2048 x 2048 products
  alternating in one process: JAX 188 GFLOP/s (torch beside it 178), TensorFlow 187-190
  (torch 171-177), torch alone 129-185 in four processes.

The `*WorkersRun` classes measure the same figures of runs alone as `--executor processes`
trains them, one single-threaded worker per core at once (`measure_on_workers`), as the
whole machine's; `TorchCompiledWorkersRun` with `--compile` too.

Under NORMBENCH_BENCH_QUICK every count is tiny (the same code path, in seconds).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import _harness as h

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented  # a skip raised inside a benchmark body
except ImportError:  # imported without asv (the tests): the same kind of exception
    SkipNotImplemented = NotImplementedError

MAIN_JOB_SPEC = "mnist-cnn"
GROUP_SIZES = [1, 4, 10]
QUICK_GROUP_SIZES = [1, 2]
QUICK_EVALUATION_EXAMPLES = 200
MATMUL_SIZE, QUICK_MATMUL_SIZE = 2048, 256
EVALUATION_ROUNDS, QUICK_EVALUATION_ROUNDS = 3, 1
SETUP_TIMEOUT_S = 3 * 3600


def _group_sizes() -> list[int]:
    return QUICK_GROUP_SIZES if h.quick() else GROUP_SIZES


def _main_job_spec():
    from normbench import spec as specs

    spec = specs.load(MAIN_JOB_SPEC)
    if h.quick():
        spec = spec.replace(train_eval_examples=QUICK_EVALUATION_EXAMPLES, test_examples=QUICK_EVALUATION_EXAMPLES)
    return spec


def matrix_product(engine):
    """(a float32 square matrix product with the engine's own `ops.matmul`, its FLOPs): the
    callable whose median time gives the machine's matrix-multiply rate. Each call reads
    one value of the product back, so that an asynchronous framework (JAX) has finished
    it."""
    import numpy as np

    n = QUICK_MATMUL_SIZE if h.quick() else MATMUL_SIZE
    rng = np.random.default_rng(0)
    arrays = engine.import_tree({"a": rng.standard_normal((n, n)), "b": rng.standard_normal((n, n))})

    def product():
        return float(engine.to_numpy(engine.ops.matmul(arrays["a"], arrays["b"])[0, 0]))

    product()
    return product, 2.0 * n**3


def counted_flops(plan, batch: int, training: bool) -> int:
    """FLOPs of one training step (forward and backward) or one inference forward pass of
    `plan` on `batch` images, by torch's FlopCounterMode."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from normbench import backends

    engine = backends.get_engine("torch", device="cpu", dtype="float32")
    params, state = plan.initial_parameters(0)
    images = engine.put_images(np.zeros((batch, *plan.arch.input_shape), np.float32))
    labels = engine.put_labels(np.zeros(batch, np.int64))
    trainer = engine.trainer(plan, params, state, images, labels)
    with FlopCounterMode(display=False) as counter:
        if training:
            trainer.step(np.arange(batch), 0.0, plan.dropout_masks(0, 0, batch))
        else:
            trainer.predict(images)
    return int(counter.get_total_flops())


def measure(backend: str, device: str = "cpu", compile: bool = False, sizes: list[int] | None = None,  # noqa: A002
            before_timing=None, after_timing=None) -> dict:
    """The body of `setup_cache`: step and evaluation times of every group size (or of
    `sizes`) and variant. With `compile` (PyTorch's `--compile`: the training loss and the
    evaluation compiled), runs alone only: a vectorized group is not compiled, so it would
    time the eager one. `before_timing()` is called once everything is built and warm,
    `after_timing(steps)` once the timing is done, with the groups' step callables
    (`measure_as_worker` meets the other workers there)."""
    import numpy as np

    from normbench import runner
    from normbench.plan import resolve

    engine = h.engine(backend, device, compile)
    spec = _main_job_spec()
    data = h.mnist()
    train_images, train_labels = engine.put_images(data.train_images), engine.put_labels(data.train_labels)
    evaluator = runner._Evaluator(engine, data, spec)
    cells, steppers, evaluations = [], [], []
    for size in [1] if compile else sizes or _group_sizes():
        for variant in spec.variants:
            plan = resolve(spec, variant)
            seeds = list(range(size))
            group = runner.make_group(engine, plan, seeds, train_images, train_labels, vectorize=size > 1)
            rng = np.random.default_rng(size)
            batches = [rng.integers(0, len(data.train_labels), (size, plan.batch_size)) for _ in range(8)]

            def step(group=group, plan=plan, seeds=seeds, batches=batches, count=[0]):
                group.step(batches[count[0] % len(batches)], plan.learning_rate(0),
                           runner._group_masks(plan, seeds, 0))
                engine.synchronize()
                count[0] += 1

            def evaluate(group=group):
                for images, labels, n in evaluator.splits.values():
                    group.evaluate(images, labels, n)

            for _ in range(h.warmup_steps()):
                step()
            evaluate()  # compiles
            cells.append({"group_size": size, "variant": variant.name, "vectorized": type(group).__name__,
                          "evaluated_images": sum(n for _, _, n in evaluator.splits.values())})
            steppers.append(step)
            evaluations.append(evaluate)
            print(f"{backend}: group {size} {variant.name} ready", file=sys.stderr, flush=True)
    product, product_flops = matrix_product(engine)
    if before_timing is not None:
        before_timing()
    for cell, median in zip(cells, h.side_by_side_medians(
            evaluations, QUICK_EVALUATION_ROUNDS if h.quick() else EVALUATION_ROUNDS)):
        cell["evaluation_s"] = median
    rounds, seconds = h.ratio_rounds()
    medians = h.side_by_side_medians(steppers + [product], rounds, seconds)
    if after_timing is not None:
        after_timing(steppers)
    for cell, median in zip(cells, medians):
        cell["step_s"] = median
    for cell in cells:
        variant = spec.variant(cell["variant"])
        evaluations = spec.evaluation_steps(variant)
        full = sum(1 for _, both in evaluations if both)
        cell["group_run_s"] = spec.steps_for(variant) * cell["step_s"] + full * cell["evaluation_s"]
        cell["run_s"] = cell["group_run_s"] / cell["group_size"]
        cell["evaluation_share"] = full * cell["evaluation_s"] / cell["group_run_s"]
    result = {"backend": backend, "compiled": compile, "quick": h.quick(), "cells": cells, "seeds": len(spec.seeds),
              "fastest_group_size": 1 if compile else engine.fastest_group_size(),
              "device_description": engine.device_description()}
    result["matrix_product_s"] = medians[-1]
    result["matmul_flops_per_s"] = product_flops / medians[-1]
    try:
        evaluated = sum(n for _, _, n in evaluator.splits.values())
        flops = {v.name: _run_flops(spec, v, evaluated) for v in spec.variants}
        result["run_flops"] = {name: training + evaluation for name, (training, evaluation) in flops.items()}
        result["evaluation_flops"] = {name: evaluation for name, (_, evaluation) in flops.items()}
    except ImportError:  # no torch to count with: the floor ratios are skipped
        pass
    return result


def _run_flops(spec, variant, evaluated_images: int) -> tuple[int, int]:
    """FLOPs of one run: (its training steps, `evaluated_images` at each full evaluation)."""
    from normbench.plan import resolve

    plan = resolve(spec, variant)
    chunk = 500
    evaluations = sum(1 for _, both in spec.evaluation_steps(variant) if both)
    return (spec.steps_for(variant) * counted_flops(plan, plan.batch_size, training=True),
            evaluations * evaluated_images * counted_flops(plan, chunk, training=False) // chunk)


# ----------------------------------------------------------------------------- runs on workers
#
# `--executor processes` (the README's faster way to run the main job on one machine)
# trains one single-threaded run per core at once, each worker bound to its core. A run
# there takes longer than alone on every core, but the machine finishes more runs per hour:
# small convolutions and elementwise passes at batch 128 leave two threads of one run
# partly idle. cnn3's steps (none / batch norm / standardization loss, ms, the 2-core
# machine): torch 6.8 / 8.5 / 8.3 alone on both cores, 11.4 / 14.4 / 13.2 on each of two
# workers at once; JAX 9.8 / 11.3 / 11.3 and 13.7 / 14.8 / 15.0; TensorFlow 5.2 / 7.3 / 6.4
# and 8.0 / 10.5 / 9.6. Two single-threaded 2048 x 2048 torch products at once ran at 98
# GFLOP/s each, one on both cores at 198: the FLOP floor is the machine's either way.
WORKER_TIMEOUT_S = 3600  # one worker's whole measurement
MEETING_TIMEOUT_S = 900  # how long a worker waits for the others to be ready or done


class _Meeting:
    """Where the workers of one measurement wait for each other: a folder in which each
    worker leaves a file per point it has reached."""

    def __init__(self, folder: str, workers: int, index: int):
        self.folder, self.workers, self.index = Path(folder), workers, index

    def _arrived(self, point: str) -> int:
        return len(list(self.folder.glob(f"{point}-*")))

    def _arrive(self, point: str, wait) -> None:
        (self.folder / f"{point}-{self.index}").touch()
        deadline = time.monotonic() + MEETING_TIMEOUT_S
        while self._arrived(point) < self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.index}: {self.workers - self._arrived(point)} other worker(s) "
                                   f"never reached {point!r} within {MEETING_TIMEOUT_S} s")
            wait()

    def wait_for_all(self, point: str) -> None:
        """Until every worker has reached `point`, idle."""
        self._arrive(point, lambda: time.sleep(0.01))

    def keep_busy_until_all(self, point: str, steps) -> None:
        """Until every worker has reached `point`, keep taking `steps`: a worker that has
        finished timing still loads the machine while the others time theirs."""
        def step_all():
            for step in steps:
                step()

        self._arrive(point, step_all)


def measure_as_worker(backend: str, index: int, workers: int, meeting: str, compile: bool = False) -> dict:  # noqa: A002
    """`measure` of runs alone (group size 1) in worker `index` of `workers` started
    together (`measure_on_workers`): every worker builds and warms up, they start timing
    together, and each keeps stepping until the last has finished, so every timed step
    shared the machine with the other workers' steps."""
    place, timed = _Meeting(meeting, workers, index), {}

    def before_timing():
        place.wait_for_all("ready")
        timed["from"] = time.time()

    def after_timing(steps):
        timed["until"] = time.time()
        place.keep_busy_until_all("done", steps)

    result = measure(backend, compile=compile, sizes=[1], before_timing=before_timing, after_timing=after_timing)
    result.update(pid=os.getpid(), cores=sorted(os.sched_getaffinity(0)), threads=os.environ.get("OMP_NUM_THREADS"),
                  timed_from=timed["from"], timed_until=timed["until"])
    return result


def measure_on_workers(backend: str, compile: bool = False) -> dict:  # noqa: A002
    """`measure` (runs alone) as `--executor processes` trains them: one worker process per
    core, bound to it with its share of the threads, all at once; the workers' figures
    combined into the machine's (`on_the_machine`)."""
    from normbench.executors.processes import default_workers, worker_cores, worker_threads

    h.check_selected(backend, "cpu")
    workers = default_workers()
    if workers < 2:
        raise NotImplementedError("one core: a worker per core is the run alone (TorchRun and the others)")
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="normbench-workers-") as meeting:
        calls = [{"module": __name__, "function": "measure_as_worker",
                  "kwargs": {"backend": backend, "index": i, "workers": workers, "meeting": meeting, "compile": compile}}
                 for i in range(workers)]
        measured = h.in_concurrent_processes(calls, [worker_cores(i, workers, cores) for i in range(workers)],
                                             worker_threads(workers), f"{backend} throughput", WORKER_TIMEOUT_S)
    return on_the_machine(measured)


def on_the_machine(measured: list[dict]) -> dict:
    """Workers' `measure` results, taken at once, as one result of the whole machine: per
    variant, the machine's time per step, per evaluation and per run is one over the sum of
    the workers' rates (with n equal workers, a worker's time / n); its matrix-multiply rate
    is the sum of theirs (each product timed beside that worker's steps), so a run's time
    and its FLOP floor are both the machine's. Each worker's own figures are kept."""
    def machine(key: str, k: int) -> float:
        return 1.0 / sum(1.0 / m["cells"][k][key] for m in measured)

    own = ("pid", "cores", "threads", "timed_from", "timed_until")
    first = {k: v for k, v in measured[0].items() if k not in own}
    cells = []
    for k, cell in enumerate(first["cells"]):
        if any(m["cells"][k]["variant"] != cell["variant"] for m in measured):
            raise RuntimeError("the workers measured different variants")
        cells.append({**cell, **{key: machine(key, k) for key in ("step_s", "evaluation_s", "group_run_s", "run_s")},
                      "evaluation_share": statistics.mean(m["cells"][k]["evaluation_share"] for m in measured)})
    rate = sum(m["matmul_flops_per_s"] for m in measured)
    product_flops = first["matmul_flops_per_s"] * first["matrix_product_s"]
    per_worker = [{key: m.get(key) for key in (*own, "matmul_flops_per_s", "device_description")}
                  | {"run_s": {c["variant"]: c["run_s"] for c in m["cells"]}} for m in measured]
    return {**first, "cells": cells, "matmul_flops_per_s": rate, "matrix_product_s": product_flops / rate,
            "workers": len(measured), "per_worker": per_worker, "fastest_group_size": 1,
            "device_description": f"{len(measured)} workers, each {first['device_description']}"}


def _counted(cache: dict, key: str) -> dict:
    """`cache[key]`, FLOPs per variant, or asv's skip where torch was missing to count them."""
    if key not in cache:
        raise SkipNotImplemented("torch is not installed: no FLOP counter")
    return cache[key]


def _cells(cache: dict, size: int) -> list[dict]:
    cells = [c for c in cache["cells"] if c["group_size"] == size]
    if not cells:
        raise NotImplementedError(f"group size {size} not measured")
    return cells


class _Throughput:
    """One backend's measurements (`measure`), read by the track_ methods. asv keys a
    setup_cache by its defining function (see bench_training.py): each backend's `Run`
    class defines its own, and its `RunTime` class takes that same function, so one
    measurement feeds both. What was not measured is skipped in `setup`, as asv expects."""

    def setup(self, cache, *params):
        if "skipped" in cache:
            raise NotImplementedError(cache["skipped"])


def _measured(backend: str, compile: bool = False) -> dict:  # noqa: A002
    try:
        return measure(backend, compile=compile)
    except NotImplementedError as exc:
        return {"skipped": str(exc)}


def _measured_on_workers(backend: str, compile: bool = False) -> dict:  # noqa: A002
    try:
        return measure_on_workers(backend, compile=compile)
    except NotImplementedError as exc:
        return {"skipped": str(exc)}


class _RunTime(_Throughput):
    params = [GROUP_SIZES]
    param_names = ["group_size"]

    def setup(self, cache, group_size):
        super().setup(cache)
        self.cells = _cells(cache, group_size)

    def track_seconds_per_run(self, cache, group_size):
        """Wall seconds per run of MAIN_JOB_SPEC with `group_size` seeds of a variant
        trained together: its variants in equal numbers, each run with its evaluations.
        Runs per hour are 3600 over it (asv and the nightly check read lower as better)."""
        return statistics.mean(c["run_s"] for c in self.cells)
    track_seconds_per_run.unit = "seconds"


class _Run(_Throughput):
    """Figures of one run trained alone (group size 1), the variants' mean."""

    def track_evaluation_seconds_per_10k_images(self, cache):
        cells = _cells(cache, 1)
        return statistics.mean(c["evaluation_s"] * 10_000 / c["evaluated_images"] for c in cells)
    track_evaluation_seconds_per_10k_images.unit = "seconds"

    def track_evaluation_share(self, cache):
        """Evaluation's share of a run's time at the spec's eval_every."""
        return statistics.mean(c["evaluation_share"] for c in _cells(cache, 1))
    track_evaluation_share.unit = "fraction"

    def track_run_to_flop_floor(self, cache):
        """A run's time over its FLOPs at the measured matrix-multiply rate."""
        run_flops = _counted(cache, "run_flops")
        return statistics.mean(c["run_s"] / (run_flops[c["variant"]] / cache["matmul_flops_per_s"])
                               for c in _cells(cache, 1))
    track_run_to_flop_floor.unit = "ratio"

    def track_evaluation_flop_share(self, cache):
        """Evaluation's share of a run's FLOPs (counted, not timed): the evaluation share
        of a run whose evaluations cost what their FLOPs do at the training steps' rate.
        A share of time below it needs evaluation faster per FLOP than training. With every
        FLOP at most at the matrix-multiply rate, a run within k times its floor spends at
        least this share / k of its time evaluating."""
        evaluation_flops, run_flops = _counted(cache, "evaluation_flops"), _counted(cache, "run_flops")
        return statistics.mean(evaluation_flops[c["variant"]] / run_flops[c["variant"]] for c in _cells(cache, 1))
    track_evaluation_flop_share.unit = "fraction"

    def track_main_job_flop_floor_seconds(self, cache):
        """The FLOP floor of this backend's share of the main job: every run's FLOPs (the
        spec's seeds of every variant) at the matrix-multiply rate measured beside the steps.
        No implementation of the main job on this machine is expected to beat it."""
        run_flops = _counted(cache, "run_flops")
        return sum(run_flops[c["variant"]] for c in _cells(cache, 1)) * cache["seeds"] / cache["matmul_flops_per_s"]
    track_main_job_flop_floor_seconds.unit = "seconds"

    def track_matrix_product_seconds(self, cache):
        """One float32 2048 x 2048 matrix product with the framework's own matmul, timed
        side by side with the steps: the rate of the FLOP floor above."""
        return cache["matrix_product_s"]
    track_matrix_product_seconds.unit = "seconds"

    def track_main_job_seconds(self, cache):
        """This backend's share of the main job (every variant x the spec's seeds) at its
        default group size; the main job's wall time is the sum over the backends."""
        size = min(cache["fastest_group_size"], cache["seeds"])
        cells = _cells(cache, size if size in _group_sizes() else 1)
        return sum(c["run_s"] * cache["seeds"] for c in cells)
    track_main_job_seconds.unit = "seconds"


class TorchRun(_Run):
    def setup_cache(self):
        return _measured("torch")

    setup_cache.timeout = SETUP_TIMEOUT_S


class TorchRunTime(_RunTime):
    setup_cache = TorchRun.setup_cache  # shared on purpose: one measurement


class TorchCompiledRun(_Run):
    """TorchRun with `--compile` (torch.compile of the training loss and the evaluation),
    runs alone. The projection leaves compilation out (once per variant in a process:
    TimeFirstCompiledStep in bench_step_time.py times it)."""

    def setup_cache(self):
        return _measured("torch", compile=True)

    setup_cache.timeout = SETUP_TIMEOUT_S


class TorchCompiledRunTime(_RunTime):
    params = [[1]]  # a vectorized group is not compiled (`measure`)
    setup_cache = TorchCompiledRun.setup_cache


class JaxRun(_Run):
    def setup_cache(self):
        return _measured("jax")

    setup_cache.timeout = SETUP_TIMEOUT_S


class JaxRunTime(_RunTime):
    setup_cache = JaxRun.setup_cache


class TensorflowRun(_Run):
    def setup_cache(self):
        return _measured("tensorflow")

    setup_cache.timeout = SETUP_TIMEOUT_S


class TensorflowRunTime(_RunTime):
    setup_cache = TensorflowRun.setup_cache


class TorchWorkersRun(_Run):
    """TorchRun as `--executor processes` trains the runs: one single-threaded run per core
    at once (`measure_on_workers`); times and the FLOP floor are the whole machine's."""

    def setup_cache(self):
        return _measured_on_workers("torch")

    setup_cache.timeout = SETUP_TIMEOUT_S


class TorchWorkersRunTime(_RunTime):
    params = [[1]]  # runs alone: a worker trains one run at a time
    setup_cache = TorchWorkersRun.setup_cache


class TorchCompiledWorkersRun(_Run):
    """TorchWorkersRun with `--compile`: each worker compiles every variant once, then
    times runs alone as TorchCompiledRun does (`--compile --executor processes`)."""

    def setup_cache(self):
        return _measured_on_workers("torch", compile=True)

    setup_cache.timeout = SETUP_TIMEOUT_S


class TorchCompiledWorkersRunTime(_RunTime):
    params = [[1]]
    setup_cache = TorchCompiledWorkersRun.setup_cache


class JaxWorkersRun(_Run):
    """JaxRun on workers (TorchWorkersRun)."""

    def setup_cache(self):
        return _measured_on_workers("jax")

    setup_cache.timeout = SETUP_TIMEOUT_S


class JaxWorkersRunTime(_RunTime):
    params = [[1]]
    setup_cache = JaxWorkersRun.setup_cache


class TensorflowWorkersRun(_Run):
    """TensorflowRun on workers (TorchWorkersRun)."""

    def setup_cache(self):
        return _measured_on_workers("tensorflow")

    setup_cache.timeout = SETUP_TIMEOUT_S


class TensorflowWorkersRunTime(_RunTime):
    params = [[1]]
    setup_cache = TensorflowWorkersRun.setup_cache
