"""The asv suite (benchmarks/) stays runnable: every module imports, asv discovers every
benchmark with valid signatures, and each benchmark's setup plus one call succeeds (or
skips, as asv would) for every parameter combination, with NORMBENCH_BENCH_QUICK=1's
tiny budgets. Benchmarks are discovered and driven by asv's own runner library, so what
passes here is what `asv run` executes.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import pickle
import re
import sys
import time
from pathlib import Path

import pytest

asv_discovery = pytest.importorskip("asv_runner.discovery", reason="asv is not installed (pip install -e '.[bench]')")
from asv_runner.benchmarks._base import get_setup_cache_key  # noqa: E402
from asv_runner._aux import SpecificImporter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_DIR = ROOT / "benchmarks"
FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow")


@pytest.fixture(autouse=True)
def quick_budgets(monkeypatch):
    monkeypatch.setenv("NORMBENCH_BENCH_QUICK", "1")  # read at call time, inherited by training workers
    monkeypatch.delenv("NORMBENCH_INJECT_STEP_SLEEP_MS", raising=False)
    monkeypatch.delenv("NORMBENCH_BENCH_DEVICE", raising=False)


class _BenchmarksImporter(SpecificImporter):
    """asv's importer with `target` optional: asv_runner declares it required, and pytest's
    importlib mode calls meta-path finders with two arguments, so installing asv's own
    class breaks every test module collected after this one."""

    def find_spec(self, fullname, path=None, target=None):
        return super().find_spec(fullname, path, target)


def _discover() -> dict:
    # asv imports the folder as the package "benchmarks" through its own importer.
    sys.meta_path.insert(0, _BenchmarksImporter(BENCHMARK_DIR.name, str(BENCHMARK_DIR.parent)))
    return {b.name: b for b in asv_discovery.disc_benchmarks(str(BENCHMARK_DIR))}


BENCHMARKS = _discover()
MODULES = sorted([p.stem for p in BENCHMARK_DIR.glob("*.py") if p.stem != "__init__"]
                 + [p.name for p in BENCHMARK_DIR.iterdir() if (p / "__init__.py").exists()])
_CACHES: dict[str, object] = {}


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    try:
        importlib.import_module(f"benchmarks.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in FRAMEWORKS:
            pytest.skip(f"benchmarks/{module}.py needs {exc.name}, which is not installed")
        raise


def test_discovery_finds_the_suite():
    expected = {
        "bench_step_time.TimeStep.time_step", "bench_step_time.TimeFirstStep.time_first_step",
        "bench_ratios.NormalizationOverhead.track_overhead_vs_none", "bench_ratios.ReferenceRatio.track_ratio_to_reference",
        "bench_inference.InferenceLatency.time_predict", "bench_inference.InferenceThroughput.track_seconds_per_image",
        "bench_inference.InferenceOverhead.track_latency_vs_plain", "bench_inference.InferenceOverhead.track_per_image_vs_plain",
        *(f"bench_training.{b}Training.{m}" for b in ("Torch", "Jax", "Tensorflow")
          for m in ("track_steps_to_target", "track_final_test_error", "track_host_rss_growth")),
        *(f"bench_training.{b}DeviceMemory.track_device_peak_memory" for b in ("Torch", "Jax", "Tensorflow")),
        *(f"bench_throughput.{b}Run.{m}" for b in ("Torch", "Jax", "Tensorflow")
          for m in ("track_evaluation_seconds_per_10k_images", "track_evaluation_share", "track_run_to_flop_floor",
                    "track_matrix_product_seconds", "track_main_job_seconds", "track_evaluation_flop_share",
                    "track_main_job_flop_floor_seconds")),
        *(f"bench_throughput.{b}RunTime.track_seconds_per_run" for b in ("Torch", "Jax", "Tensorflow")),
        "bench_throughput.TorchCompiledRun.track_main_job_seconds",
        "bench_throughput.TorchCompiledRunTime.track_seconds_per_run",
        *(f"bench_throughput.{b}WorkersRun.{m}" for b in ("Torch", "TorchCompiled", "Jax", "Tensorflow")
          for m in ("track_main_job_seconds", "track_run_to_flop_floor", "track_evaluation_share")),
        *(f"bench_throughput.{b}WorkersRunTime.track_seconds_per_run" for b in ("Torch", "TorchCompiled", "Jax", "Tensorflow")),
    }
    assert expected <= set(BENCHMARKS), sorted(expected - set(BENCHMARKS))
    assert all(b.check(str(BENCHMARK_DIR)) for b in BENCHMARKS.values())


def test_every_metric_is_lower_is_better_with_a_known_unit():
    # scripts/nightly.py flags increases, with one threshold per unit.
    nightly = _load_nightly()
    for name, b in BENCHMARKS.items():
        assert b.unit in nightly.THRESHOLDS, (name, b.unit)


def test_training_caches_one_per_backend():
    """asv keys setup_cache by the defining function: each backend trains once, and its
    device-memory class reuses that training instead of running its own."""
    keys = {name: get_setup_cache_key(b._setup_cache) for name, b in BENCHMARKS.items() if name.startswith("bench_training.")}
    for backend in ("Torch", "Jax", "Tensorflow"):
        mine = {k for n, k in keys.items() if f".{backend}" in n}
        assert len(mine) == 1, (backend, mine)
    assert len(set(keys.values())) == 3


def test_throughput_measures_once_per_backend():
    """Each backend's throughput is measured once and read by both of its classes;
    PyTorch's compiled runs and each backend's runs on workers (PyTorch's eager and compiled)
    are one more measurement each."""
    keys = {name: get_setup_cache_key(b._setup_cache) for name, b in BENCHMARKS.items()
            if name.startswith("bench_throughput.")}
    measured = ("Torch", "Jax", "Tensorflow", "TorchCompiled", "TorchWorkers", "TorchCompiledWorkers", "JaxWorkers",
                "TensorflowWorkers")
    for backend in measured:
        assert len({k for n, k in keys.items() if re.match(rf"bench_throughput\.{backend}Run(Time)?\.", n)}) == 1, backend
    assert len(set(keys.values())) == len(measured)


def test_full_budgets_follow_the_paper(monkeypatch):
    monkeypatch.delenv("NORMBENCH_BENCH_QUICK")
    harness = importlib.import_module("benchmarks._harness")
    for model in harness.MODELS:
        for normalization in harness.NORMALIZATIONS:
            spec, variant = harness.training_spec(model, normalization)
            assert (spec.steps_for(variant), spec.batch_size, spec.eval_every, spec.seeds) == (1000, 128, 50, (0,))
            assert (spec.optimizer.name, spec.optimizer.learning_rate) == ("sgd", 1e-3)
            assert harness._variant_key(variant) == normalization
            # Steps to the target are resolved to 5% by the evaluation grid.
            assert spec.eval_resolution == harness.STEP_RESOLUTION == 0.05
        assert harness.baseline_normalization(model) == "none"
    # The grid is the bundled specs' variants: the paper's three methods on both models.
    assert harness.NORMALIZATIONS == ["none", "batch_norm_shift", "standardization_loss"]
    assert harness.MODELS == ["cnn3", "mlp3"]


def test_injected_sleep_lands_inside_the_timed_step(monkeypatch):
    harness = importlib.import_module("benchmarks._harness")
    backend = next((b for b in harness.BACKENDS if harness.registry.is_available(b)), None)
    if backend is None:
        pytest.skip("no backend available")
    stepper = harness.Stepper(backend, harness.training_plan("mlp3", "none"), "cpu")
    monkeypatch.setenv("NORMBENCH_INJECT_STEP_SLEEP_MS", "200")
    # A sleep lasts at least its duration: every timed step must, whatever the machine's load.
    assert harness.side_by_side_medians([stepper.step], 3)[0] >= 0.2


def test_ratios_outside_quick_runs_are_medians_of_fresh_processes(monkeypatch):
    """A ratio that declares `processes` records the median over that many new worker
    processes, each preparing and timing its own steppers; this process builds none."""
    harness = importlib.import_module("benchmarks._harness")
    ratios = importlib.import_module("benchmarks.bench_ratios")
    assert harness.ratio_processes(ratios.NormalizationOverhead.processes) == 0  # quick: in this process
    monkeypatch.delenv("NORMBENCH_BENCH_QUICK")
    assert harness.ratio_processes(ratios.NormalizationOverhead.processes) == ratios.NormalizationOverhead.processes == 3
    assert harness.ratio_processes(ratios.MethodOverhead.processes) == 0
    backend = next((b for b in ("torch", "tensorflow", "jax") if harness.registry.is_available(b)), None)
    if backend is None:
        pytest.skip("no backend available")
    # The workers inherit quick budgets (3 rounds each); the path is the nightly one.
    monkeypatch.setenv("NORMBENCH_BENCH_QUICK", "1")
    params = (backend, "mlp3", "standardization_loss", "cpu")
    warm_before = dict(harness._WARM)
    median, measured = harness.median_ratio_in_fresh_processes(ratios.NormalizationOverhead, params, 2)
    assert harness._WARM == warm_before
    pids = {m["pid"] for m in measured}
    assert len(pids) == 2 and os.getpid() not in pids
    for m in measured:
        assert m["mine_s"] > 0 and m["other_s"] > 0 and m["ratio"] == pytest.approx(m["mine_s"] / m["other_s"])
    assert median == pytest.approx((measured[0]["ratio"] + measured[1]["ratio"]) / 2)


def test_runs_on_workers_are_timed_at_once_each_worker_on_its_own_core():
    """`--executor processes` as measured: one new process per core, each bound to its
    share with one thread, timing while the others time (the intervals overlap); the
    machine's time per run is one over the sum of the workers' rates."""
    harness = importlib.import_module("benchmarks._harness")
    throughput = importlib.import_module("benchmarks.bench_throughput")
    workers = importlib.import_module("normbench.executors.processes").default_workers()
    if workers < 2:
        pytest.skip("one core: no workers to measure")
    backend = next((b for b in ("torch", "tensorflow", "jax") if harness.registry.is_available(b)), None)
    if backend is None:
        pytest.skip("no backend available")
    result = throughput.measure_on_workers(backend)
    per_worker = result["per_worker"]
    assert result["workers"] == len(per_worker) == workers
    pids = {w["pid"] for w in per_worker}
    assert len(pids) == workers and os.getpid() not in pids
    cores = sorted(os.sched_getaffinity(0))
    for i, w in enumerate(per_worker):
        assert w["cores"] == importlib.import_module("normbench.executors.processes").worker_cores(i, workers, cores)
        assert w["threads"] == str(max(1, len(cores) // workers))  # its share of the cores it may run on
    assert max(w["timed_from"] for w in per_worker) < min(w["timed_until"] for w in per_worker)
    for cell in result["cells"]:
        rates = [1.0 / w["run_s"][cell["variant"]] for w in per_worker]
        assert cell["run_s"] == pytest.approx(1.0 / sum(rates))
    assert result["matmul_flops_per_s"] == pytest.approx(sum(w["matmul_flops_per_s"] for w in per_worker))


def test_a_failed_concurrent_worker_stops_the_others_at_once(tmp_path):
    """bench_throughput's workers wait for each other: one that dies must not leave the
    rest waiting out their timeouts."""
    harness = importlib.import_module("benchmarks._harness")
    (tmp_path / "wait.py").write_text("import time\ntime.sleep(120)\n")
    slow = {"module": "runpy", "function": "run_path", "kwargs": {"path_name": str(tmp_path / "wait.py")}}
    broken = {"module": "json", "function": "loads", "kwargs": {"s": "{"}}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="worker 1 failed"):
        harness.in_concurrent_processes([slow, broken], [cores, cores], 1, "test", timeout_s=600)
    assert time.monotonic() - started < 60


def test_the_machine_figures_of_workers_are_one_over_the_sum_of_their_rates():
    throughput = importlib.import_module("benchmarks.bench_throughput")

    def worker(run_s, step_s, rate):
        cells = [{"group_size": 1, "variant": "a", "run_s": run_s, "group_run_s": run_s, "step_s": step_s,
                  "evaluation_s": 2.0, "evaluation_share": 0.5, "evaluated_images": 100}]
        return {"cells": cells, "matmul_flops_per_s": rate, "matrix_product_s": 8e9 / rate, "seeds": 10,
                "device_description": "cpu (1 threads)", "pid": 1, "cores": [0], "threads": "1",
                "timed_from": 0.0, "timed_until": 1.0, "run_flops": {"a": 1e12}}

    machine = throughput.on_the_machine([worker(20.0, 0.010, 1e11), worker(30.0, 0.015, 0.5e11)])
    (cell,) = machine["cells"]
    assert cell["run_s"] == pytest.approx(12.0) and cell["step_s"] == pytest.approx(0.006)
    assert cell["evaluation_s"] == pytest.approx(1.0) and cell["evaluation_share"] == 0.5
    assert machine["matmul_flops_per_s"] == pytest.approx(1.5e11)
    assert machine["matrix_product_s"] == pytest.approx(8e9 / 1.5e11)
    assert "pid" not in machine and [w["run_s"] for w in machine["per_worker"]] == [{"a": 20.0}, {"a": 30.0}]
    # The floor ratio reads the machine's time against the machine's rate.
    run = throughput.TorchWorkersRun()
    assert run.track_run_to_flop_floor(machine) == pytest.approx(12.0 / (1e12 / 1.5e11))
    assert run.track_main_job_seconds(machine) == pytest.approx(120.0)
    with pytest.raises(RuntimeError, match="different variants"):
        other = worker(30.0, 0.015, 0.5e11)
        other["cells"][0]["variant"] = "b"
        throughput.on_the_machine([worker(20.0, 0.010, 1e11), other])


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_once(name):
    """asv's sequence for every parameter combination: setup_cache (once per key, through
    pickle), setup (NotImplementedError = skip), one call, teardown."""
    benchmark = BENCHMARKS[name]
    cache = None
    if benchmark.setup_cache_key is not None:
        if benchmark.setup_cache_key not in _CACHES:
            # `asv run` pickles what setup_cache returns and loads it in each benchmark's
            # own process: go through the same round trip.
            _CACHES[benchmark.setup_cache_key] = pickle.loads(pickle.dumps(benchmark.do_setup_cache()))
        cache = _CACHES[benchmark.setup_cache_key]
    combinations = math.prod(len(p) for p in benchmark._params) if benchmark._params else 1
    ran, skipped = 0, []
    for index in range(combinations):
        if benchmark._params:
            benchmark.set_param_idx(index)
        benchmark.set_cache(cache)
        if benchmark.do_setup():
            skipped.append(benchmark._current_params)
            continue
        try:
            value = benchmark.func(*benchmark._build_params())
        finally:
            benchmark.do_teardown()
        ran += 1
        if benchmark.type == "track":
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (benchmark._current_params, value)
    if not ran:
        pytest.skip(f"every parameter combination skipped here ({len(skipped)})")


@pytest.fixture(autouse=True)
def one_benchmarks_warm_state():
    """asv runs each benchmark in a process of its own, so the trainers and predictors a
    benchmark warms up (`_harness._WARM`, `_WARM_PREDICTORS`) never outlive it there. Here
    they would pile up in one process: after the architecture, ratio and throughput grids
    the worker held 13 GB. Engines, data and setup_cache results stay shared."""
    yield
    harness = sys.modules.get("benchmarks._harness")
    if harness is not None:
        harness._WARM.clear()
        harness._WARM_PREDICTORS.clear()
        gc.collect()


def _load_nightly():
    spec = importlib.util.spec_from_file_location("normbench_nightly", ROOT / "scripts" / "nightly.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("normbench_nightly", module)
    spec.loader.exec_module(module)
    return module


class _FakeResult:
    """The slice of asv's Results API that scripts/nightly.py reads."""

    def __init__(self, values: dict, env_name="env", version="v1"):
        self.env_name, self._values, self.benchmark_version = env_name, values, {k: version for k in values}

    def get_all_result_keys(self):
        return self._values.keys()

    def get_result_params(self, key):
        return [["'torch'"], ["'cpu'", "'cuda'"]]

    def get_result_value(self, key, params):
        return self._values[key]

    def get_result_stats(self, key, params):
        return None

    def get_result_samples(self, key, params):
        return None


