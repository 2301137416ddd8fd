#!/usr/bin/env python
"""Nightly benchmarks: record a full asv run for the current commit, compare it with the
previously recorded commit, print the comparison as markdown, and fail on a regression.

    python scripts/nightly.py                        # every benchmark, every device present
    python scripts/nightly.py --quick                # asv --quick: one sample per timing (noisier)
    python scripts/nightly.py --bench 'TimeStep'     # benchmarks matching a regex (asv --bench;
                                                     #   parameters match too: "time_step\\('torch'")
    python scripts/nightly.py --device cpu           # only the "cpu" device parameter
    python scripts/nightly.py --compare-only         # record nothing; compare what is recorded
    python scripts/nightly.py --baseline <commit>    # compare with that commit, not the previous one
    python scripts/nightly.py --publish              # also build the HTML report in .asv/html
    python scripts/nightly.py --export results/benchmarks/cpu
                                                     # also write the run as published tables
                                                     #   (markdown, CSV, provenance; see `export`)
    python scripts/nightly.py --compare-only --commit <c> --export DIR
                                                     # export an already recorded commit
    python scripts/nightly.py --reproduce mnist-cnn --executor processes --workers 2
                                                     # also retrain a paper experiment (normbench
                                                     #   reproduce) into runs/nightly/<commit>/, on
                                                     #   the executor given (docs/cluster.md)
    python scripts/nightly.py --reproduce all --executor dask --scheduler tcp://head:8786

asv itself always runs locally, one benchmark process at a time on this machine: timings
measured on whichever node a cluster picks would not be comparable from night to night.
The executor options (--executor, --workers, --scheduler) apply to --reproduce only, and
are passed through to `normbench reproduce` unchanged.

Results go to .asv/results/<machine>/ under `git rev-parse HEAD` (uncommitted changes are
measured too, and a warning says so). The first run on a machine registers it with
`asv machine --yes` (~/.asv-machine.json). The training metrics come from real 1000-step
runs: a full CPU run takes tens of minutes per backend.

On a machine with a GPU: install CUDA builds of the frameworks into the same environment
(torch from PyTorch's CUDA wheel index, `pip install "jax[cuda12]"`, `tensorflow[and-cuda]`
instead of tensorflow-cpu); the "cuda" device parameter, skipped wherever no NVIDIA driver
is present, then runs and adds device peak memory. `--device cuda` measures the GPU only.

Exit status: 0 no regression (or nothing to compare with yet); 1 a regression, a
benchmark that failed now, or a --reproduce run that failed on a cluster; 2 usage, asv
or `normbench reproduce` usage error (an unreachable scheduler, say).

Regression thresholds: every metric in the suite is lower-is-better, and a result
regresses when it exceeds its baseline by more than
    seconds   (step time, first-step time)                                   +20%
    steps     (steps to target accuracy)                                     +25%
    fraction  (final test error)                                             +25%
    bytes     (host RSS growth, device peak memory)          +25% and at least +16 MiB
    ratio     (normalization overhead, ratio to the hand-written loop)       +25%
Timings recorded with several samples must, in addition, differ by asv's own
significance test (the one `asv compare` applies); a --quick timing has one sample, so
the threshold alone decides. A timing or memory result (seconds, ratio, bytes) flagged as
a regression is then measured once more, in a fresh asv run of just that combination
(memory: the backend's training runs again), and counts only if it exceeds the
threshold again ("unconfirmed" otherwise; see `confirm_regressions`). A
benchmark whose code changed since the baseline is listed as "changed" and not compared. `asv compare` itself always exits 0, which is why
this script reads the result files through asv's API instead.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = {"seconds": 0.20, "steps": 0.25, "fraction": 0.25, "bytes": 0.25, "ratio": 0.25}
# Noisy units: a regression must show in a second measurement too. Timings drift between
# processes; host RSS growth of an unchanged torch cnn3 run measured 340 and 611 MiB on two
# nights (allocator and oneDNN scratch). Steps and test error are deterministic.
CONFIRMED_UNITS = ("seconds", "ratio", "bytes")
DEFAULT_THRESHOLD = 0.25  # a unit not listed above
BYTES_FLOOR = 16 * 2**20  # memory changes smaller than this are noise, whatever the ratio


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _asv(*args: str, env=None) -> int:
    command = [sys.executable, "-m", "asv", *args]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def ensure_machine(machine: str) -> None:
    from asv.machine import MachineCollection
    try:
        MachineCollection.load(machine)
    except Exception:  # asv raises its UserError when the machine is unknown
        if _asv("machine", "--yes", "--machine", machine) != 0:
            sys.exit(2)


def record(commit: str, machine: str, args, benches=None) -> int:
    """`asv run` for `commit`; `benches` (regexes) overrides --bench. asv merges what it
    measures into the commit's existing result file, so a partial re-run keeps the rest."""
    env = dict(os.environ)
    if args.device:
        env["NORMBENCH_BENCH_DEVICE"] = args.device
    command = ["run", "--python=same", "--set-commit-hash", commit, "--machine", machine, "--show-stderr"]
    if args.quick:
        command.append("--quick")
    for regex in (args.bench or ()) if benches is None else benches:
        command += ["--bench", regex]
    return _asv(*command, env=env)


