"""Running experiments: one run (spec variant x seed x backend) and sweeps of runs.

Results directory layout (everything a report needs, nothing else):

    <out>/spec.toml                                   the resolved spec of the sweep
    <out>/runs/<backend>/<variant>/seed-<n>/metrics.csv       tidy evaluation rows
    <out>/runs/<backend>/<variant>/seed-<n>/provenance.json   written last: marks the run finished
    <out>/runs/<backend>/<variant>/seed-<n>/percentiles.csv   only if the spec tracks layers
    <out>/metrics.csv                                  all finished runs, concatenated

and, hidden, the machinery that keeps it consistent:

    <out>/.lock                                       held while spec.toml or metrics.csv is written
    <out>/runs/<backend>/<variant>/.seed-<n>.lock     held by the process running that seed
    <out>/runs/<backend>/<variant>/.seed-<n>.tmp-<pid>/   a run being written

Nothing is lost, whatever happens to a sweep:
- A run is trained in memory, written into its temporary sibling directory (every file
  fsynced), renamed into place and the rename fsynced; provenance.json inside it marks it
  finished. A process killed at any moment leaves either a finished run or nothing usable;
  its temporary directory is removed by the next process that takes the run's lock (only
  the lock holder writes there, so whatever it finds is a leftover).
- Re-running the same command skips every finished run (resume); each run depends on the
  spec, variant, seed and backend alone, so a resumed sweep's metrics equal an
  uninterrupted one's (except wall_time_s).
- Two sweeps into one directory share the work: a run locked by the other process is
  deferred, and waited for after this process's own runs, so each ends with every run
  finished and a complete metrics.csv (written under <out>/.lock, atomically).
- A run directory holding a different spec is an error (ResultsConflict), found before
  anything runs, rather than something silently mixed in.
- A run whose loss or evaluation becomes NaN/inf stops there and is recorded as
  diverged, keeping the metrics of its last finite evaluation; the sweep goes on.

Lock files are left in place on purpose: removing a file another process may be
waiting to lock would let two processes each hold "the" lock on different files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from normbench import backends as backend_registry
from normbench import datasets, provenance, resources
from normbench.backends.base import LoopedGroup
from normbench.data_order import BatchOrder, seed_streams, train_eval_subset
from normbench.durable import fsync_path
from normbench.identity import legacy_columns, run_key
from normbench.plan import Plan, resolve
from normbench.spec import ExperimentSpec, VariantSpec, source_label, to_toml

# Every run's columns; a run whose variant trains with auxiliary losses beyond the
# standardization loss adds one column each (`Plan.metric_columns`) before wall_time_s.
METRIC_COLUMNS = ["backend", "model", "variant", "normalization", "std_loss_weight", "seed", "step", "split",
                  "cross_entropy", "std_loss", "accuracy", "wall_time_s"]
PERCENTILE_COLUMNS = ["backend", "variant", "seed", "step", "layer", "percentile", "value"]
PERCENTILES = (1, 20, 80, 99)
# Training losses are read back (and checked for divergence) at every evaluation and at
# least this often, not every step: a per-step read is a host-device sync per step.
LOSS_CHECK_EVERY = 100


class ResultsConflict(RuntimeError):
    """A results directory cannot take this sweep: it holds a different run at the same
    place or an unreadable run record, or cannot be written. The message is one line."""


class ResultsUnwritable(ResultsConflict):
    """The results directory, or a file in it, cannot be created or written."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    status: str  # "ok" | "diverged"
    reused: bool
    final_test_accuracy: float | None
    diverged_at_step: int | None = None


@dataclasses.dataclass
class LoadedData:
    """A data set as the runner uses it: float inputs (NHWC; 8-bit images scaled to [0, 1]), int labels.
    `streamed`: the images are `ScaledImages`, read from disk a batch at a time."""
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict
    streamed: bool = False


def _scaled(images: np.ndarray, dtype) -> np.ndarray:
    # 8-bit images are scaled to [0, 1] in float64, then rounded once to the run dtype:
    # identical inputs in every backend. Float data (point coordinates) are used as stored.
    return (images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images).astype(dtype)