def test_nightly_flags_regressions_by_unit_threshold():
    nightly = _load_nightly()
    nan = float("nan")
    units = {"t": "seconds", "m": "bytes", "s": "steps", "gone": "seconds"}
    base = [_FakeResult({"t": [1.0, nan], "m": [100e6, nan], "s": [500, nan], "gone": [1.0, nan]})]
    current = [_FakeResult({"t": [1.25, nan], "m": [100e6 + 8 * 2**20, nan], "s": [600, nan], "gone": [None, nan]})]
    rows = nightly.compare(base, current, units, lambda key, params: True)
    status = {(r["benchmark"], r["params"]): r["status"] for r in rows}
    assert status == {
        ("t", ("torch", "cpu")): "REGRESSION",  # +25% > +20%
        ("m", ("torch", "cpu")): "ok",  # +8% and under the 16 MiB floor
        ("s", ("torch", "cpu")): "ok",  # +20% <= +25%
        ("gone", ("torch", "cpu")): "FAILED",
    }  # skipped on both sides (cuda): not listed
    assert "| REGRESSION | `t` | torch, cpu | 1 s | 1.25 s | +25.0% | +20% |" in nightly.markdown(rows, "a" * 40, "b" * 40, "m")


class _FakeGridResult(_FakeResult):
    """A recorded run over the suite's real grids (backend x model x normalization x device
    for timings; model x normalization x device for a backend's training class)."""

    started_at = {"bench": 1795570000000}
    params = {"python": "/nonexistent/python"}

    def get_result_params(self, key):
        if ".Method" in key:  # the methods grid: backend x variant x device
            return [["'torch'", "'jax'"], ["'cnn3-none'", "'cnn3-group-norm'"], ["'cpu'", "'cuda'"]]
        grid = [["'cnn3'"], ["'none'", "'batch_norm_shift'"], ["'cpu'", "'cuda'"]]
        return [["'torch'"], *grid] if key.startswith("bench_step_time") else grid


