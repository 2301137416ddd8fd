"""Adding a normalization method is one new file: the example of docs/extending.md,
dropped into a temporary copy of the package, is listed, validated, trained and
parity-tested with no other edit anywhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normbench import backends

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "extending.md"


def _example_method() -> str:
    """The method file shown in the guide (so the guide's example is what is tested)."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    method = [b for b in blocks if "METHOD = " in b]
    assert len(method) == 1, "docs/extending.md should show exactly one complete method file"
    return method[0]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the package (normbench/, backends/, datasets/) with the guide's method dropped in."""
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("normbench", "backends", "datasets"):
        shutil.copytree(ROOT / folder, root / folder, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "normbench" / "normalizations" / "rms_norm.py").write_text(_example_method())
    return root


def _normbench(checkout: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # The copy first on the path: it, not the installed normbench, answers.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.run([sys.executable, "-m", "normbench.cli", *args], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _spec(checkout: Path, normalization: str, name: str) -> Path:
    path = checkout / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        model = "cnn-tiny"
        dataset = "mnist"
        dtype = "float64"
        batch_size = 16
        steps = 3
        eval_every = 3
        train_eval_examples = 64
        seeds = 1
        [optimizer]
        name = "sgd"
        learning_rate = 0.05
        [[variant]]
        name = "rms"
        normalization = {normalization}
        """))
    return path


def test_new_method_is_listed_and_documented(checkout):
    proc = _normbench(checkout, "specs", "--format")
    assert proc.returncode == 0, proc.stderr
    assert "\n  rms_norm " in proc.stdout and "per-example root-mean-square" in proc.stdout
    assert "      epsilon (" in proc.stdout.split("\n  rms_norm ", 1)[1]
    listing = _normbench(checkout, "list")
    assert listing.returncode == 0, listing.stderr
    assert "rms_norm" in listing.stdout


def test_new_method_options_are_validated(checkout):
    bad = _spec(checkout, '{ name = "rms_norm", epsilon = -1.0 }', "bad")
    proc = _normbench(checkout, "run", str(bad), "--backend", backends.names()[0], "--out", str(checkout / "never"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "variant[0].normalization.epsilon: must be > 0.0" in lines[0], proc.stderr
    assert not (checkout / "never").exists()


@pytest.mark.slow
def test_new_method_trains_and_passes_parity(checkout):
    available = backends.available()
    if not available:
        pytest.skip("no backend installed")
    spec = _spec(checkout, '"rms_norm"', "good")
    run = _normbench(checkout, "run", str(spec), "--backend", available[0], "--out", str(checkout / "runs"), "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1 runs in" in run.stdout and "rms/seed-0" in run.stdout
    if len(available) < 2:
        pytest.skip("parity needs two installed backends")
    parity = _normbench(checkout, "parity", str(spec), "--steps", "3", "--dtype", "float64")
    assert parity.returncode == 0, parity.stdout[-3000:] + parity.stderr[-2000:]
    assert "FAIL" not in parity.stdout
    assert "| gradient |" in parity.stdout
    # The method's own parameter is among those compared: the new file really ran everywhere.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    names = subprocess.run([sys.executable, "-c", "import sys; from normbench import spec, plan; "
                            "s = spec.load(sys.argv[1]); print(sorted(plan.resolve(s, 'rms').initial_parameters(0)[0]))",
                            str(spec)], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert "'conv1/scale'" in names.stdout and "'conv1/bias'" in names.stdout, names.stderr