class ScaledImages:
    """A streamed data set's images (a read-only memory map of the stored uint8 arrays, see
    `datasets.Dataset.streamed`) as the runner uses them: indexing reads those images from
    disk and scales them as `load_data` scales held ones, so a batch has the same values
    either way and the whole set is never in memory."""

    def __init__(self, stored: np.ndarray, dtype):
        self.stored, self.dtype = stored, np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index) -> np.ndarray:
        return _scaled(np.asarray(self.stored[index]), self.dtype)


def load_data(spec: ExperimentSpec, data_dir: str | None = None) -> LoadedData:
    ds = datasets.load(spec.dataset, data_dir)
    streamed = getattr(ds, "streamed", False)

    def scale(images):
        return ScaledImages(images, spec.dtype) if streamed else _scaled(images, spec.dtype)

    return LoadedData(spec.dataset, scale(ds.train_images), ds.train_labels.astype(np.int64),
                      scale(ds.test_images), ds.test_labels.astype(np.int64), dict(getattr(ds, "files", {})),
                      streamed=streamed)


def run_dir_for(out: Path, backend: str, variant: VariantSpec, seed: int) -> Path:
    return out / "runs" / backend / variant.name / f"seed-{seed}"


def is_finished(run_dir: Path, key: str) -> bool:
    marker = run_dir / "provenance.json"
    if not marker.exists():
        return False
    try:
        recorded = json.loads(marker.read_text())["run_key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ResultsConflict(f"{marker}: unreadable provenance; move the run directory away and re-run") from None
    if recorded != key:
        raise ResultsConflict(f"{run_dir}: holds a run of a different spec (run key {recorded}, expected {key}); "
                              f"use another --out directory or remove that run")
    return True


class _Evaluator:
    """Test set and fixed training subset placed on the backend once per engine (a streamed
    data set's: read from disk a chunk at a time at every evaluation, `_StreamedSplit`)."""

    def __init__(self, engine, data: LoadedData, spec: ExperimentSpec):
        subset = train_eval_subset(len(data.train_labels), spec.train_eval_examples)
        test = len(data.test_labels) if spec.test_examples is None else spec.test_examples
        if data.streamed:
            train_images, test_images = (_StreamedSplit(engine, data.train_images, subset),
                                         _StreamedSplit(engine, data.test_images, np.arange(test)))
        else:
            train_images, test_images = engine.put_images(data.train_images[subset]), engine.put_images(data.test_images[:test])
        self.splits = {
            "train": (train_images, engine.put_labels(data.train_labels[subset]), len(subset)),
            "test": (test_images, engine.put_labels(data.test_labels[:test]), test),
        }


class _StreamedSplit:
    """An evaluation split of a streamed data set as the engines' evaluations read it: they
    slice their chunks out of it (`Trainer.evaluate`), and each slice reads those examples
    (`rows` of `images`) from disk and places them on the engine, so only a chunk is ever
    in memory."""

    def __init__(self, engine, images: ScaledImages, rows: np.ndarray):
        self.engine, self.images, self.rows = engine, images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, chunk: slice):
        return self.engine.put_images(self.images[self.rows[chunk]])


# ----------------------------------------------------------------------------- durable files