def test_nightly_export_writes_every_recorded_value_and_skips_the_absent(tmp_path):
    nightly = _load_nightly()
    nan = float("nan")
    method_ratio = "bench_ratios.MethodReferenceRatio.track_ratio_to_reference"
    result = _FakeGridResult({"bench_step_time.TimeStep.time_step": [0.0123, nan, 0.0111, nan],
                              "bench_training.JaxTraining.track_final_test_error": [0.86, nan, 0.1424, nan],
                              method_ratio: [1.05, nan, 1.31, nan, 0.98, nan, nan, nan]})
    names = ["model", "normalization", "device"]
    benchmarks = {"bench_step_time.TimeStep.time_step": {"unit": "seconds", "param_names": ["backend", *names]},
                  "bench_training.JaxTraining.track_final_test_error": {"unit": "fraction", "param_names": names},
                  method_ratio: {"unit": "ratio", "param_names": ["backend", "variant", "device"]}}
    info = {"cpu": "Test CPU", "num_cpu": "2", "ram": str(8 * 2**30), "os": "Linux"}
    written = nightly.export([result], benchmarks, "m", info, "c" * 40, tmp_path, "python scripts/nightly.py --export x")
    rows = (tmp_path / "benchmarks.csv").read_text().splitlines()
    assert rows[1:] == [  # cuda was skipped (n/a): left out
        f"{method_ratio},ratio,torch,,,cnn3-none,cpu,1.05",
        f"{method_ratio},ratio,torch,,,cnn3-group-norm,cpu,1.31",
        f"{method_ratio},ratio,jax,,,cnn3-none,cpu,0.98",
        "bench_step_time.TimeStep.time_step,seconds,torch,cnn3,none,,cpu,0.0123",
        "bench_step_time.TimeStep.time_step,seconds,torch,cnn3,batch_norm_shift,,cpu,0.0111",
        "bench_training.JaxTraining.track_final_test_error,fraction,,cnn3,none,,cpu,0.86",
        "bench_training.JaxTraining.track_final_test_error,fraction,,cnn3,batch_norm_shift,,cpu,0.1424"]
    text = (tmp_path / "README.md").read_text()
    assert "| torch | cnn3 | 12.3 ms | 11.1 ms |" in text
    assert "| jax | cnn3 | 86.00% | 14.24% |" in text  # the backend of a training class comes from its name
    assert "| variant | torch | jax |" in text  # the methods grid: a row per variant, a column per backend
    assert "| cnn3-none | 1.050 | 0.980 |" in text and "| cnn3-group-norm | 1.310 | — |" in text
    assert "cuda" not in text
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["commit"] == "c" * 40 and provenance["records"] == 7 and "no longer exists" in provenance["packages"]
    extensions = provenance["cpu_vector_extensions"]  # what the CPU name leaves out (nightly._vector_extensions)
    assert isinstance(extensions, list) and all(e.startswith(("avx", "amx", "fma", "sse4")) for e in extensions)
    assert f"(CPU extensions: {', '.join(extensions)}; last-level cache: {provenance['cpu_last_level_cache']})" in text
    assert "no longer exists" in provenance["backend_devices"] and "Backends' CPU devices" not in text
    assert [p.name for p in written] == ["README.md", "benchmarks.csv", "provenance.json"]


