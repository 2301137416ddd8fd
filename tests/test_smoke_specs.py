"""Every architecture's bundled smoke spec (`normbench/specs/smoke-<architecture>.toml`)
trains its few steps through the real pipeline (`normbench run`, real data) with every
method it lists, on one backend per test (PyTorch first: the one every CI job has). The
other backends' agreement on these networks is the parity tests' job."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from normbench import architectures, backends, cli, spec as spec_module

pytestmark = pytest.mark.slow

SMOKE_SPECS = sorted(name for name in spec_module.bundled_specs() if name.startswith("smoke-"))


def test_every_paper_architecture_has_a_smoke_spec():
    covered = {spec_module.load(name).model for name in SMOKE_SPECS}
    families = {"resnet-small", "inception-v2-small", "mobilenet-v1-small", "pointnet-small"}
    assert families <= covered, sorted(families - covered)
    assert all(architectures.get(model).small for model in covered)


@pytest.mark.parametrize("name", SMOKE_SPECS)
def test_smoke_spec_trains(name, tmp_path):
    available = backends.available()
    if not available:
        pytest.skip("no backend installed")
    backend = "torch" if "torch" in available else available[0]
    spec = spec_module.load(name)
    out = tmp_path / name
    assert cli.main(["run", name, "--backend", backend, "--out", str(out)]) == 0
    for variant in spec.variants:
        run_dir = out / "runs" / backend / variant.name / "seed-0"
        record = json.loads((run_dir / "provenance.json").read_text())
        assert record["status"] == "ok", (variant.name, record.get("non_finite"))
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {(int(r["step"]), r["split"]) for r in rows} == {(s, split) for s in (0, spec.steps) for split in ("train", "test")}
        assert all(math.isfinite(float(r["cross_entropy"])) and 0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
        # It trained: the test cross entropy moved.
        test = {int(r["step"]): float(r["cross_entropy"]) for r in rows if r["split"] == "test"}
        assert test[spec.steps] != test[0], variant.name
