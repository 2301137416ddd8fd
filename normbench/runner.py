"""Running experiments: one run (spec variant x seed x backend) and sweeps of runs.

Results directory layout (everything a report needs, nothing else):

    <out>/spec.toml                                   the resolved spec of the sweep
    <out>/runs/<backend>/<variant>/seed-<n>/metrics.csv       tidy evaluation rows
    <out>/runs/<backend>/<variant>/seed-<n>/provenance.json   written last: marks the run finished
    <out>/runs/<backend>/<variant>/seed-<n>/percentiles.csv   only if the spec tracks layers
    <out>/metrics.csv                                  all finished runs, concatenated

A run is written into a temporary sibling directory and renamed into place when it is
complete, so a half-written run is never read as a result; a re-run of the same command
skips every finished run (resume), and a run directory holding a different spec is an
error rather than something silently mixed in.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from normbench import backends as backend_registry
from normbench import datasets, provenance
from normbench.data_order import BatchOrder, seed_streams, train_eval_subset
from normbench.program import TrainingProgram, standardization_loss_numpy
from normbench.spec import ExperimentSpec, VariantSpec, to_toml

METRIC_COLUMNS = ["backend", "model", "variant", "normalization", "std_loss_weight", "seed", "step", "split",
                  "cross_entropy", "std_loss", "accuracy", "wall_time_s"]
PERCENTILE_COLUMNS = ["backend", "variant", "seed", "step", "layer", "percentile", "value"]
PERCENTILES = (1, 20, 80, 99)


class ResultsConflict(RuntimeError):
    """A results directory already holds a different run at the same place."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    status: str  # "ok" | "diverged"
    reused: bool
    final_test_accuracy: float | None
    diverged_at_step: int | None = None


@dataclasses.dataclass
class LoadedData:
    """A data set as the runner uses it: float images in [0, 1] (NHWC), int labels."""
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict


def load_data(spec: ExperimentSpec, data_dir: str | None = None) -> LoadedData:
    ds = datasets.load(spec.dataset, data_dir)
    # Scale in float64, then round once to the run dtype: identical inputs in every backend.
    scale = lambda x: (x.astype(np.float64) / 255.0).astype(spec.dtype)
    return LoadedData(spec.dataset, scale(ds.train_images), ds.train_labels.astype(np.int64),
                      scale(ds.test_images), ds.test_labels.astype(np.int64), dict(getattr(ds, "files", {})))