def test_nightly_export_names_each_backends_cpu_device():
    """Which kernels a framework runs depends on more than its version (TensorFlow: oneDNN's
    or Eigen's), so the export asks each engine, in the recording interpreter."""
    from normbench import backends

    nightly = _load_nightly()
    devices = nightly._backend_devices(sys.executable)
    assert set(devices) == {n for n in backends.names() if backends.is_available(n)}
    assert all(text.startswith("cpu") for text in devices.values())
    if "tensorflow" in devices:
        assert devices["tensorflow"].endswith(("oneDNN kernels)", "Eigen kernels)", "unknown kernels)"))
    assert nightly._devices_sentence(devices).startswith("Backends' CPU devices: ")


def test_nightly_export_gives_the_architectures_grid_a_row_per_architecture_and_variant(tmp_path):
    nightly = _load_nightly()
    key = "bench_architectures.ArchitectureStep.time_step"
    result = _FakeGridResult({key: [0.5, 0.25, 0.75, 1.5]})
    result.get_result_params = lambda k: [["'torch'"], ["'resnet-small'", "'pointnet-small'"], ["'batch_norm'", "'std'"]]
    benchmarks = {key: {"unit": "seconds", "param_names": ["backend", "architecture", "variant"]}}
    info = {"cpu": "Test CPU", "num_cpu": "2", "ram": str(8 * 2**30), "os": "Linux"}
    nightly.export([result], benchmarks, "m", info, "c" * 40, tmp_path, "x")
    text = (tmp_path / "README.md").read_text()
    assert "| architecture | variant | torch |" in text
    assert "| resnet-small | batch_norm | 500 ms |" in text and "| pointnet-small | std | 1.5 s |" in text
    assert (tmp_path / "benchmarks.csv").read_text().splitlines()[0].split(",")[4] == "architecture"