def _write_csv(path: Path, columns: list[str], rows: Iterable[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old file or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def _flock(lock_path: Path, blocking: bool):
    """An exclusive flock on `lock_path` (created if needed); yields whether it was acquired.

    The kernel releases it when the process dies, however it dies."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _directory_lock(out: Path):
    """Serializes writers of <out>/spec.toml and <out>/metrics.csv, and clears their leftovers."""
    with _flock(out / ".lock", blocking=True):
        for name in ("spec.toml", "metrics.csv"):
            for stale in out.glob(f".{name}.tmp-*"):  # only the lock holder writes these
                with contextlib.suppress(OSError):
                    stale.unlink()
        yield


@contextlib.contextmanager
def _run_lock(run_dir: Path, blocking: bool = False):
    """An exclusive lock per run: a second sweep defers a run in progress elsewhere."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        (run_dir.parent / f".{run_dir.name}.lock").touch()
    except OSError as exc:
        raise ResultsUnwritable(f"{run_dir.parent}: cannot write ({exc.strerror or exc}); use another --out") from None
    with _flock(run_dir.parent / f".{run_dir.name}.lock", blocking) as acquired:
        if acquired:
            # Only the holder of this lock writes this run, so any temporary directory
            # seen now was left by a process that was killed while writing it.
            for stale in run_dir.parent.glob(f".{run_dir.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        yield acquired


# ----------------------------------------------------------------------------- one run


def metric_columns(plan: Plan) -> list[str]:
    """metrics.csv columns of a run of `plan`."""
    return METRIC_COLUMNS[:-1] + plan.metric_columns + METRIC_COLUMNS[-1:]


def execute_run(engine, program: Plan, seed: int, train_images, train_labels, evaluator: _Evaluator,
                on_step: Callable[[int], None] | None = None, host_train_images: np.ndarray | None = None) -> dict:
    """Train one run in memory (`execute_group` of one run, stepped alone)."""
    return execute_group(engine, program, [seed], train_images, train_labels, evaluator, on_step=on_step,
                         host_train_images=host_train_images)[0]


def make_group(engine, program: Plan, seeds: list[int], train_images, train_labels, vectorize: bool):
    """The runs `seeds` of `program` at their initial states: one batched step where
    `vectorize` and the backend can (`Engine.vectorized_group`), else one trainer per run."""
    members = [program.initial_parameters(seed) for seed in seeds]
    track = program.spec.track_percentiles
    if vectorize and len(seeds) > 1:
        group = engine.vectorized_group(program, members, train_images, train_labels, track)
        if group is not None:
            return group
    return LoopedGroup([engine.trainer(program, params, state, train_images, train_labels, track)
                        for params, state in members])


def execute_group(engine, program: Plan, seeds: list[int], train_images, train_labels, evaluator: _Evaluator,
                  on_step: Callable[[int], None] | None = None, vectorize: bool = False,
                  host_train_images: np.ndarray | None = None, host_batches: bool = False) -> list[dict]:
    """Train the runs `seeds` of one plan together in memory (`make_group`); one outcome
    per seed, in order: rows, percentile rows, status and timings.

    Every run keeps its own initial weights, batch order and dropout masks, so its
    outcome is the one it has alone (exactly when stepped one by one; within the float32
    trajectory tolerances when vectorized). A run diverges when a training step's loss,
    or any evaluated metric, is NaN or infinite. Losses are read at every evaluation and
    every LOSS_CHECK_EVERY steps; a run stops being recorded at the check that finds one,
    and the group goes on without it (a vectorized group keeps computing it, unread).
    `rows` keep only finite evaluations, `diverged_at_step` is the 1-based training step
    whose loss was first not finite (or the step count of the evaluation that was not),
    `non_finite` says which quantities were not. `train_time_s` is the group's time in
    training steps (and `on_step`), not in evaluations: shared by its runs; `first_step_s`
    is the part of it the first step took (tracing and compilation, where there are any).
    A program that augments (`Plan.augments`) needs `host_train_images`, the training set
    as NumPy: each step's batch is augmented there (`Plan.augmented_batch`, inside the
    timed steps) and handed to the trainer. `host_batches`: take every step's batch from
    `host_train_images` (a streamed data set, whose training images are not on the device).
    """
    spec, variant = program.spec, program.variant
    host_batches = host_batches or program.augments
    if host_batches and host_train_images is None:
        raise ValueError(f"spec {spec.name!r} takes its batches from the host (augmented or streamed): "
                         "execute_group needs host_train_images")
    steps = spec.steps_for(variant)
    group = make_group(engine, program, seeds, train_images, train_labels, vectorize)
    orders = [BatchOrder(seed_streams(seed)[1], int(train_labels.shape[0]), program.batch_size) for seed in seeds]
    # Variants older specs could write keep the names those recorded (the published tables group by them).
    normalization, _ = legacy_columns(variant) or (variant.label, 0.0)
    runs = [{"base": {"backend": engine.name, "model": program.arch.name, "variant": variant.name,
                      "normalization": normalization, "std_loss_weight": program.std_loss_weight, "seed": seed},
             "seed": seed, "rows": [], "percentile_rows": [], "status": "ok", "diverged_at_step": None, "non_finite": []}
            for seed in seeds]
    train_time, first_step = 0.0, None
    evaluations = dict(spec.evaluation_steps(variant))  # step -> full (both splits) or the test split only

    def evaluate(step: int, full: bool = True) -> None:
        """Record the evaluation at `step` of every run still going whose metrics are
        finite; a run with a metric that is not diverges here. Not `full`: the test split
        only (a point of the resolution grid)."""
        live = [k for k, run in enumerate(runs) if run["status"] == "ok"]
        new_rows = {k: [] for k in live}
        new_percentiles = {k: [] for k in live}
        non_finite = {k: [] for k in live}
        for split, (images, labels, n) in evaluator.splits.items():
            if not full and split != "test":
                continue
            results = group.evaluate(images, labels, n)
            for k in live:
                result, run = results[k], runs[k]
                with np.errstate(all="ignore"):  # an exploding model overflows here; caught just below
                    std_loss = program.std_metric.value_from_statistics(result["moments"])
                    extra = {loss.metric_column: loss.value_from_statistics(result["auxiliary"][loss.name])
                             for loss in program.losses if loss.name in result["auxiliary"]}
                row = {**run["base"], "step": step, "split": split, "cross_entropy": result["cross_entropy"],
                       "std_loss": std_loss, "accuracy": result["accuracy"], **extra, "wall_time_s": round(train_time, 4)}
                non_finite[k] += [f"{split}-split {name}" for name in ("cross_entropy", "std_loss", "accuracy", *extra)
                                  if not math.isfinite(row[name])]
                new_rows[k].append(row)
                if split == "test":
                    for layer, values in result["tracked"].items():
                        with np.errstate(all="ignore"):
                            quantiles = np.percentile(values, PERCENTILES)
                        if not np.all(np.isfinite(quantiles)):
                            non_finite[k].append(f"test-split {layer} percentiles")
                        for q, value in zip(PERCENTILES, quantiles):
                            new_percentiles[k].append({"backend": engine.name, "variant": variant.name,
                                                       "seed": run["seed"], "step": step, "layer": layer,
                                                       "percentile": q, "value": float(value)})
        for k in live:
            run = runs[k]
            if non_finite[k]:
                run.update(status="diverged", diverged_at_step=step, non_finite=non_finite[k])
            else:
                run["rows"].extend(new_rows[k])
                run["percentile_rows"].extend(new_percentiles[k])

    def going() -> bool:
        return any(run["status"] == "ok" for run in runs)

    evaluate(0)
    first, pending = 0, []  # steps [first, first + len(pending)) ran; their losses are not read yet
    ahead = _BatchesAhead(program, host_train_images, seeds, orders, steps) if host_batches and going() else None
    engine.synchronize()
    start = time.perf_counter()
    try:
        for step in range(steps if going() else 0):
            if ahead is None:
                indices, images = np.stack([order.indices(step) for order in orders]), None
            else:
                indices, images = ahead.take(step)
            pending.append(group.step(indices, program.learning_rate(step), _group_masks(program, seeds, step), images))
            if on_step is not None:
                on_step(step)
            if step == 0:  # one extra sync: the first step's time, compilation included, on its own
                engine.synchronize()
                first_step = time.perf_counter() - start
            at_evaluation = step + 1 in evaluations
            if not (at_evaluation or len(pending) == LOSS_CHECK_EVERY):
                continue
            # One sync and one transfer per interval: the timer covers the steps only.
            engine.synchronize()
            train_time += time.perf_counter() - start
            losses = group.read_losses(pending)  # (steps, runs, losses)
            for k, run in enumerate(runs):
                bad = ~np.isfinite(losses[:, k])
                if run["status"] == "ok" and bad.any():
                    # Keep the metrics of the last finite evaluation; never record a NaN model.
                    row = int(np.argmax(bad.any(axis=1)))
                    names = [f"training-step {name}" for name, b in zip(program.step_loss_names, bad[row]) if b]
                    run.update(status="diverged", diverged_at_step=first + row + 1, non_finite=names)
            first, pending = step + 1, []
            if not going():
                break
            if at_evaluation:
                evaluate(step + 1, evaluations[step + 1])
                if not going():
                    break
            engine.synchronize()
            start = time.perf_counter()
    finally:
        if ahead is not None:
            ahead.close()
    return [{"rows": run["rows"], "percentile_rows": run["percentile_rows"], "status": run["status"],
             "diverged_at_step": run["diverged_at_step"], "non_finite": run["non_finite"],
             "last_finite_step": run["rows"][-1]["step"] if run["rows"] else None, "train_time_s": train_time,
             "first_step_s": first_step,
             "steps_completed": steps if run["diverged_at_step"] is None else run["diverged_at_step"],
             "group_size": len(seeds), "vectorized": not isinstance(group, LoopedGroup)}
            for run in runs]


class _BatchesAhead:
    """A group's host batches (read from a streamed set, augmented), each made one step
    ahead on a thread while the device runs the step before. A step's batch depends only on
    its indices, drawn here in step order, and the runs' seeds: the same batches as made in
    line, the reading and augmenting hidden behind the device's work."""

    def __init__(self, program: Plan, images, seeds: list[int], orders: list, steps: int):
        self.program, self.images, self.seeds, self.orders, self.steps = program, images, seeds, orders, steps
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="normbench-batches")
        self.queued = self._submit(0) if steps else None

    def _submit(self, step: int):
        indices = np.stack([order.indices(step) for order in self.orders])
        return step, indices, self.pool.submit(self._make, indices, step)

    def _make(self, indices: np.ndarray, step: int) -> list[np.ndarray]:
        return [_host_batch(self.program, self.images, batch, seed, step) for batch, seed in zip(indices, self.seeds)]

    def take(self, step: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(indices, images) of `step`, and the next step's batch queued."""
        queued, indices, future = self.queued
        if queued != step:
            raise RuntimeError(f"batches are taken in order: step {step} asked, {queued} queued")
        images = future.result()
        self.queued = self._submit(step + 1) if step + 1 < self.steps else None
        return indices, images

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _host_batch(program: Plan, images, batch: np.ndarray, seed: int, step: int) -> np.ndarray:
    """Run `seed`'s training batch `batch` at `step`, made on the host: read (and, where the
    spec augments, augmented) there."""
    images = images[batch]
    return program.augmented_batch(images, seed, step) if program.augments else images


def _group_masks(program: Plan, seeds: list[int], step: int) -> list[dict] | None:
    """This step's dropout masks of every run of a group (None without dropout)."""
    masks = [program.dropout_masks(seed, step, program.batch_size) for seed in seeds]
    return None if masks[0] is None else masks


def write_run(run_dir: Path, outcome: dict, record: dict, tracked: bool, columns: list[str] = METRIC_COLUMNS) -> None:
    """Write a finished run atomically: a temporary directory renamed into place.

    Call it holding the run's lock (see `_run_lock`)."""
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_csv(tmp / "metrics.csv", columns, outcome["rows"])
        if tracked:
            _write_csv(tmp / "percentiles.csv", PERCENTILE_COLUMNS, outcome["percentile_rows"])
        _atomic_write_text(tmp / "provenance.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
        fsync_path(tmp)
        if run_dir.exists():  # an unfinished leftover (no provenance.json): replace it
            shutil.rmtree(run_dir)
        os.rename(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(run_dir.parent)


def place_data(engine, data: LoadedData, spec: ExperimentSpec) -> tuple:
    """The training set and the evaluation splits on `engine`, placed once and reused by every run there.
    A streamed training set stays on disk: each step's batch comes from the host, and the
    trainers get an empty stand-in for the images (the labels are small and go whole)."""
    train_images = data.train_images[:0] if data.streamed else data.train_images
    return engine.put_images(train_images), engine.put_labels(data.train_labels), _Evaluator(engine, data, spec)


def train_run(spec: ExperimentSpec, variant: VariantSpec, seed: int, engine, data: LoadedData, placed: tuple,
              env: dict, on_step: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Train one run in memory and describe it: (outcome of `execute_run`, provenance record).

    Reads and writes no results directory, so any process holding the data can call it
    (a Dask worker does, see normbench.executors) and hand both back to the process that
    writes them (`store_run`). `placed` comes from `place_data`; `env` from
    provenance.environment()."""
    return train_group(spec, variant, [seed], engine, data, placed, env, on_step)[0]


def train_group(spec: ExperimentSpec, variant: VariantSpec, seeds: list[int], engine, data: LoadedData, placed: tuple,
                env: dict, on_step: Callable[[int], None] | None = None, vectorize: bool = False) -> list[tuple[dict, dict]]:
    """`train_run` of several seeds of one variant trained together (`execute_group`):
    one (outcome, record) per seed, in order. A run's record is the one it has alone
    (the run key does not depend on its group) plus `group`: the seeds trained with it,
    whether their step was vectorized, and the note that `train_time_s` is the group's."""
    train_images, train_labels, evaluator = placed
    started = provenance.now()
    plan = resolve(spec, variant)
    outcomes = execute_group(engine, plan, seeds, train_images, train_labels, evaluator, on_step=on_step,
                             host_train_images=data.train_images, host_batches=data.streamed,
                             vectorize=vectorize)
    finished = provenance.now()
    results = []
    for seed, outcome in zip(seeds, outcomes):
        outcome["columns"] = metric_columns(plan)
        record = {
            "run_key": run_key(spec, variant, seed, engine.name), "spec_hash": spec.hash(), "spec_name": spec.name,
            "spec_source": source_label(spec.source), "backend": engine.name, "variant": dataclasses.asdict(variant), "seed": seed,
            "dtype": spec.dtype, "device": engine.device_description(), "framework_versions": engine.versions(),
            "compiled_step": engine.compiled_step, "status": outcome["status"], "diverged_at_step": outcome["diverged_at_step"],
            "non_finite": outcome["non_finite"], "last_finite_step": outcome["last_finite_step"],
            "steps_completed": outcome["steps_completed"], "train_time_s": round(outcome["train_time_s"], 3),
            "first_step_s": None if outcome["first_step_s"] is None else round(outcome["first_step_s"], 3),
            "data_files": data.files, "started": started, "finished": finished, **env,
        }
        if len(seeds) > 1:
            record["group"] = {"seeds": list(seeds), "vectorized": outcome["vectorized"],
                               "train_time_s": "the group's: its runs trained together"}
        results.append((outcome, record))
    return results


def store_run(run_dir: Path, outcome: dict, record: dict, spec: ExperimentSpec, log=print) -> RunResult:
    """Write a run trained by `train_run` (holding its `_run_lock`) and say if it diverged."""
    try:
        write_run(run_dir, outcome, record, tracked=bool(spec.track_percentiles), columns=outcome["columns"])
    except OSError as exc:
        raise ResultsUnwritable(f"{run_dir}: cannot write the run ({exc.strerror or exc}); "
                                "finished runs are kept, free space or use another --out") from None
    if outcome["status"] == "diverged":
        log(f"{record['backend']}/{record['variant']['name']}/seed {record['seed']}: diverged at step "
            f"{outcome['diverged_at_step']} ({', '.join(outcome['non_finite'])} not finite; recorded, continuing)")
    return _summarize(run_dir, reused=False)


# ----------------------------------------------------------------------------- sweeps


def run_sweep(spec: ExperimentSpec, backend_names: list[str], out: str | Path, *, device: str | None = None,
              data_dir: str | None = None, progress: bool = True, log=print,
              group_size: int | None = None, compile: bool = False) -> list[RunResult]:  # noqa: A002
    """Run every variant x seed of `spec` on each backend, resuming finished runs.

    Up to `group_size` unfinished seeds of a variant train together, vectorized where the
    backend can (`execute_group`); None: each engine's `fastest_group_size`. A group
    holds only unfinished runs, and each run is written, resumed and keyed as alone.
    `compile`: compile the training step and the evaluation where the backend runs them
    eagerly otherwise (PyTorch: torch.compile), recorded in each run's provenance.

    Every check that can fail (unknown backend, a conflicting run in `out`, an
    unwritable `out`, an absent device, not enough memory, unusable data) runs before
    any training. Returns one RunResult per run, in spec order.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    backend_names = list(dict.fromkeys(backend_registry.canonical_name(b) for b in backend_names))
    todo = [(b, v, s) for b in backend_names for v in spec.variants for s in spec.seeds]
    keys = [run_key(spec, v, s, b) for b, v, s in todo]
    dirs = [run_dir_for(out, b, v, s) for b, v, s in todo]
    pending = {i for i in range(len(todo)) if not is_finished(dirs[i], keys[i])}  # raises on a conflict
    # Engines next: an absent framework or device fails before anything is written or loaded.
    created = {b: backend_registry.get_engine(b, device=device, dtype=spec.dtype, compile=compile) for b in backend_names}
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group size: {group_size!r} is not a positive integer; use --group-size N with N >= 1")
    sizes = {b: group_size or engine.fastest_group_size() for b, engine in created.items()}
    made_out = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsUnwritable(f"{out}: cannot create the results directory ({exc.strerror or exc}); use another --out") from None
    loaded: list[LoadedData] = []

    def data() -> LoadedData:
        if not loaded:
            loaded.append(load_data(spec, data_dir))
        return loaded[0]

    if pending:
        try:
            resources.check_fits(spec, list(created.values()), runs_together=min(max(sizes.values()), len(spec.seeds)))
            data()
        except BaseException:
            if made_out:  # refused before anything was written: leave no empty results directory behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
    if len(pending) < len(todo):
        log(f"resuming: {len(todo) - len(pending)} of {len(todo)} runs already finished in {out}")
    write_resolved_spec(out, spec)
    env = provenance.environment()
    results: dict[int, RunResult] = {}
    engines: dict[str, tuple] = {}
    bar = tqdm(total=sum(spec.steps_for(todo[i][1]) for i in pending), unit="step", disable=not progress, dynamic_ncols=True)

    def reuse(index: int) -> None:
        results[index] = _summarize(dirs[index], reused=True)
        bar.update(spec.steps_for(todo[index][1]) if index in pending else 0)  # pending at the start: finished elsewhere

    def attempt(indices: list[int], blocking: bool) -> list[int]:
        """Reuse or run todo[indices] (seeds of one backend and variant) as one group;
        returns those another process holds (non-blocking only)."""
        backend, variant, _ = todo[indices[0]]
        held = []
        with contextlib.ExitStack() as locks:
            mine = []
            for index in indices:
                if is_finished(dirs[index], keys[index]):
                    reuse(index)
                elif not locks.enter_context(_run_lock(dirs[index], blocking)):
                    held.append(index)
                elif is_finished(dirs[index], keys[index]):  # finished by another process meanwhile
                    reuse(index)
                else:
                    mine.append(index)
            if not mine:
                return held
            if backend not in engines:
                engines[backend] = place_data(created[backend], data(), spec)
            seeds = [todo[i][2] for i in mine]
            bar.set_description(f"{backend}/{variant.name}/seed {', '.join(map(str, seeds))}")
            trained = train_group(spec, variant, seeds, created[backend], data(), engines[backend], env,
                                  on_step=lambda _: bar.update(len(mine)), vectorize=len(mine) > 1)
            # on_step counted every step the group took for each run; a group stops early
            # only when every run diverged, at its last run's divergence
            taken = max(outcome["steps_completed"] for outcome, _ in trained)
            for index, (outcome, record) in zip(mine, trained):
                bar.update(spec.steps_for(variant) - taken if index in pending else 0)
                results[index] = store_run(dirs[index], outcome, record, spec, log)
        return held

    try:
        deferred = []
        for group in _groups(todo, pending, sizes):
            for index in attempt(group, blocking=False):
                log(f"{dirs[index]}: another process is running it; coming back to it later")
                deferred.append(index)
        for index in deferred:
            log(f"waiting for another process to finish {dirs[index]}")
            attempt([index], blocking=True)
    except KeyboardInterrupt:
        # Let metrics.csv list what is finished; a second Ctrl-C here loses nothing either.
        with contextlib.suppress(Exception):
            collect(out)
        raise
    finally:
        bar.close()
    collect(out)
    return [results[i] for i in range(len(todo))]


def _groups(todo: list[tuple], pending: set[int], sizes: dict[str, int]) -> list[list[int]]:
    """Indices of `todo` (backend, variant, seed), in order, as the units a sweep trains:
    up to sizes[backend] pending seeds of one backend and variant together; every
    finished run on its own (it is only reused)."""
    units: list[list[int]] = []
    open_unit: dict[tuple, list[int]] = {}
    for index, (backend, variant, _) in enumerate(todo):
        if index not in pending:
            units.append([index])
            continue
        key = (backend, variant.name)
        unit = open_unit.get(key)
        if unit is None or len(unit) >= sizes[backend]:
            unit = open_unit[key] = []
            units.append(unit)
        unit.append(index)
    return units


def write_resolved_spec(out: Path, spec: ExperimentSpec) -> None:
    """<out>/spec.toml: the sweep's spec as resolved, headed by where it came from."""
    source = " ".join(source_label(spec.source).splitlines())  # a comment line must stay one line
    _write_results_file(out, "spec.toml", f"# resolved spec of this sweep (source: {source})\n" + to_toml(spec))


def _write_results_file(out: Path, name: str, text: str) -> None:
    try:
        with _directory_lock(out):
            _atomic_write_text(out / name, text)
    except OSError as exc:
        raise ResultsUnwritable(f"{out / name}: cannot write ({exc.strerror or exc}); free space or use another --out") from None


def _summarize(run_dir: Path, reused: bool) -> RunResult:
    record = json.loads((run_dir / "provenance.json").read_text())
    final = None
    with open(run_dir / "metrics.csv") as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    if test_rows and record["status"] == "ok":
        final = float(test_rows[-1]["accuracy"])
    return RunResult(run_dir, record["status"], reused, final, record.get("diverged_at_step"))


def finished_run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in Path(out).glob("runs/*/*/seed-*/provenance.json"))


def collect(out: str | Path) -> Path:
    """Concatenate every finished run's metrics into <out>/metrics.csv (atomically).

    Runs are taken in path order, so the file depends only on which runs are finished,
    not on who finished them or when; writers are serialized, so of two sweeps in one
    directory the one collecting last writes every run either of them finished."""
    out = Path(out)
    buffer = io.StringIO()
    try:
        with _directory_lock(out):
            tables = []
            for run_dir in finished_run_dirs(out):
                with open(run_dir / "metrics.csv", newline="") as f:
                    tables.append(list(csv.DictReader(f)))
            # Columns of auxiliary losses some runs report (others leave them empty), before wall_time_s.
            extra = list(dict.fromkeys(k for rows in tables for row in rows[:1] for k in row if k not in METRIC_COLUMNS))
            writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS[:-1] + extra + METRIC_COLUMNS[-1:],
                                    extrasaction="ignore", restval="", lineterminator="\n")
            writer.writeheader()
            for rows in tables:
                writer.writerows(rows)
            _atomic_write_text(out / "metrics.csv", buffer.getvalue())
    except OSError as exc:
        raise ResultsUnwritable(f"{out / 'metrics.csv'}: cannot write ({exc.strerror or exc}); "
                                "the runs themselves are kept, `normbench report` rebuilds it") from None
    return out / "metrics.csv"
