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

Results go to .asv/results/<machine>/ under `git rev-parse HEAD` (uncommitted changes are
measured too, and a warning says so). The first run on a machine registers it with
`asv machine --yes` (~/.asv-machine.json). The training metrics come from real 1000-step
runs: a full CPU run takes tens of minutes per backend.

On a machine with a GPU: install CUDA builds of the frameworks into the same environment
(torch from PyTorch's CUDA wheel index, `pip install "jax[cuda12]"`, `tensorflow[and-cuda]`
instead of tensorflow-cpu); the "cuda" device parameter, skipped wherever no NVIDIA driver
is present, then runs and adds device peak memory. `--device cuda` measures the GPU only.

Exit status: 0 no regression (or nothing to compare with yet); 1 a regression, or a
benchmark that failed now; 2 usage or asv error.

Regression thresholds: every metric in the suite is lower-is-better, and a result
regresses when it exceeds its baseline by more than
    seconds   (step time, first-step time)                                   +20%
    steps     (steps to target accuracy)                                     +25%
    fraction  (final test error)                                             +25%
    bytes     (host RSS growth, device peak memory)          +25% and at least +16 MiB
    ratio     (normalization overhead, ratio to the hand-written loop)       +25%
Timings recorded with several samples must, in addition, differ by asv's own
significance test (the one `asv compare` applies); a --quick timing has one sample, so
the threshold alone decides. A benchmark whose code changed since the baseline is
listed as "changed" and not compared. `asv compare` itself always exits 0, which is why
this script reads the result files through asv's API instead.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = {"seconds": 0.20, "steps": 0.25, "fraction": 0.25, "bytes": 0.25, "ratio": 0.25}
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


def record(commit: str, machine: str, args) -> int:
    env = dict(os.environ)
    if args.device:
        env["NORMBENCH_BENCH_DEVICE"] = args.device
    command = ["run", "--python=same", "--set-commit-hash", commit, "--machine", machine, "--show-stderr"]
    if args.quick:
        command.append("--quick")
    for regex in args.bench or ():
        command += ["--bench", regex]
    return _asv(*command, env=env)


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
    order = {"FAILED": 0, "REGRESSION": 1, "skipped now": 2, "improved": 3, "changed": 4, "new": 5, "ok": 6}
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
    rest = [r for r in rows if r not in flagged]
    if rest:
        out += [f"<details><summary>all other results ({len(rest)})</summary>", "", table(rest), "", "</details>"]
    return "\n".join(out)


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
    args = parser.parse_args(argv)

    if os.environ.get("NORMBENCH_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no"):
        print("error: NORMBENCH_BENCH_QUICK is set: its tiny training budgets are for CI smoke runs, "
              "not for recorded results; unset it", file=sys.stderr)
        return 2
    from asv.config import Config

    os.chdir(ROOT)
    commit = _git("rev-parse", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
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
    if args.baseline:
        baseline = _git("rev-parse", args.baseline)
        if baseline not in by_commit:
            print(f"error: no recorded results for baseline {args.baseline} on machine {args.machine!r}", file=sys.stderr)
            return 2
    else:
        earlier = sorted((c for c in by_commit if c != commit), key=lambda c: _recorded_at(by_commit[c]))
        if not earlier:
            print(f"No earlier recorded commit on machine {args.machine!r}: {commit[:8]} is the first baseline.")
            return 1 if run_status else 0
        baseline = earlier[-1]

    from asv.benchmarks import Benchmarks
    units = {name: b.get("unit", "") for name, b in Benchmarks.load(conf).items()}
    devices = set(args.device.split(",")) if args.device else None

    def selected(key, params):
        if args.bench and not any(re.search(r, f"{key}({', '.join(repr(p) for p in params)})") for r in args.bench):
            return False
        return devices is None or not params or params[-1] in devices  # device is every grid's last parameter

    rows = compare(by_commit[baseline], by_commit[commit], units, selected)
    print(markdown(rows, baseline, commit, args.machine))
    if args.publish:
        _asv("publish")
    bad = [r for r in rows if r["status"] in ("FAILED", "REGRESSION")]
    return 1 if bad or run_status else 0


if __name__ == "__main__":
    sys.exit(main())