def test_nightly_export_gives_the_inference_grid_a_row_per_case(tmp_path):
    nightly = _load_nightly()
    nan = float("nan")
    key = "bench_inference.InferenceLatency.time_predict"
    result = _FakeGridResult({key: [0.002, 0.001, nan]})
    result.get_result_params = lambda k: [["'jax'"], ["'resnet-small:batch_norm:unfolded'",
                                                      "'resnet-small:batch_norm:folded'", "'resnet-small:group_norm:unfolded'"]]
    benchmarks = {key: {"unit": "seconds", "param_names": ["backend", "case"]}}
    info = {"cpu": "Test CPU", "num_cpu": "2", "ram": str(8 * 2**30), "os": "Linux"}
    nightly.export([result], benchmarks, "m", info, "c" * 40, tmp_path, "x")
    text = (tmp_path / "README.md").read_text()
    assert "| case | jax |\n|---|---|" in text
    assert "| resnet-small:batch_norm:unfolded | 2 ms |" in text and "| resnet-small:batch_norm:folded | 1 ms |" in text
    assert "group_norm" not in text  # not measured: left out
    rows = (tmp_path / "benchmarks.csv").read_text().splitlines()
    assert rows[0] == "benchmark,unit,backend,model,normalization,variant,case,device,value"
    assert rows[2] == f"{key},seconds,jax,,,,resnet-small:batch_norm:folded,,0.001"