def _combination_regex(benchmark: str, params) -> str:
    """asv --bench regex of one benchmark's one parameter combination. asv names a
    combination `name(p1, p2)`, and an unparameterized benchmark by its name alone (with
    `()` appended, the regex selected nothing and the flag stood unmeasured)."""
    if not params:
        return f"^{re.escape(benchmark)}$"
    return f"^{re.escape(benchmark)}\\({re.escape(', '.join(repr(p) for p in params))}\\)$"


def confirm_regressions(rows: list[dict], remeasure) -> list[dict]:
    """Re-measure every noisy result (CONFIRMED_UNITS) flagged as a regression (once, in a
    fresh asv run) and keep the flag only where the new measurement exceeds it too.

    Step times of a millisecond drift by 20-40% between processes on a shared 2-core
    machine (measured: an unchanged commit flagged one of 18 step times at +29%); a
    real slowdown survives a second measurement, noise rarely does. `remeasure(regexes)`
    runs asv for the flagged combinations and returns the new comparison rows."""
    flagged = [r for r in rows if r["status"] == "REGRESSION" and r["unit"] in CONFIRMED_UNITS]
    if not flagged:
        return rows
    regexes = [_combination_regex(r["benchmark"], r["params"]) for r in flagged]
    print(f"re-measuring {len(flagged)} timing or memory result(s) flagged as regressions, to tell them from noise",
          file=sys.stderr)
    again = {(r["benchmark"], r["params"]): r for r in remeasure(regexes)}
    out = []
    for r in rows:
        if r in flagged:
            second = again.get((r["benchmark"], r["params"]), r)
            if second["status"] != "REGRESSION":
                second = {**second, "status": "unconfirmed", "first": r["after"]}
            r = second
        out.append(r)
    return out


# ----------------------------------------------------------------------------- comparison


def _results_by_commit(conf, machine: str) -> dict[str, list]:
    from asv.results import iter_results_for_machine
    by_commit: dict[str, list] = {}
    for result in iter_results_for_machine(conf.results_dir, machine):
        by_commit.setdefault(result.commit_hash, []).append(result)
    return by_commit


def _recorded_at(results: list) -> float:
    return max((t for r in results for t in r.started_at.values() if t is not None), default=0)


def _unroll(result, key: str) -> dict[tuple, tuple]:
    """{parameter tuple: (value, stats, samples)} of one benchmark in one result file."""
    params = result.get_result_params(key)
    values = result.get_result_value(key, params)
    stats = result.get_result_stats(key, params)
    samples = result.get_result_samples(key, params)
    if not params:
        return {(): (values[0] if isinstance(values, list) else values, (stats or [None])[0], (samples or [None])[0])}
    combos = list(itertools.product(*params))
    stats = stats if stats is not None else [None] * len(combos)
    samples = samples if samples is not None else [None] * len(combos)
    return {tuple(p.strip("'\"") for p in combo): (v, s, x) for combo, v, s, x in zip(combos, values, stats, samples)}


