"""scripts/gpu_checks.py: the published GPU tables are computed from what `measure` wrote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_checks.py"


@pytest.fixture(scope="module")
def gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(run_s_by_size: dict[int, float]) -> list[dict]:
    # The keys bench_throughput.measure gives each (group size, variant) cell.
    return [{"group_size": size, "variant": variant, "run_s": run_s, "step_s": 0.001, "evaluation_s": 0.05,
             "evaluated_images": 20_000, "evaluation_share": 0.25, "group_run_s": run_s * size, "vectorized": "x"}
            for size, run_s in run_s_by_size.items() for variant in ("none", "batch_norm", "standardization_loss")]


def test_publish_derives_runs_per_hour_and_the_main_job_from_the_measured_cells(gpu_checks, tmp_path):
    measured = {
        "torch": {"cells": _cells({1: 4.0, 4: 2.0, 10: 1.5}), "seeds": 10, "fastest_group_size": 10,
                  "matmul_flops_per_s": 5e13, "run_flops": {v: 1e12 for v in ("none", "batch_norm", "standardization_loss")}},
        "jax": {"cells": _cells({1: 6.0, 4: 3.0, 10: 4.0}), "seeds": 10, "fastest_group_size": 10,
                "matmul_flops_per_s": 4e13},
        "torch --compile": {"failed": "RuntimeError: no compiler"},
    }
    source = tmp_path / "measured"
    source.mkdir()
    (source / "throughput.json").write_text(json.dumps(measured))
    (source / "environment.json").write_text(json.dumps({
        "commit": "0123456789abcdef", "device": "cuda", "started_utc": "2026-12-03T03:00:00+00:00", "host": "h",
        "cpus": 16, "command": "scripts/gpu_checks.py measure", "engines": {"torch": {"device": "cuda: H200"}},
        "steps": {"parity": "passed", "throughput": "done", "runs": [{"backend": "torch", "exit": 0, "wall_s": 15.0}],
                  "main_job": {"command": "normbench reproduce mnist-cnn --device cuda", "backends": ["torch", "jax"],
                               "exit": 0, "wall_s": 90.0, "runs": 60, "table": "| method | backend |\n| none | torch |"}}}))
    (source / "runs.tar.gz").write_bytes(b"the runs")
    (source / "main-job.tar.gz").write_bytes(b"the job")
    (source / "parity.txt").write_text("table\n36 of 36 quantities within tolerance\n")
    out = tmp_path / "published"
    assert gpu_checks.main(["publish", str(source), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    # Runs per hour at each group size: 3600 / seconds per run.
    assert "| torch | 4.00 | 900 | 2.00 | 1800 | 1.50 | 2400 |" in readme
    assert "| jax | 6.00 | 600 | 3.00 | 1200 | 4.00 | 900 |" in readme
    # The main job: 3 variants x 10 seeds; torch's default group of 10 is also its fastest,
    # jax's default (10) is slower than its groups of 4. The floor: 4 s over 1e12 / 5e13 s.
    # Evaluation: 0.05 s for 20,000 images.
    assert "| torch | 25.0 ms | 25.0% | 200.0 | 50000 | 45 s (groups of 10) | 45 s (groups of 10) |" in readme
    assert "| jax | 25.0 ms | 25.0% | n/a | 40000 | 120 s (groups of 10) | 90 s (groups of 4) |" in readme
    assert "2.2 minutes, 1600 runs per hour" in readme  # (45 + 90) s for 60 runs
    assert "QUICK" not in readme
    assert "passed; 36 of 36 quantities within tolerance. Full table" in readme and (out / "parity.txt").exists()
    assert "torch --compile: RuntimeError: no compiler" in readme
    assert "| torch | 15.0 s | 12.0 s |" in readme  # the real runs against 3 variants x 4.0 s projected
    assert (out / "runs.tar.gz").read_bytes() == b"the runs"
    # The main job as it ran: its wall time, runs per hour (60 runs in 90 s) and its table.
    assert "60 runs in **90 s wall** (1.5 minutes, 2400 runs per hour)" in readme
    assert "| none | torch |" in readme and (out / "main-job.tar.gz").read_bytes() == b"the job"
    # Each variant's step alone (1 ms in every cell) and the standardization loss's ratio.
    assert "| torch | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 |" in readme
    assert json.loads((out / "throughput.json").read_text()) == measured
    assert json.loads((out / "provenance.json").read_text())["commit"] == "0123456789abcdef"


def test_the_compiled_backend_is_measured_last_and_none_starts_after_the_budget(gpu_checks, tmp_path):
    # A long compilation must cut the least needed measurement, and the later steps keep
    # their time: past `stop_at`, every backend is listed as skipped, none is measured.
    order = gpu_checks._backends(["torch", "jax"])
    assert order == [("torch", False), ("jax", False), ("torch", True)]
    measured = gpu_checks._throughput("cpu", ["torch", "jax"], tmp_path, stop_at=0.0)
    assert list(measured) == ["torch", "jax", "torch --compile"]
    assert all(value["failed"].startswith("skipped") for value in measured.values())
    assert json.loads((tmp_path / "throughput.json").read_text()) == measured
