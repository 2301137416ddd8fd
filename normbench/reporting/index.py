"""The results index (results/README.md): every experiment with its figures, table, cost
and provenance, and the command that regenerates it. Generated from the folders' files;
no number in it is typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from normbench import experiments, runner
from normbench import spec as spec_module
from normbench.reporting import plots
from normbench.reporting.build import build_report

INDEX_NAME = "README.md"


def run_records(out: Path) -> list[dict]:
    return [json.loads((d / "provenance.json").read_text()) for d in runner.finished_run_dirs(out)]


def _parse_time(text: str | None):
    import datetime as dt
    try:
        return dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s"


def _group_size(record: dict) -> int:
    """Runs trained together with this one (`runner.train_group`): their shared times count once."""
    return len((record.get("group") or {}).get("seeds") or [None])


def compute_summary(records: list[dict]) -> str:
    """How long the runs took, and on which machine (from each run's provenance)."""
    if not records:
        return "No finished runs."
    walls, starts, ends = [], [], []
    for r in records:
        a, b = _parse_time(r.get("started")), _parse_time(r.get("finished"))
        if a and b:
            walls.append((b - a).total_seconds() / _group_size(r))
            starts.append(a)
            ends.append(b)
    train = sum(float(r.get("train_time_s") or 0.0) / _group_size(r) for r in records)
    per_backend = pd.Series([r["backend"] for r in records]).value_counts().sort_index()
    machines = sorted({f"{r.get('hostname', '?')}: {r.get('cpu', '?')}, {r.get('cpu_count', '?')} cores, "
                       f"device {r.get('device', '?')}" for r in records})
    text = (f"{len(records)} runs ({', '.join(f'{b} {n}' for b, n in per_backend.items())}); "
            f"{_duration(sum(walls))} of run wall time (each run's start to finish, evaluations included; "
            f"{_duration(train)} in training steps alone)")
    if starts:
        text += f", run between {min(starts):%Y-%m-%d %H:%M} and {max(ends):%Y-%m-%d %H:%M} UTC"
    text += f", on {'; '.join(machines)}."
    text += " Wall-clock times on that machine as loaded at the time: a record of cost, not a benchmark of the methods."
    return text


def provenance_summary(records: list[dict]) -> str:
    if not records:
        return ""
    commits = sorted({(r.get("git_commit") or "unknown")[:12] + (" with uncommitted changes" if r.get("git_dirty") else "")
                      for r in records})
    versions = {}
    for r in records:
        for k, v in (r.get("framework_versions") or {}).items():
            versions.setdefault(k, set()).add(v)
    for key in ("normbench_version", "python", "numpy"):
        versions.setdefault(key.replace("_version", ""), set()).update({r.get(key)} - {None})
    spec_hashes = sorted({r.get("spec_hash") for r in records} - {None})
    data = {}
    for r in records:
        data.update(r.get("data_files") or {})
    parts = [f"git commit {', '.join(commits)}",
             ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(versions.items()) if v),
             f"spec hash {', '.join(spec_hashes)}"]
    if data:
        parts.append("data " + ", ".join(f"{name} (sha256 {digest[:12]}…)" for name, digest in sorted(data.items())))
    return "; ".join(parts) + ". Every run's full record: `runs/<backend>/<variant>/seed-<n>/provenance.json`."


def recorded_overrides(folder: Path) -> dict[str, str] | None:
    """--seeds / --steps of the last `normbench reproduce` into `folder` (its experiment.json),
    or None when no command is recorded."""
    try:
        tokens = str(json.loads((Path(folder) / "experiment.json").read_text())["command"]).split()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    found = {}
    for i, token in enumerate(tokens):
        for flag in ("--seeds", "--steps"):
            if token == flag and i + 1 < len(tokens):
                found[flag] = tokens[i + 1]
            elif token.startswith(flag + "="):
                found[flag] = token.split("=", 1)[1]
    return found


def regenerate_command(name: str, records: list[dict], recorded: dict[str, str] | None = None) -> tuple[str, int | None]:
    """(the command that regenerates these results, how many runs it makes).

    Backends come from the runs; --seeds / --steps from the recorded command, or, when
    none is recorded, inferred from the runs against the experiment's spec."""
    backends_ = plots.backend_order({r["backend"] for r in records})
    flags = "".join(f" --backend {b}" for b in backends_)
    try:
        experiment = experiments.get(name)
        spec = spec_module.load(experiment.spec)
    except Exception:  # an unknown experiment or a spec that no longer loads: no flags beyond the backends
        return f"normbench reproduce {name}{flags}", None
    seeds = sorted({r["seed"] for r in records})
    if recorded is None:
        recorded = {}
        planned = {b: experiment.seeds_for(b, len(spec.seeds)) for b in backends_}
        ran = {b: len({r["seed"] for r in records if r["backend"] == b}) for b in backends_}
        if ran != planned and len(set(ran.values())) == 1 and seeds == list(range(len(seeds))):
            recorded["--seeds"] = str(len(seeds))  # these results used fewer or more seeds than the spec
        declared_steps = {v.name: spec.steps_for(v) for v in spec.variants}
        done = [r for r in records if r.get("status") == "ok" and r["variant"]["name"] in declared_steps
                and r.get("steps_completed") is not None]
        if done and any(r["steps_completed"] != declared_steps[r["variant"]["name"]] for r in done):
            recorded["--steps"] = str(max(r["steps_completed"] for r in done))  # a shortened run (--steps)
    flags += "".join(f" {k} {v}" for k, v in recorded.items())
    if recorded.get("--seeds", "").isdigit():
        runs_per_variant = int(recorded["--seeds"]) * len(backends_)
    else:
        runs_per_variant = sum(experiment.seeds_for(b, len(spec.seeds)) for b in backends_)
    return f"normbench reproduce {name}{flags}", len(spec.variants) * runs_per_variant