def _is_na(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _significant(before, after) -> bool:
    """asv's test, as `asv compare` applies it; True when it cannot tell (one sample)."""
    (_, stats_b, samples_b), (_, stats_a, samples_a) = before, after
    if not stats_b or not stats_a or stats_b.get("repeat", 0) == 1 or stats_a.get("repeat", 0) == 1:
        return True
    from asv import _stats
    return _stats.is_different(samples_b, samples_a, stats_b, stats_a)


def compare(base: list, current: list, units: dict[str, str], selected) -> list[dict]:
    rows = []
    for cur in current:
        old = next((r for r in base if r.env_name == cur.env_name), None)
        for key in sorted(cur.get_all_result_keys()):
            unit = units.get(key, "")
            now = _unroll(cur, key)
            changed = old is not None and key in old.get_all_result_keys() and old.benchmark_version.get(key) != cur.benchmark_version.get(key)
            before_all = _unroll(old, key) if old is not None and key in old.get_all_result_keys() and not changed else {}
            for params, after in now.items():
                if not selected(key, params):
                    continue
                before = before_all.get(params, (float("nan"), None, None))
                row = {"benchmark": key, "params": params, "unit": unit, "before": before[0], "after": after[0],
                       "threshold": THRESHOLDS.get(unit, DEFAULT_THRESHOLD)}
                if after[0] is None:
                    row["status"] = "FAILED"
                elif _is_na(after[0]) and _is_na(before[0]):
                    continue  # skipped on both sides (absent backend, device or counter)
                elif changed:
                    row["status"] = "changed"
                elif _is_na(before[0]):
                    row["status"] = "new"
                elif _is_na(after[0]):
                    row["status"] = "skipped now"
                else:
                    ratio = after[0] / before[0] if before[0] else math.inf
                    worse = ratio > 1 + row["threshold"] and (unit != "bytes" or after[0] - before[0] >= BYTES_FLOOR)
                    better = ratio < 1 / (1 + row["threshold"])
                    if (worse or better) and unit == "seconds" and not _significant(before, after):
                        worse = better = False
                    row["status"] = "REGRESSION" if worse else "improved" if better else "ok"
                rows.append(row)
    return rows


def _format(value, unit: str) -> str:
    if value is None:
        return "failed"
    if _is_na(value):
        return "n/a"
    if unit == "seconds":
        if abs(value) >= 1000:  # the main job: no exponent
            return f"{value:.0f} s"
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value / 1e-9:.3g} ns"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    if unit == "steps":
        return f"{value:.0f}"
    if unit == "fraction":
        return f"{100 * value:.2f}%"
    return f"{value:.3f}"


def _change(row) -> str:
    before, after = row["before"], row["after"]
    if _is_na(before) or _is_na(after) or not before:
        return ""
    return f"{100 * (after / before - 1):+.1f}%"


