"""End to end on real MNIST: `normbench run smoke --steps 5 --seeds 1`, in process and as
the installed console script, for each available backend; the stored metrics and
provenance, `normbench report`, resume and determinism.

Real MNIST is read from the data cache (~/.cache/normbench, or $NORMBENCH_DATA_DIR);
if it is absent it is fetched once (about a second).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normbench import cli, spec as spec_module

pytestmark = pytest.mark.slow

REQUIRED_COLUMNS = ["backend", "variant", "seed", "step", "split", "cross_entropy", "std_loss", "accuracy", "wall_time_s"]
SMOKE_VARIANTS = ["none", "batch_norm", "standardization_loss"]
EVAL_STEPS = [0, 5]  # eval_every = min(10, --steps 5) = 5: at step 0 and at the end
SPLITS = ["train", "test"]
NUMERIC = ["cross_entropy", "std_loss", "accuracy"]


def _args(backend, out):
    return ["run", "smoke", "--backend", backend, "--steps", "5", "--seeds", "1", "--out", str(out)]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_metrics(got: list[dict], expected: list[dict]) -> None:
    """Same rows and the same values (wall time aside); the tolerance only absorbs a
    framework's run-to-run reduction-order noise, far below any change of data or seed."""
    got, expected = _values(got), _values(expected)
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-9, err_msg=str(key))


def _values(rows: list[dict]) -> dict:
    """(variant, seed, step, split) -> metric values, wall time left out."""
    return {(r["variant"], r["seed"], r["step"], r["split"]): tuple(float(r[k]) for k in NUMERIC) for r in rows}


@pytest.fixture(scope="module")
def smoke_run(module_backend_name, tmp_path_factory):
    """One in-process `normbench run smoke` per backend, shared by the tests below."""
    out = tmp_path_factory.mktemp(f"e2e-{module_backend_name}") / "out"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = cli.main(_args(module_backend_name, out))
    assert code == 0, stderr.getvalue()
    return module_backend_name, out, stdout.getvalue()


def test_metrics_rows_and_values(smoke_run):
    backend, out, stdout = smoke_run
    assert "3 runs" in stdout and "0 reused" in stdout
    combined = _read_csv(out / "metrics.csv")
    assert combined, "empty metrics.csv"
    assert set(REQUIRED_COLUMNS) <= set(combined[0])
    # One row per run x evaluation step x split.
    keys = sorted((r["variant"], r["seed"], int(r["step"]), r["split"]) for r in combined)
    assert keys == sorted((v, "0", s, sp) for v in SMOKE_VARIANTS for s in EVAL_STEPS for sp in SPLITS)
    for row in combined:
        assert row["backend"] == backend
        for column in NUMERIC + ["wall_time_s"]:
            assert math.isfinite(float(row[column])), (column, row)
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert float(row["cross_entropy"]) > 0.0
        assert float(row["std_loss"]) >= -1e-6  # a KL divergence (up to eps)
        assert (float(row["wall_time_s"]) == 0.0) == (row["step"] == "0")
    # Each run's own metrics.csv holds its rows; together they are the combined file.
    per_run = [r for v in SMOKE_VARIANTS for r in _read_csv(out / "runs" / backend / v / "seed-0" / "metrics.csv")]
    assert _values(per_run) == _values(combined)
    values = _values(combined)
    for split in SPLITS:
        # "none" and "standardization_loss" start from the same weights: identical step-0 metrics.
        assert values[("none", "0", "0", split)] == values[("standardization_loss", "0", "0", split)]
        # Batch norm changes the function; training changes the metrics.
        assert values[("none", "0", "0", split)] != values[("batch_norm", "0", "0", split)]
        assert values[("none", "0", "5", split)] != values[("none", "0", "0", split)]
    # Untrained ten-way classifier: cross entropy near log(10).
    assert abs(values[("none", "0", "0", "test")][0] - math.log(10)) < 1.0