def test_the_inference_grid_is_every_valid_case_once():
    """Cases exist only where they run: 'folded' only for a method that folds; the CI sample
    keeps one that folds (both forms) and one computed at every prediction."""
    harness = importlib.import_module("benchmarks._harness")
    cases = harness.inference_cases()
    assert len(cases) == len(set(cases)) and all(c.count(":") == 2 for c in cases)
    folded = {c.rsplit(":", 1)[0] for c in cases if c.endswith(":folded")}
    assert folded and folded <= {c.rsplit(":", 1)[0] for c in cases if c.endswith(":unfolded")}
    assert not any("group" in c or "layer-norm" in c for c in folded)


def test_every_inference_overhead_divides_by_the_plain_network_of_its_own_architecture(monkeypatch):
    monkeypatch.delenv("NORMBENCH_BENCH_QUICK")
    harness = importlib.import_module("benchmarks._harness")
    cases, overhead = harness.inference_cases(), harness.inference_overhead_cases()
    plains = {harness.inference_baseline(c) for c in cases}
    # Each plain network is measured on its own (InferenceLatency) and is never its own numerator.
    assert plains <= set(cases) and not plains & set(overhead)
    assert set(overhead) | plains == set(cases)
    assert len(plains) == len(harness.ARCHITECTURES) + 1  # cnn3 and each small architecture
    for case in overhead:
        plain = harness.inference_baseline(case)
        assert plain.split(":")[0] == case.split(":")[0] and plain.endswith(":unfolded")
        variant = harness.inference_plan(*plain.split(":")[:2]).variant
        assert variant.normalization.name == "none" and not variant.auxiliary_losses and not variant.affine, case