def markdown(rows: list[dict], base_commit: str, current_commit: str, machine: str) -> str:
    order = {"FAILED": 0, "REGRESSION": 1, "skipped now": 2, "unconfirmed": 3, "improved": 4, "changed": 5, "new": 6, "ok": 7}
    rows = sorted(rows, key=lambda r: (order[r["status"]], r["benchmark"], r["params"]))

    def table(selection):
        lines = ["| status | benchmark | parameters | baseline | current | change | threshold |",
                 "|---|---|---|---|---|---|---|"]
        for r in selection:
            lines.append(f"| {r['status']} | `{r['benchmark']}` | {', '.join(r['params'])} | {_format(r['before'], r['unit'])} "
                         f"| {_format(r['after'], r['unit'])} | {_change(r)} | +{r['threshold']:.0%} |")
        return "\n".join(lines)

    counts = {s: sum(r["status"] == s for r in rows) for s in order}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    out = [f"## normbench nightly: `{current_commit[:8]}` vs `{base_commit[:8]}` (machine `{machine}`)", "", f"**{summary or 'no results'}**", ""]
    flagged = [r for r in rows if r["status"] in ("FAILED", "REGRESSION", "skipped now")]
    if flagged:
        out += [table(flagged), ""]
    unconfirmed = [r for r in rows if r["status"] == "unconfirmed"]
    if unconfirmed:
        out += ["*unconfirmed*: over its threshold when first measured (" + ", ".join(
            f"`{r['benchmark'].split('.')[-1]}` {', '.join(r['params'])} {_format(r['first'], r['unit'])}" for r in unconfirmed)
            + "), within it when measured again: noise, not a failure. The tables show the second measurement.", ""]
    rest = [r for r in rows if r not in flagged]
    if rest:
        out += [f"<details><summary>all other results ({len(rest)})</summary>", "", table(rest), "", "</details>"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- export

# Published tables: (benchmark key, heading, how a value is shown).
EXPORTED = [
    ("bench_step_time.TimeStep.time_step", "Steady-state time per training step", "seconds"),
    ("bench_step_time.TimeFirstStep.time_first_step", "First step of a fresh trainer (tracing, compilation, kernel set-up)", "seconds"),
    ("bench_ratios.ReferenceRatio.track_ratio_to_reference", "Step time / a minimal hand-written loop in the same framework (PyTorch: symmetric padding, bias in the convolution)", "ratio"),
    ("bench_ratios.AlignmentCost.track_alignment_cost", "PyTorch: the hand-written loop with TensorFlow's SAME alignment / with symmetric padding", "ratio"),
    ("bench_ratios.NormalizationOverhead.track_overhead_vs_none", "Step time / the same model without normalization", "ratio"),
    ("bench_ratios.CompiledOverhead.track_overhead_vs_none", "PyTorch with --compile: step time / the same model without normalization, both compiled", "ratio"),
    ("bench_step_time.TimeFirstCompiledStep.time_first_step", "PyTorch with --compile: the first step of a fresh trainer (torch.compile)", "seconds"),
    ("bench_ratios.MethodReferenceRatio.track_ratio_to_reference", "Every method: step time / the hand-written loop in the same framework", "ratio"),
    ("bench_ratios.MethodOverhead.track_overhead_vs_none", "Every method: step time / the same network without normalization", "ratio"),
    ("bench_architectures.ArchitectureStep.time_step", "The paper's architectures at their small configurations: time per training step", "seconds"),
    ("bench_ratios.ArchitectureReferenceRatio.track_ratio_to_reference", "The paper's architectures at their small configurations: step time / the hand-written loop in the same framework (both with plain SGD; PyTorch: symmetric padding)", "ratio"),
    ("bench_architectures.ResNet50PeakMemory.track_peak_step_memory", "Host memory of one ResNet-50 training step at batch 8", "bytes"),
    ("bench_inference.InferenceLatency.time_predict", "Inference: time to predict one image (batch norm unfolded and folded into the layers)", "seconds"),
    ("bench_inference.InferenceThroughput.track_seconds_per_image", "Inference: time per image of a large batch (batch norm unfolded and folded into the layers)", "seconds"),
    ("bench_inference.InferenceOverhead.track_latency_vs_plain", "Inference: time to predict one image / the plain network's (the same architecture without normalization), side by side", "ratio"),
    ("bench_inference.InferenceOverhead.track_per_image_vs_plain", "Inference: time per image of a large batch / the plain network's, side by side", "ratio"),
    ("track_steps_to_target", "Steps to the baseline's best test accuracy within 1000 steps (speed-up = the baseline's steps / a method's; n/a = not reached)", "steps"),
    ("track_final_test_error", "Test error after 1000 steps", "fraction"),
    ("track_host_rss_growth", "Host RSS growth during a 1000-step run", "bytes"),
    ("track_device_peak_memory", "Device peak memory during a 1000-step run", "bytes"),
    ("track_seconds_per_run", "The main job (mnist-cnn): seconds per run with group_size seeds of a variant trained together (runs per hour: below)", "seconds"),
    ("track_main_job_seconds", "The main job (mnist-cnn, every variant x 10 seeds): each backend's share at its default group size", "seconds"),
    ("track_evaluation_seconds_per_10k_images", "Evaluation time per 10,000 images (one run)", "seconds"),
    ("track_evaluation_share", "Evaluation's share of a run's time at eval_every = 50", "fraction"),
    ("track_run_to_flop_floor", "A run's time / its FLOPs at the matrix-multiply rate measured in the same run", "ratio"),
    ("track_evaluation_flop_share", "Evaluation's share of a run's FLOPs (counted, not timed; a run within k times its floor spends at least this share / k of its time evaluating)", "fraction"),
    ("track_main_job_flop_floor_seconds", "The main job's FLOP floor: each backend's share of it (every run's FLOPs) at the matrix-multiply rate measured beside its steps", "seconds"),
    ("track_matrix_product_seconds", "The FLOP floor's rate: one float32 2048 x 2048 matrix product with the framework's own matmul, timed beside the steps", "seconds"),
]


def export(results: list, benchmarks: dict, machine: str, info: dict, commit: str, out: Path, command: str) -> list[Path]:
    """Write one recorded commit's results as published tables: `benchmarks.csv` (every
    value, one row each), `README.md` (one table per metric: backend x model rows,
    normalization columns, one table per device) and `provenance.json`. Nothing is typed
    in by hand; rerunning the command on the same records rewrites the same files."""
    import csv

    records = []
    for result in results:
        for key in sorted(result.get_all_result_keys()):
            described = benchmarks.get(key, {})
            names, unit = described.get("param_names", []), described.get("unit", "")
            for params, (value, _, _) in _unroll(result, key).items():
                if value is None or _is_na(value):
                    continue  # skipped here (absent framework or device) or failed
                records.append({"benchmark": key, "unit": unit, **dict(zip(names, params)), "value": value})
    out.mkdir(parents=True, exist_ok=True)
    columns = ["benchmark", "unit", "backend", "model", "normalization", "variant", "device", "value"]
    if any(r.get("architecture") for r in records):  # only where such benchmarks ran: older exports keep their columns
        columns.insert(4, "architecture")
    columns[-2:-2] = [k for k in dict.fromkeys(k for r in records for k in r) if k not in columns]  # e.g. inference's case
    with open(out / "benchmarks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)

    started = min((t for r in results for t in r.started_at.values() if t), default=None)
    when = _dt.datetime.fromtimestamp(started / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if started else "?"
    env = results[0].params if results else {}
    provenance = {"commit": commit, "machine": info, "asv_environment": results[0].env_name if results else None,
                  "python": env.get("python"), "packages": _package_versions(env.get("python")), "recorded_at": when,
                  "command": command, "records": len(records), "cpu_vector_extensions": _vector_extensions(),
                  "cpu_last_level_cache": _last_level_cache(), "backend_devices": _backend_devices(env.get("python"))}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")

    extensions = provenance["cpu_vector_extensions"]
    extensions = ", ".join(extensions) if isinstance(extensions, list) else extensions
    lines = [f"# normbench benchmarks on `{machine}`", "",
             "<!-- Generated by `python scripts/nightly.py --export DIR` from asv's recorded results. Do not edit. -->", "",
             f"Commit `{commit[:12]}`, recorded {when} with asv on {info.get('cpu', '?')}, {info.get('num_cpu', '?')} cores, "
             f"{int(info.get('ram', 0) or 0) / 2**30:.0f} GiB, {info.get('os', '?')} (CPU extensions: {extensions}; "
             f"last-level cache: {provenance['cpu_last_level_cache']}). Medians (asv) of one process per benchmark; "
             "ratios are measured side by side in one process, and those of `NormalizationOverhead`, `CompiledOverhead` "
             "and `ReferenceRatio` are the median of three such processes. All metrics are lower-is-better. "
             + _devices_sentence(provenance["backend_devices"]) +
             "What each benchmark measures: [benchmarks/README.md](../../../benchmarks/README.md). "
             "Every value, one row each: [benchmarks.csv](benchmarks.csv); provenance: [provenance.json](provenance.json).", ""]
    normalizations = list(dict.fromkeys(r["normalization"] for r in records if r.get("normalization")))
    for pattern, heading, unit in EXPORTED:
        mine = [r for r in records if r["benchmark"] == pattern or r["benchmark"].endswith("." + pattern)]
        for device in sorted({r.get("device", "") for r in mine}):
            rows = [r for r in mine if r.get("device", "") == device]
            where = f" ({device})" if device else ""  # the throughput classes measure the CPU and take no device
            if any(r.get("variant") or r.get("case") or r.get("group_size") for r in rows):  # the variant grids (inference: cases): a row per variant (and its other parameters), a column per backend
                backends = list(dict.fromkeys(_backend_of(r) for r in rows))
                names = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("benchmark", "unit", "backend", "device", "value")]
                row_of = lambda r: tuple(r.get(k, "") for k in names)
                lines += [f"## {heading}{where}", "", f"| {' | '.join(names)} | " + " | ".join(backends) + " |",
                          "|---|" + "---|" * (len(backends) + len(names) - 1)]
                for row_key in dict.fromkeys(map(row_of, rows)):
                    cells = [next((_format(r["value"], unit) for r in rows if row_of(r) == row_key and _backend_of(r) == b), "—")
                             for b in backends]
                    lines.append(f"| {' | '.join(row_key)} | " + " | ".join(cells) + " |")
                lines.append("")
                continue
            if not any(r.get("model") or r.get("normalization") for r in rows):  # one value per backend (no grid)
                lines += [f"## {heading}{where}", "", "| backend | value |", "|---|---|"]
                lines += [f"| {_backend_of(r)} | {_format(r['value'], unit)} |" for r in rows]
                lines.append("")
                continue
            present = [n for n in normalizations if any(r.get("normalization") == n for r in rows)] or [None]
            keys = list(dict.fromkeys((_backend_of(r), r.get("model", "")) for r in rows))
            lines += [f"## {heading}{where}", "", "| backend | model | " + " | ".join(n or "value" for n in present) + " |",
                      "|---|---|" + "---|" * len(present)]
            for backend, model in keys:
                cells = []
                for n in present:
                    hit = [r["value"] for r in rows if _backend_of(r) == backend and r.get("model") == model
                           and r.get("normalization") == n]
                    cells.append(_format(hit[0], unit) if hit else "—")
                lines.append(f"| {backend} | {model} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += _throughput_summary(records)
    (out / "README.md").write_text("\n".join(lines))
    return [out / "README.md", out / "benchmarks.csv", out / "provenance.json"]


def _throughput_summary(records: list[dict]) -> list[str]:
    """Figures derived from recorded values only: runs per hour (3600 / seconds per run),
    the main job's wall time (the sum of the backends' shares) and its FLOP floor (the sum
    of the default backends' floors)."""
    per_run = [r for r in records if r["benchmark"].endswith(".track_seconds_per_run")]
    shares = [r for r in records if r["benchmark"].endswith(".track_main_job_seconds")]
    floors = [r for r in records if r["benchmark"].endswith(".track_main_job_flop_floor_seconds")
              and " " not in _backend_of(r)]
    if not per_run and not shares:
        return []
    lines = []
    if per_run:
        backends = list(dict.fromkeys(_backend_of(r) for r in per_run))
        sizes = list(dict.fromkeys(r["group_size"] for r in per_run))
        lines += ["## Runs per hour (3600 / seconds per run, above)", "", "| group_size | " + " | ".join(backends) + " |",
                  "|---|" + "---|" * len(backends)]
        for size in sizes:
            cells = [next((f"{3600.0 / r['value']:.0f}" for r in per_run if r["group_size"] == size and _backend_of(r) == b), "—")
                     for b in backends]
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        lines.append("")
    if shares:
        # One share per framework: its default mode's, and separately the fastest mode's
        # (PyTorch's `--compile` is measured as a backend "torch --compile").
        default = [r for r in shares if " " not in _backend_of(r)]
        fastest: dict[str, dict] = {}
        for r in shares:
            framework = _backend_of(r).split()[0]
            if framework not in fastest or r["value"] < fastest[framework]["value"]:
                fastest[framework] = r
        for heading, chosen in (("", default), (" with each framework's fastest option", list(fastest.values()))):
            if heading and {id(r) for r in chosen} == {id(r) for r in default}:
                continue  # the defaults are the fastest: said once
            total = sum(r["value"] for r in chosen)
            parts = ", ".join(f"{_backend_of(r)} {r['value'] / 60:.1f}" for r in chosen)
            lines += [f"The main job's wall time{heading} (the backends one after another): {total / 60:.1f} minutes ({parts}).", ""]
    if floors:
        # The same backends as the default wall time above, so the two divide.
        floor = sum(r["value"] for r in floors)
        parts = ", ".join(f"{_backend_of(r)} {r['value'] / 60:.1f}" for r in floors)
        wall = sum(r["value"] for r in shares if " " not in _backend_of(r)
                   and _backend_of(r) in {_backend_of(f) for f in floors})
        ratio = f"; the wall time of the same backends is {wall / floor:.2f}x it" if wall else ""
        lines += [f"The main job's FLOP floor (every run's FLOPs at the matrix-multiply rate each backend measured beside "
                  f"its steps): {floor / 60:.1f} minutes ({parts}){ratio}.", ""]
    return lines


_PACKAGES = ("normbench", "numpy", "torch", "jax", "jaxlib", "tensorflow", "tensorflow-cpu", "asv")


def _vector_extensions() -> list[str] | str:
    """The SIMD extensions this machine's CPU reports (read now, as the packages are). asv's
    machine record names the CPU only ("AMD EPYC"), and under that one name the frameworks'
    convolutions ran at very different speeds: TensorFlow's evaluation of 10,000 cnn3
    images was recorded at 234 ms (commit 2be9ca7, 2026-12-03) and measured at 632 ms at
    the same commit on a host reporting AVX2 and no AVX-512 (2026-12-04), where TensorFlow's
    default ran Eigen's kernels, not oneDNN's (backends/tensorflow/__init__.py)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in set(flags) if f.startswith(("avx", "amx", "fma", "sse4")))


def _last_level_cache() -> str:
    """The size of the CPU's largest cache level as Linux reports it (read now): where a
    chunk's activations stop fitting it, TensorFlow's evaluation with Eigen's kernels
    slowed by half (backends/tensorflow/engine.py)."""
    levels = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            levels.append((int((index / "level").read_text()), (index / "size").read_text().strip()))
        except (OSError, ValueError):
            continue
    return f"L{max(levels)[0]} {max(levels)[1]}" if levels else "unknown"


def _backend_devices(python: str | None) -> dict[str, str] | str:
    """Each available backend's CPU device as its engine describes it (the `device` of run
    provenance), from the interpreter that recorded the run, read now as the packages are:
    which kernels a framework runs can depend on the host and the environment, not only on
    its version (TensorFlow's oneDNN or Eigen kernels: backends/tensorflow/__init__.py)."""
    return _ask_recording_interpreter(python, "import json\nfrom normbench import backends\n"
                                      "print(json.dumps({n: backends.get_engine(n, device='cpu').device_description()\n"
                                      "                  for n in backends.names() if backends.is_available(n)}))")


def _devices_sentence(devices: dict[str, str] | str) -> str:
    if not isinstance(devices, dict) or not devices:
        return ""
    return "Backends' CPU devices: " + "; ".join(f"{name}: {text}" for name, text in sorted(devices.items())) + ". "


def _package_versions(python: str | None) -> dict[str, str] | str:
    """Versions installed in the interpreter that recorded the run (asv keeps its path),
    read now: the same environment unless it was changed since."""
    return _ask_recording_interpreter(python, "import importlib.metadata as m, json\n"
                                      f"v = {{}}\nfor p in {list(_PACKAGES)!r}:\n"
                                      "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\n"
                                      "print(json.dumps(v))")


def _ask_recording_interpreter(python: str | None, code: str) -> dict | str:
    """What `code` prints as JSON on its last line, run by the interpreter that recorded the
    run; a sentence saying why not where that fails."""
    if not python or not Path(python).exists():
        return f"unknown: the recording interpreter {python!r} no longer exists"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if done.returncode == 0 and lines else f"unknown: {done.stderr.strip()[-200:]}"


def _backend_of(record: dict) -> str:
    """The backend of a record: a parameter, or (training classes) the class name."""
    if record.get("backend"):
        return record["backend"]
    cls = record["benchmark"].split(".")[-2]  # e.g. TorchTraining, JaxDeviceMemory, TorchCompiledWorkersRun
    name = re.sub(r"(Training|DeviceMemory|RunTime|Run)$", "", cls)
    name = re.sub(r"^(\w+?)Workers$", r"\1 --executor processes", name)
    return re.sub(r"^(\w+?)Compiled\b", r"\1 --compile", name).lower()


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="asv --quick: every timing sampled once")
    parser.add_argument("--bench", action="append", metavar="REGEX", help="only benchmarks matching REGEX (repeatable)")
    parser.add_argument("--device", help="comma-separated device parameters to measure (cpu, cuda); default: all present")
    parser.add_argument("--machine", default=platform.node(), help="asv machine name (default: the host name)")
    parser.add_argument("--baseline", help="commit to compare with (default: the previously recorded commit)")
    parser.add_argument("--compare-only", action="store_true", help="record nothing, compare recorded results")
    parser.add_argument("--publish", action="store_true", help="also run `asv publish` (HTML in .asv/html)")
    parser.add_argument("--commit", help="the recorded commit to compare and export (default: HEAD; with --compare-only)")
    parser.add_argument("--export", metavar="DIR", help="also write the commit's results as published tables to DIR "
                                                        "(README.md, benchmarks.csv, provenance.json)")
    parser.add_argument("--reproduce", action="append", metavar="EXPERIMENT",
                        help="also run `normbench reproduce EXPERIMENT` (repeatable; `all` for every one) into "
                             "--reproduce-out/<commit>/EXPERIMENT, after the benchmarks")
    parser.add_argument("--reproduce-out", metavar="DIR", default="runs/nightly",
                        help="where --reproduce writes (default: %(default)s/<commit>/<experiment>)")
    parser.add_argument("--executor", help="executor of --reproduce: local, processes or dask (asv always runs locally)")
    parser.add_argument("--workers", type=int, help="with --executor processes: worker processes")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="with --executor dask: the Dask scheduler")
    args = parser.parse_args(argv)
    export_dir = Path(args.export).resolve() if args.export else None  # relative to where the user stands
    reproduce_root = Path(args.reproduce_out).resolve()
    problem = _check_reproduce_options(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    command = "python scripts/nightly.py " + " ".join(argv if argv is not None else sys.argv[1:])

    if os.environ.get("NORMBENCH_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no"):
        print("error: NORMBENCH_BENCH_QUICK is set: its tiny training budgets are for CI smoke runs, "
              "not for recorded results; unset it", file=sys.stderr)
        return 2
    from asv.config import Config

    os.chdir(ROOT)
    if args.commit and not args.compare_only:
        print("error: --commit names a recorded commit, so it needs --compare-only (a new run always records HEAD)",
              file=sys.stderr)
        return 2
    commit = _git("rev-parse", args.commit or "HEAD")
    if not args.compare_only and _git("status", "--porcelain", "--untracked-files=no"):
        print(f"warning: the working tree has uncommitted changes; they are measured and recorded as {commit[:8]}",
              file=sys.stderr)
    ensure_machine(args.machine)
    run_status = 0
    if not args.compare_only:
        run_status = record(commit, args.machine, args)
        if run_status not in (0, 2):  # 2: asv ran, and some benchmark failed (reported below)
            print(f"error: asv run exited with {run_status}", file=sys.stderr)
            return 2

    conf = Config.load(str(ROOT / "asv.conf.json"))
    by_commit = _results_by_commit(conf, args.machine)
    if commit not in by_commit:
        print(f"error: no recorded results for {commit[:8]} on machine {args.machine!r}", file=sys.stderr)
        return 2

    def export_now() -> None:
        # After any re-measurement: the published tables show what the verdicts were based on.
        if not args.export:
            return
        from asv.benchmarks import Benchmarks
        from asv.machine import MachineCollection
        written = export(_results_by_commit(conf, args.machine)[commit], dict(Benchmarks.load(conf)), args.machine,
                         MachineCollection.load(args.machine), commit, export_dir, command)
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)

    if args.baseline:
        baseline = _git("rev-parse", args.baseline)
        if baseline not in by_commit:
            print(f"error: no recorded results for baseline {args.baseline} on machine {args.machine!r}", file=sys.stderr)
            return 2
    else:
        earlier = sorted((c for c in by_commit if c != commit), key=lambda c: _recorded_at(by_commit[c]))
        if not earlier:
            print(f"No earlier recorded commit on machine {args.machine!r}: {commit[:8]} is the first baseline.")
            export_now()
            return max(1 if run_status else 0, reproduce(args, commit, reproduce_root))
        baseline = earlier[-1]

    from asv.benchmarks import Benchmarks
    units = {name: b.get("unit", "") for name, b in Benchmarks.load(conf).items()}
    devices = set(args.device.split(",")) if args.device else None

    def selected(key, params):
        if args.bench and not any(re.search(r, f"{key}({', '.join(repr(p) for p in params)})") for r in args.bench):
            return False
        return devices is None or not params or params[-1] in devices  # device is every grid's last parameter

    rows = compare(by_commit[baseline], by_commit[commit], units, selected)
    if not args.compare_only:
        def remeasure(regexes):
            if record(commit, args.machine, args, benches=regexes) not in (0, 2):
                return []  # asv itself failed: keep the first measurement's verdicts
            return compare(by_commit[baseline], _results_by_commit(conf, args.machine)[commit], units, selected)
        rows = confirm_regressions(rows, remeasure)
    print(markdown(rows, baseline, commit, args.machine))
    export_now()
    if args.publish:
        _asv("publish")
    bad = [r for r in rows if r["status"] in ("FAILED", "REGRESSION")]
    status = 1 if bad or run_status else 0
    return max(status, reproduce(args, commit, reproduce_root))


def _check_reproduce_options(args) -> str | None:
    """What is wrong with the --reproduce / executor options, in one line, or None."""
    executor_options = [f"--{name}" for name in ("executor", "workers", "scheduler") if getattr(args, name) is not None]
    if executor_options and not args.reproduce:
        return (f"{', '.join(executor_options)} applies to --reproduce only (asv itself always runs locally); "
                "add --reproduce EXPERIMENT or drop it")
    if args.reproduce:
        from normbench import executors
        try:
            executors.check_options(args.executor or executors.DEFAULT, args.workers, args.scheduler)
        except executors.ExecutorError as exc:
            return str(exc)
    return None


def reproduce(args, commit: str, root: Path) -> int:
    """`normbench reproduce` for each --reproduce experiment, with the executor options
    passed through; a fresh directory per commit, so every night retrains. Returns 0, 1
    (runs failed) or 2 (usage: a bad name, an unreachable scheduler)."""
    worst = 0
    for experiment in args.reproduce or ():
        command = [sys.executable, "-m", "normbench.cli", "reproduce", experiment, "--out",
                   str(root / commit[:12] / experiment if experiment != "all" else root / commit[:12]), "--no-progress"]
        for name in ("executor", "workers", "scheduler"):
            if getattr(args, name) is not None:
                command += [f"--{name}", str(getattr(args, name))]
        print("$ " + " ".join(command), file=sys.stderr, flush=True)
        code = subprocess.run(command, cwd=ROOT).returncode
        if code:
            print(f"error: normbench reproduce {experiment} exited with {code}", file=sys.stderr)
            worst = max(worst, 2 if code == 2 else 1)
    return worst


if __name__ == "__main__":
    sys.exit(main())