def run_key(spec: ExperimentSpec, variant: VariantSpec, seed: int, backend: str) -> str:
    """Identity of one run: everything that determines its result except the device."""
    shared = spec.to_dict()
    for field in ("name", "description", "seeds", "variants", "track_percentiles"):
        shared.pop(field)
    shared["steps"] = spec.steps_for(variant)
    blob = json.dumps({"spec": shared, "variant": dataclasses.asdict(variant), "seed": seed, "backend": backend,
                       "track": list(spec.track_percentiles)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_dir_for(out: Path, backend: str, variant: VariantSpec, seed: int) -> Path:
    return out / "runs" / backend / variant.name / f"seed-{seed}"


def is_finished(run_dir: Path, key: str) -> bool:
    marker = run_dir / "provenance.json"
    if not marker.exists():
        return False
    try:
        recorded = json.loads(marker.read_text())["run_key"]
    except (OSError, ValueError, KeyError):
        raise ResultsConflict(f"{marker}: unreadable provenance; move the run directory away and re-run") from None
    if recorded != key:
        raise ResultsConflict(f"{run_dir}: holds a run of a different spec (run key {recorded}, expected {key}); "
                              f"use another --out directory or remove that run")
    return True


class _Evaluator:
    """Test set and fixed training subset placed on the backend once per engine."""

    def __init__(self, engine, data: LoadedData, spec: ExperimentSpec):
        subset = train_eval_subset(len(data.train_labels), spec.train_eval_examples)
        self.splits = {
            "train": (engine.put_images(data.train_images[subset]), engine.put_labels(data.train_labels[subset]), len(subset)),
            "test": (engine.put_images(data.test_images), engine.put_labels(data.test_labels), len(data.test_labels)),
        }


def _write_csv(path: Path, columns: list[str], rows: Iterable[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def execute_run(engine, program: TrainingProgram, seed: int, train_images, train_labels, evaluator: _Evaluator,
                on_step: Callable[[int], None] | None = None) -> dict:
    """Train one run in memory. Returns rows, percentile rows, status and timings."""
    spec, variant = program.spec, program.variant
    steps = spec.steps_for(variant)
    params, state = program.initial_parameters(seed)
    trainer = engine.trainer(program, params, state, train_images, train_labels, spec.track_percentiles)
    _, data_seed = seed_streams(seed)
    order = BatchOrder(data_seed, int(train_labels.shape[0]), spec.batch_size)
    base = {"backend": engine.name, "model": spec.model, "variant": variant.name, "normalization": variant.normalization,
            "std_loss_weight": variant.standardization_loss_weight, "seed": seed}
    rows, percentile_rows = [], []
    train_time = 0.0

    def evaluate(step: int) -> None:
        for split, (images, labels, n) in evaluator.splits.items():
            result = trainer.evaluate(images, labels, n)
            rows.append({**base, "step": step, "split": split, "cross_entropy": result["cross_entropy"],
                         "std_loss": standardization_loss_numpy(result["moments"], spec.standardization_loss.log_epsilon),
                         "accuracy": result["accuracy"], "wall_time_s": round(train_time, 4)})
            if split == "test":
                for layer, values in result["tracked"].items():
                    for q, value in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
                        percentile_rows.append({"backend": engine.name, "variant": variant.name, "seed": seed,
                                                "step": step, "layer": layer, "percentile": q, "value": float(value)})

    evaluate(0)
    status, diverged_at = "ok", None
    for step in range(steps):
        engine.synchronize()
        start = time.perf_counter()
        losses = trainer.step(order.indices(step), program.learning_rate(step))
        engine.synchronize()
        train_time += time.perf_counter() - start
        if on_step is not None:
            on_step(step)
        if not all(math.isfinite(v) for v in losses.values()):
            # Keep the metrics of the last finite evaluation; never evaluate a NaN model.
            status, diverged_at = "diverged", step + 1
            break
        if (step + 1) % spec.eval_every == 0 or step + 1 == steps:
            evaluate(step + 1)
    return {"rows": rows, "percentile_rows": percentile_rows, "status": status, "diverged_at_step": diverged_at,
            "train_time_s": train_time, "steps_completed": diverged_at or steps}


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """An exclusive, non-blocking lock per run: a second sweep skips a run in progress."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_run(run_dir: Path, outcome: dict, record: dict, tracked: bool) -> None:
    """Write a finished run atomically: a temporary directory renamed into place."""
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_csv(tmp / "metrics.csv", METRIC_COLUMNS, outcome["rows"])
    if tracked:
        _write_csv(tmp / "percentiles.csv", PERCENTILE_COLUMNS, outcome["percentile_rows"])
    _atomic_write_text(tmp / "provenance.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if run_dir.exists():  # an unfinished leftover (no provenance): replace it
        shutil.rmtree(run_dir)
    os.rename(tmp, run_dir)


def run_sweep(spec: ExperimentSpec, backend_names: list[str], out: str | Path, *, device: str | None = None,
              data_dir: str | None = None, progress: bool = True, log=print) -> list[RunResult]:
    """Run every variant x seed of `spec` on each backend, resuming finished runs."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backend_names = [backend_registry.canonical_name(b) for b in backend_names]
    _atomic_write_text(out / "spec.toml", f"# resolved spec of this sweep (source: {spec.source})\n" + to_toml(spec))
    # Engines first: an unknown backend or an absent device fails before any data is touched.
    created = {b: backend_registry.get_engine(b, device=device, dtype=spec.dtype) for b in backend_names}
    data = load_data(spec, data_dir)
    env = provenance.environment()
    results: list[RunResult] = []
    todo = [(b, v, s) for b in backend_names for v in spec.variants for s in spec.seeds]
    pending = [t for t in todo if not is_finished(run_dir_for(out, t[0], t[1], t[2]), run_key(spec, t[1], t[2], t[0]))]
    if len(pending) < len(todo):
        log(f"resuming: {len(todo) - len(pending)} of {len(todo)} runs already finished in {out}")
    total_steps = sum(spec.steps_for(v) for _, v, _ in pending)
    bar = tqdm(total=total_steps, unit="step", disable=not progress, dynamic_ncols=True)
    engines: dict[str, tuple] = {}
    try:
        for backend, variant, seed in todo:
            run_dir = run_dir_for(out, backend, variant, seed)
            key = run_key(spec, variant, seed, backend)
            if is_finished(run_dir, key):
                results.append(_summarize(run_dir, reused=True))
                continue
            with _run_lock(run_dir) as acquired:
                if not acquired:
                    log(f"skipping {run_dir}: another process is running it")
                    continue
                if is_finished(run_dir, key):  # finished by another process meanwhile
                    results.append(_summarize(run_dir, reused=True))
                    continue
                if backend not in engines:
                    engine = created[backend]
                    engines[backend] = (engine, engine.put_images(data.train_images), engine.put_labels(data.train_labels),
                                        _Evaluator(engine, data, spec))
                engine, train_images, train_labels, evaluator = engines[backend]
                bar.set_description(f"{backend}/{variant.name}/seed {seed}")
                started = provenance.now()
                outcome = execute_run(engine, TrainingProgram(spec, variant), seed, train_images, train_labels,
                                      evaluator, on_step=lambda _: bar.update(1))
                record = {
                    "run_key": run_key(spec, variant, seed, backend), "spec_hash": spec.hash(), "spec_name": spec.name,
                    "spec_source": spec.source, "backend": backend, "variant": dataclasses.asdict(variant), "seed": seed,
                    "dtype": spec.dtype, "device": engine.device_description(), "framework_versions": engine.versions(),
                    "status": outcome["status"], "diverged_at_step": outcome["diverged_at_step"],
                    "steps_completed": outcome["steps_completed"], "train_time_s": round(outcome["train_time_s"], 3),
                    "data_files": data.files, "started": started, "finished": provenance.now(), **env,
                }
                write_run(run_dir, outcome, record, tracked=bool(spec.track_percentiles))
                if outcome["status"] == "diverged":
                    log(f"{backend}/{variant.name}/seed {seed}: diverged at step {outcome['diverged_at_step']} (recorded; continuing)")
                results.append(_summarize(run_dir, reused=False))
    finally:
        bar.close()
    collect(out)
    return results


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
    """Concatenate every finished run's metrics into <out>/metrics.csv (atomically)."""
    out = Path(out)
    lines: list[str] = [",".join(METRIC_COLUMNS)]
    for run_dir in finished_run_dirs(out):
        with open(run_dir / "metrics.csv") as f:
            body = f.read().splitlines()[1:]
        lines.extend(body)
    _atomic_write_text(out / "metrics.csv", "\n".join(lines) + "\n")
    return out / "metrics.csv"