def test_provenance(smoke_run):
    backend, out, _ = smoke_run
    stored_spec = spec_module.load(out / "spec.toml")
    assert stored_spec.name == "smoke" and stored_spec.seeds == (0,) and stored_spec.steps == 5
    # A bundled spec is named by its place in the package, not by this checkout's path:
    # committed results regenerated on another machine keep the same provenance.
    bundled_source = "normbench/specs/smoke.toml"
    assert (out / "spec.toml").read_text().splitlines()[0] == f"# resolved spec of this sweep (source: {bundled_source})"
    for variant in SMOKE_VARIANTS:
        record = json.loads((out / "runs" / backend / variant / "seed-0" / "provenance.json").read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", record["git_commit"] or ""), record.get("git_commit")
        assert isinstance(record["git_dirty"], bool)
        assert record["backend"] == backend and record["seed"] == 0
        assert record["variant"]["name"] == variant
        assert record["spec_hash"] == stored_spec.hash()
        assert record["spec_source"] == bundled_source
        assert record["status"] == "ok" and record["steps_completed"] == 5
        versions = record["framework_versions"]
        assert versions and all(re.match(r"\d", v) for v in versions.values()), versions
        assert record["python"] == platform.python_version()
        assert record["numpy"] == np.__version__
        assert isinstance(record["device"], str) and record["device"]
        assert "cpu" in record["device"].lower()
        assert "run smoke" in record["command"] and f"--backend {backend}" in record["command"], record["command"]


def test_report_rebuilds_from_stored_metrics(smoke_run, capsys):
    backend, out, _ = smoke_run
    assert cli.main(["report", str(out)]) == 0
    products = ["table.md", "table.tex", "table.csv", "curves.png", "curves.pdf"]
    for name in products:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = _read_csv(out / "table.csv")
    assert sorted(r["variant"] for r in table) == sorted(SMOKE_VARIANTS)
    finals = {r["variant"]: float(r["accuracy"]) for r in _read_csv(out / "metrics.csv")
              if r["split"] == "test" and r["step"] == str(EVAL_STEPS[-1])}
    for row in table:
        assert row["backend"] == backend and row["n"] == "1"
        assert float(row["mean"]) == pytest.approx(100 * finals[row["variant"]], abs=1e-3)
    markdown = (out / "table.md").read_text()
    # From stored metrics only: remove the products and the combined metrics, rebuild, same table.
    for name in products + ["metrics.csv"]:
        (out / name).unlink()
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "table.md").read_text() == markdown
    assert all((out / name).is_file() for name in products)
    assert markdown.strip() in capsys.readouterr().out


def test_rerun_resumes_finished_runs(smoke_run, capsys):
    backend, out, _ = smoke_run
    before = {p: p.read_bytes() for p in sorted(out.glob("runs/*/*/seed-*/*"))}
    metrics = _read_csv(out / "metrics.csv")
    capsys.readouterr()
    assert cli.main(_args(backend, out)) == 0
    captured = capsys.readouterr()
    assert "3 reused" in captured.out, captured.out
    assert "resuming" in captured.err
    assert {p: p.read_bytes() for p in sorted(out.glob("runs/*/*/seed-*/*"))} == before  # untouched
    assert _values(_read_csv(out / "metrics.csv")) == _values(metrics)


def test_console_script_subprocess(smoke_run, tmp_path):
    """The installed `normbench` script in a fresh process, on a copy of the results with one
    run removed: it reuses the other two and trains that one again, to the same metrics."""
    backend, out, _ = smoke_run
    script = Path(sys.executable).with_name("normbench")
    assert script.is_file(), f"console script not installed next to {sys.executable}"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "runs" / backend / "batch_norm" / "seed-0")
    proc = subprocess.run([str(script), *_args(backend, "copy")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "(2 reused" in proc.stdout, proc.stdout
    _assert_same_metrics(_read_csv(copy / "metrics.csv"), _read_csv(out / "metrics.csv"))
    record = json.loads((copy / "runs" / backend / "batch_norm" / "seed-0" / "provenance.json").read_text())
    assert record["command"] == " ".join(["normbench", *_args(backend, "copy")])
