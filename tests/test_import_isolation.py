"""The core never imports a framework, and the repository's `datasets/` folder never
shadows the top-level name `datasets` (the Hugging Face package's)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import normbench.datasets

CORE_MODULES = [
    "normbench", "normbench.spec", "normbench.plugins", "normbench.normalizations", "normbench.auxiliary_losses",
    "normbench.architectures", "normbench.identity", "normbench.plan", "normbench.optimizers", "normbench.data_order",
    "normbench.runner", "normbench.reporting", "normbench.cli", "normbench.experiments", "normbench.provenance",
    "normbench.backends", "normbench.backends.base", "normbench.datasets", "normbench.executors",
    "normbench.executors.local", "normbench.executors.dask_sweep", "normbench.executors.processes",
    "normbench.executors.scheduler",
]
FRAMEWORKS = ["torch", "jax", "tensorflow"]


def _python(code: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_modules_load_no_framework(tmp_path):
    """Imported one by one in a fresh interpreter (the listed core, then every other module of
    the normbench package, so new ones are covered); the first that pulls a framework in is named."""
    result = _python(f"""
        import importlib, json, pkgutil, sys
        import normbench
        frameworks = {FRAMEWORKS!r}
        loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in frameworks)
        modules = {CORE_MODULES!r}
        modules += sorted("normbench." + m.name for m in pkgutil.iter_modules(normbench.__path__)
                          if "normbench." + m.name not in modules and not m.name.startswith("_"))
        culprits, imported = {{}}, []
        for module in modules:
            importlib.import_module(module)
            imported.append(module)
            if loaded() and not culprits:
                culprits[module] = loaded()[:5]
        print(json.dumps({{"culprits": culprits, "imported": imported}}))
    """, tmp_path)
    assert result["imported"][:len(CORE_MODULES)] == CORE_MODULES
    assert result["culprits"] == {}, f"framework imported by the core: {result['culprits']}"


def test_cli_parser_and_listing_load_no_framework(tmp_path):
    """`normbench backends` / `specs` / `datasets` / `list` (which scans every plugin folder)
    answer without importing any framework."""
    result = _python("""
        import contextlib, io, json, sys
        from normbench import cli
        with contextlib.redirect_stdout(io.StringIO()):
            codes = [cli.main(["backends"]), cli.main(["specs"]), cli.main(["datasets"]), cli.main(["list"])]
        print(json.dumps({"codes": codes, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
    """ % FRAMEWORKS, tmp_path)
    assert result["codes"] == [0, 0, 0, 0]
    assert result["loaded"] == []


def test_bare_datasets_is_not_normbench_folder(tmp_path):
    """From an unrelated directory, `import datasets` is either absent or someone else's package."""
    ours = Path(normbench.datasets.__file__).resolve().parent
    result = _python("""
        import importlib.util, json
        spec = importlib.util.find_spec("datasets")
        origin = None
        if spec is not None:
            origin = spec.origin or (list(spec.submodule_search_locations or []) or [None])[0]
        print(json.dumps({"origin": origin}))
    """, tmp_path)
    origin = result["origin"]
    if origin is not None:
        resolved = Path(origin).resolve()
        assert resolved != ours and ours not in resolved.parents, f"`import datasets` resolves to {resolved}"
    # And normbench's own data sets are reachable under their real name.
    assert (ours / "mnist.py").is_file()