def is_results_root(path: str | Path) -> bool:
    """A folder of experiment folders (results/), rather than one experiment's results."""
    path = Path(path)
    return path.is_dir() and not (path / "runs").is_dir() and any((path / n / "runs").is_dir() for n in experiments.names())


def update_index(out: str | Path) -> Path | None:
    """Rewrite the index beside an experiment folder named after its experiment (results/<name>)."""
    out = Path(out)
    if out.name in experiments.names():
        return write_index(out.parent)
    return None


def build_all(root: str | Path) -> list[dict]:
    """Rebuild every experiment's report under `root` from stored metrics, then the index."""
    root = Path(root)
    built = [build_report(root / n, n) for n in experiments.names() if runner.finished_run_dirs(root / n)]
    write_index(root)
    return built


def write_index(root: str | Path) -> Path:
    """results/README.md: every experiment with its figures, table, cost and provenance.
    Generated from the folders' files; no number in it is typed by hand."""
    root = Path(root)
    lines = ["# normbench results", "",
             "<!-- Generated by `normbench report " + root.name + "` (and by every `normbench reproduce`). "
             "Do not edit: edits are overwritten. -->", "",
             "Reproductions of the experiments of *Accelerating Training of Deep Neural Networks with a "
             "Standardization Loss*: its MNIST experiments (Sections 4.1, 4.2), and scaled-down analogues of its "
             "PointNet, Inception-v2, ResNet and MobileNet experiments (Sections 4.3-4.5) on MNIST point clouds and "
             "Fashion-MNIST, each section saying what was scaled down. Each section below is one folder: "
             "its figures (PNG here, PDF beside them), its table (also as `table.tex` and `table.csv`), what it cost and "
             "where it ran, and its provenance. The paper's numbers stand beside ours where the paper states them; "
             "where ours differ, the notes under each table say so.", "",
             "`normbench reproduce all` regenerates everything (it trains only runs that are missing); "
             f"`normbench report {root.name}` rebuilds every table, figure and this index from stored metrics "
             "without training.", "", "| paper | experiment | status |", "|---|---|---|"]
    sections = []
    for name, e in experiments.by_name().items():
        folder = root / name
        records = run_records(folder) if (folder / "runs").is_dir() else []
        command, expected = regenerate_command(name, records, recorded_overrides(folder)) if records else (None, None)
        if not records:
            status = "not run yet"
        elif expected and len(records) < expected:
            status = f"{len(records)} of {expected} runs: **incomplete**"
        else:
            status = f"{len(records)} runs"
        lines.append(f"| {e.figure} | [{name}](#{name}) | {status} |")
        sec = ["", f"## {name}", "", f"**{e.figure}** · {e.title}", ""]
        if not records:
            sec += [f"Not run yet. Command: `normbench reproduce {name}`."]
            sections += sec
            continue
        if expected and len(records) < expected:
            sec += [f"**Incomplete:** {len(records)} of the {expected} runs of this command have finished; the "
                    "table and figures show those.", ""]
        sec += [f"**Regenerate:** `{command}` (trains missing runs, then reports) · "
                f"**rebuild from stored metrics:** `normbench report {root.name}/{name}`", ""]
        for png in sorted(folder.glob("*.png")):
            pdf = png.with_suffix(".pdf")
            sec.append(f"![{name}: {png.stem}]({name}/{png.name})")
            sec.append("")
            sec.append(f"[{png.name}]({name}/{png.name})" + (f" · [{pdf.name}]({name}/{pdf.name})" if pdf.exists() else ""))
            sec.append("")
        table_md = folder / "table.md"
        sec += [table_md.read_text().rstrip() if table_md.exists() else "(no table yet: run `normbench report` on the folder)", ""]
        sec += [f"**Compute.** {compute_summary(records)}", "", f"**Provenance.** {provenance_summary(records)}"]
        sections += sec
    text = "\n".join(lines + sections) + "\n"
    path = root / INDEX_NAME
    runner._atomic_write_text(path, text)
    return path
