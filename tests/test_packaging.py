"""The package works however it is installed, and from whatever directory.

- Run from the repository root (`python -m normbench.cli` there puts the root first on
  sys.path), `normbench` is the checkout's folder, which has no `backends/` or `datasets/`
  inside; `normbench.backends` and `normbench.datasets` must still resolve, to the same
  checkout, and never as bare top-level `backends` / `datasets`. The subprocesses here
  start without site's .pth files, so an editable install's import hook cannot hide a
  failure (it did: CI installs with `pip install -e`, `tox -e torch` does not).
- A wheel built the way tox builds one (an sdist, then a wheel from it) holds every
  sub-package and data file of `normbench/`, `backends/` and `datasets/` (the package list
  is computed in setup.py, so one added later is never left out), and works on its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> package name
FOLDERS = {"normbench": "normbench", "backends": "normbench.backends", "datasets": "normbench.datasets"}


def _site_dirs() -> list[str]:
    """This environment's site-packages, to add to sys.path without processing .pth files."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def _python_without_pth(code: str, *, first: Path, cwd: Path) -> dict:
    """Run `code` with `first` at the front of sys.path, then site-packages (no .pth hooks)."""
    prelude = f"import sys; sys.path[:1] = [{str(first)!r}]; sys.path += {_site_dirs()!r}\n"
    proc = subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _package_files(kind: str) -> set[str]:
    """Paths, as installed, of the repository's files with suffix `kind` in the three folders."""
    found = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob(f"*{kind}"):
            if "__pycache__" not in path.parts:
                found.add("/".join([*package.split("."), *path.relative_to(ROOT / folder).parts]))
    return found


IMPORT_CHECK = """
    import contextlib, importlib, importlib.resources, io, json, sys
    import normbench, normbench.backends, normbench.datasets, normbench.datasets.mnist
    import normbench.backends.base, normbench.backends.torch, normbench.backends.jax, normbench.backends.tensorflow
    from normbench import cli
    bare = {}
    for name in ("backends", "datasets"):
        try:
            bare[name] = importlib.import_module(name).__file__
        except ImportError as error:
            bare[name] = "ImportError: " + str(error)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli.main(["backends"])
    print(json.dumps({
        "files": {m: sys.modules[m].__file__ for m in ("normbench", "normbench.backends", "normbench.datasets",
                                                       "normbench.backends.torch", "normbench.datasets.mnist")},
        "bare": bare, "cli": [code, out.getvalue()],
        "finder": [type(f).__name__ if not isinstance(f, type) else f.__name__ for f in sys.meta_path],
        "specs": sorted(p.name for p in importlib.resources.files("normbench").joinpath("specs").iterdir()),
    }))
"""


def _check_imports(result: dict, base: Path, *, checkout: bool) -> None:
    files = {m: Path(f).resolve() for m, f in result["files"].items()}
    for module, file in files.items():
        assert base in file.parents, f"{module} imported from {file}, not from {base}"
    where = {"normbench.backends": "backends", "normbench.datasets": "datasets"} if checkout else {
        "normbench.backends": "normbench/backends", "normbench.datasets": "normbench/datasets"}
    for module, folder in where.items():
        assert files[module] == base / folder / "__init__.py"
    for name, what in result["bare"].items():
        # `backends` / `datasets` are either someone else's packages or not importable; never ours.
        assert what.startswith("ImportError") or (base not in Path(what).resolve().parents), f"`import {name}` gave {what}"
    code, listing = result["cli"]
    assert code == 0 and "torch" in listing and "tensorflow" in listing
    assert "mnist-cnn.toml" in result["specs"]
    assert ("CheckoutFinder" in result["finder"]) == checkout


def test_checkout_imports_from_repository_root():
    """The reported failure: the checkout first on sys.path, whatever normbench is installed."""
    result = _python_without_pth(IMPORT_CHECK, first=ROOT, cwd=ROOT)
    _check_imports(result, ROOT, checkout=True)
    for name in ("backends", "datasets"):  # the checkout's folders come first and refuse the bare name
        assert "never a top-level package" in result["bare"][name], result["bare"][name]


def test_cli_module_runs_from_repository_root(tmp_path):
    """`python -m normbench.cli` in the repository root, without any editable-install hook."""
    code = """
        import runpy, sys
        sys.argv = ["normbench", "backends"]
        try:
            runpy.run_module("normbench.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            assert not exit.code, exit.code
        print("{}")
    """
    prelude = f"import sys; sys.path[:1] = [{str(ROOT)!r}]; sys.path += {_site_dirs()!r}\n"
    proc = subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch" in proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from an sdist (as tox does) of a copy of the project's sources."""
    if importlib.util.find_spec("build") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("needs `build` and `setuptools` (the test extra installs them)")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(work / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (found,) = (work / "dist").glob("*.whl")
    return found


def test_wheel_holds_every_subpackage_and_spec(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _package_files(".py") | _package_files(".toml")
    assert any(name.startswith("normbench/specs/") and name.endswith(".toml") for name in expected)
    missing = sorted(expected - names)
    assert not missing, f"left out of the wheel: {missing}"
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"normbench"}, f"the wheel installs top-level {sorted(top - {'normbench'})}"


def test_unpacked_wheel_works_from_any_directory(wheel, tmp_path):
    """A regular install (the wheel unpacked) imports everything from itself, with no finder."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    result = _python_without_pth(IMPORT_CHECK, first=target, cwd=tmp_path)
    _check_imports(result, target.resolve(), checkout=False)