def test_nightly_keeps_a_timing_regression_only_when_a_second_measurement_confirms_it():
    nightly = _load_nightly()
    nan = float("nan")
    units = {"t": "seconds", "u": "seconds", "s": "steps", "m": "bytes"}
    base = [_FakeResult({"t": [1.0, nan], "u": [1.0, nan], "s": [500, nan], "m": [300e6, nan]})]
    first = [_FakeResult({"t": [1.3, nan], "u": [1.3, nan], "s": [700, nan], "m": [600e6, nan]})]
    second = [_FakeResult({"t": [1.3, nan], "u": [1.05, nan], "s": [700, nan], "m": [310e6, nan]})]
    everything = lambda key, params: True
    asked = []

    def remeasure(regexes):
        asked.extend(regexes)
        return nightly.compare(base, second, units, everything)

    rows = nightly.confirm_regressions(nightly.compare(base, first, units, everything), remeasure)
    status = {r["benchmark"]: r["status"] for r in rows}
    # t stays slow: confirmed; u and the memory m were noise; steps are deterministic and never re-measured.
    assert status == {"t": "REGRESSION", "u": "unconfirmed", "s": "REGRESSION", "m": "unconfirmed"}
    assert asked == [r"^m\('torch',\ 'cpu'\)$", r"^t\('torch',\ 'cpu'\)$", r"^u\('torch',\ 'cpu'\)$"]
    assert re.search(asked[1], "t('torch', 'cpu')") and not re.search(asked[1], "t('torch', 'cuda')")
    md = nightly.markdown(rows, "a" * 40, "b" * 40, "m")
    assert "*unconfirmed*: over its threshold when first measured (`m` torch, cpu 572.2 MiB, `u` torch, cpu 1.3 s)" in md
    # Nothing flagged: nothing re-measured.
    assert nightly.confirm_regressions(nightly.compare(base, base, units, everything), remeasure) and len(asked) == 3


def test_nightly_re_measures_an_unparameterized_benchmark_by_its_name_alone():
    """asv names an unparameterized benchmark without `()`: the regex must select it."""
    nightly = _load_nightly()
    regex = nightly._combination_regex("bench_throughput.JaxRun.track_run_to_flop_floor", ())
    assert re.search(regex, "bench_throughput.JaxRun.track_run_to_flop_floor")
    assert not re.search(regex, "bench_throughput.JaxRun.track_run_to_flop_floor_gpu")
    assert nightly._combination_regex("t", ("torch", "cpu")) == r"^t\('torch',\ 'cpu'\)$"


def test_the_main_jobs_wall_time_sums_one_share_per_framework():
    """PyTorch's compiled runs are a column "torch --compile" of their own; the main job's
    total counts each framework once: its default mode, and then its fastest mode."""
    nightly = _load_nightly()
    share = "track_main_job_seconds"
    records = [{"benchmark": f"bench_throughput.{cls}Run.{share}", "value": value}
               for cls, value in (("Torch", 600.0), ("Jax", 900.0), ("Tensorflow", 300.0), ("TorchCompiled", 480.0))]
    assert [nightly._backend_of(r) for r in records] == ["torch", "jax", "tensorflow", "torch --compile"]
    workers = {"benchmark": f"bench_throughput.JaxWorkersRun.{share}", "value": 720.0}
    assert nightly._backend_of(workers) == "jax --executor processes"
    compiled_workers = {"benchmark": f"bench_throughput.TorchCompiledWorkersRunTime.{share}", "value": 360.0}
    assert nightly._backend_of(compiled_workers) == "torch --compile --executor processes"
    assert ("(torch --compile --executor processes 6.0, jax --executor processes 12.0, tensorflow 5.0)"
            in nightly._throughput_summary(records + [workers, compiled_workers])[2])
    assert "(torch --compile 8.0, jax --executor processes 12.0, tensorflow 5.0)" in nightly._throughput_summary(records + [workers])[2]
    lines = nightly._throughput_summary(records)
    assert lines[0].startswith("The main job's wall time (the backends one after another): 30.0 minutes (torch 10.0")
    assert lines[2].startswith("The main job's wall time with each framework's fastest option (the backends one after "
                               "another): 28.0 minutes (torch --compile 8.0, jax 15.0, tensorflow 5.0)")
    # Compiled slower than eager: the fastest total is the default one, printed once.
    records[-1]["value"] = 700.0
    assert [line for line in nightly._throughput_summary(records) if line] == [lines[0]]
    assert len([line for line in nightly._throughput_summary(records[::-1]) if line]) == 1  # whatever the order


