"""The registries are the only lists of names: no normalization method, auxiliary loss
or legacy shorthand is typed as a string in code outside its own plugin files.

Allowed, as the plugin-core issue states: the plugin's own file (and its hand-written
reference loops, one file per method under benchmarks/reference_*/), the experiments
that use it, specs, tests, docs and results. Docstrings, comments and help text are
documentation and are not scanned; every other string literal in the package, the
backends, the benchmarks, the scripts and the data sets is.
"""

from __future__ import annotations

import ast
import pathlib

from normbench import auxiliary_losses, normalizations

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ("normbench", "backends", "benchmarks", "scripts", "datasets")
ALLOWED = ("normbench/normalizations/", "normbench/auxiliary_losses/", "normbench/experiments/", "normbench/specs/")
HELP_TEXT = {("normbench/cli.py", "SPEC_FORMAT")}  # `normbench specs --format`: documentation


def _names() -> set[str]:
    names = set(normalizations.names()) | set(auxiliary_losses.names())
    names |= set(normalizations.shorthands()) | set(auxiliary_losses.normalization_shorthands())
    return names - {"none"}  # the absence of a method is the core's own concept


def _is_plugin_reference_loop(relative: str) -> bool:
    parts = relative.split("/")
    return len(parts) >= 3 and parts[0] == "benchmarks" and parts[1].startswith("reference_") \
        and parts[2] in ("normalizations", "auxiliary_losses")


def _documentation(tree: ast.AST, relative: str) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            ids.add(id(body[0].value))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and (relative, t.id) in HELP_TEXT
                                                for t in node.targets):
            ids |= {id(n) for n in ast.walk(node.value)}
    return ids


def _typed_names(root: pathlib.Path = ROOT) -> list[str]:
    names = _names()
    found = []
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative.startswith(ALLOWED) or _is_plugin_reference_loop(relative):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            documentation = _documentation(tree, relative)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in documentation:
                    hits = [n for n in names if node.value == n or f'"{n}"' in node.value or node.value.startswith(n + "(")]
                    found += [f"{relative}:{node.lineno}: {hit!r}" for hit in hits]
    return found


def test_the_scan_sees_every_registered_name():
    names = _names()
    assert {"batch_norm", "group_norm", "standardization", "batch_norm_shift", "standardization_loss"} <= names


def test_no_method_name_is_typed_outside_its_plugin():
    found = _typed_names()
    assert not found, "method names typed outside their plugin (read them from the registry instead):\n" + "\n".join(found)


def test_the_scan_would_catch_a_typed_name(tmp_path):
    """The scan is not vacuous: a string literal naming a method in a core file is found,
    the same name in a docstring is not."""
    (tmp_path / "normbench").mkdir()
    (tmp_path / "normbench" / "core.py").write_text('"""Mentions group_norm."""\nMETHODS = ["group_norm"]\n')
    assert _typed_names(tmp_path) == ["normbench/core.py:2: 'group_norm'"]