def test_the_main_jobs_flop_floor_sums_the_default_backends_and_divides_their_wall_time():
    nightly = _load_nightly()
    records = [{"benchmark": f"bench_throughput.{cls}Run.{track}", "value": value}
               for cls, track, value in (("Torch", "track_main_job_seconds", 600.0), ("Jax", "track_main_job_seconds", 900.0),
                                         ("TorchCompiled", "track_main_job_seconds", 480.0),
                                         ("Torch", "track_main_job_flop_floor_seconds", 240.0),
                                         ("Jax", "track_main_job_flop_floor_seconds", 360.0),
                                         ("TorchCompiled", "track_main_job_flop_floor_seconds", 230.0))]
    floor = [line for line in nightly._throughput_summary(records) if "FLOP floor" in line]
    # The compiled column has a floor of its own (its process's matmul rate); the total is
    # the default backends', beside their wall time (1500 s / 600 s).
    assert floor == ["The main job's FLOP floor (every run's FLOPs at the matrix-multiply rate each backend measured "
                     "beside its steps): 10.0 minutes (torch 4.0, jax 6.0); the wall time of the same backends is 2.50x it."]


def test_the_throughput_floor_figures_follow_from_the_counted_flops():
    """The main job's floor is the spec's seeds times every variant's run FLOPs over the
    rate; the evaluation FLOP share is the variants' mean of evaluation / run FLOPs."""
    throughput = importlib.import_module("benchmarks.bench_throughput")
    cells = [{"group_size": 1, "variant": v, "run_s": 20.0} for v in ("a", "b")]
    cache = {"cells": cells, "seeds": 10, "matmul_flops_per_s": 1e11,
             "run_flops": {"a": 1.0e12, "b": 2.0e12}, "evaluation_flops": {"a": 0.5e12, "b": 0.5e12}}
    run = throughput.TorchRun()
    assert run.track_main_job_flop_floor_seconds(cache) == pytest.approx(10 * 3.0e12 / 1e11)
    assert run.track_evaluation_flop_share(cache) == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(throughput.SkipNotImplemented):
        run.track_evaluation_flop_share({"cells": cells, "seeds": 10, "matmul_flops_per_s": 1e11})


def test_steps_to_target_reads_the_baselines_best_accuracy_and_never_reports_the_budget():
    harness = importlib.import_module("benchmarks._harness")

    def run(curve):
        return {"test_accuracy": curve, "budget": 1000, "final_test_error": 1 - curve[-1][1]}

    cache = {"runs": {
        harness.run_key("cnn3", "none", "cpu"): run([(0, 0.1), (500, 0.3), (900, 0.42), (1000, 0.41)]),
        harness.run_key("cnn3", "batch_norm_shift", "cpu"): run([(0, 0.1), (95, 0.40), (100, 0.43), (1000, 0.9)]),
        harness.run_key("cnn3", "standardization_loss", "cpu"): run([(0, 0.1), (1000, 0.30)]),
    }}
    bn = harness.steps_to_target(cache, "cnn3", "batch_norm_shift", "cpu")
    assert (bn["target"], bn["steps"], bn["resolution"]) == (0.42, 100, 5)
    assert harness.steps_to_target(cache, "cnn3", "none", "cpu")["steps"] == 900
    assert harness.steps_to_target(cache, "cnn3", "standardization_loss", "cpu")["steps"] is None
    training = importlib.import_module("benchmarks.bench_training")
    bench = training.TorchTraining()
    with pytest.raises(NotImplementedError):
        bench.track_steps_to_target(cache, "cnn3", "standardization_loss", "cpu")
    assert bench.track_steps_to_target(cache, "cnn3", "batch_norm_shift", "cpu") == 100
