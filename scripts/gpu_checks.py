#!/usr/bin/env python
"""Every GPU check of the throughput work in one prepared process, for a session lent a
GPU machine for a few minutes, and the command that publishes what it measured.

    # there (the device tool's `run`, in the repository root; the MNIST files carried):
    python3 scripts/gpu_checks.py measure --out "$OUT" --mnist .gpu-carry/mnist.tar.gz --commit <commit>
    # here, on the files that came back:
    python scripts/gpu_checks.py publish <files> --out results/benchmarks/gpu

`measure` runs, in this order, each step writing its file under --out as soon as it ends
(a step that fails or runs out of time leaves the others' files and says why):

1. `environment.json`: the GPU, the frameworks' versions, the commit, each step's outcome.
2. `throughput.json`: `benchmarks/bench_throughput.measure` for each backend on the device
   (PyTorch eager and with --compile, JAX): seconds per step and per evaluation of every
   variant at group sizes 1, 4 and 10, timed side by side with the framework's own
   matrix product (the FLOP floor's rate), and the main job projected from them, exactly
   as the CPU record measures it, without asv (which the lent machine lacks).
3. `parity.txt`: `normbench parity mnist-cnn` on the device between the backends present
   (PyTorch and JAX on the lent machine, which has no TensorFlow), every variant, one
   step and 50-step trajectories, each also against a float64 reference.
4. `main-job.tar.gz`: the main job itself, `normbench reproduce mnist-cnn` on the device
   with the backends present (every variant x 10 seeds, at the default group size), its
   wall time, tables (paper band, backend agreement) and curves.
5. `runs.tar.gz`: one real seed of every variant of mnist-cnn per backend (`normbench run
   --seeds 1`), whose provenance (`train_time_s`, wall time) checks the projection.

A step is skipped, and says so, once fewer than its estimated seconds remain of
--budget-s. `--device cpu` runs the same steps here (with NORMBENCH_BENCH_QUICK=1, in
seconds) to try the script before a lease. `publish` writes README.md (tables),
throughput.json, parity.txt and provenance.json under --out from those files.

The machine lent to this project (an H200, 16 cores) has PyTorch, JAX and the scientific
Python stack but no package index and no TensorFlow. normbench is installed there from
the tree each call sends (`python3 -m pip install -q --no-deps --no-build-isolation
--no-index -e .`, offline: the machine has setuptools; a bare PYTHONPATH cannot work,
since backends/ and datasets/ import only as normbench.backends and normbench.datasets),
and MNIST travels as a tarball of its four IDX files:

    mkdir -p .gpu-carry && echo /.gpu-carry/ >> .git/info/exclude
    tar -czf .gpu-carry/mnist.tar.gz -C ~/.cache/normbench/mnist \\
        train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte

(11 MB; the tracked tree is about 12 MB, well inside the 64 MiB a call may carry). The
device tool's call, with the tree committed so that --commit names what runs: command
`python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null;
PYTHONUNBUFFERED=1 python3 scripts/gpu_checks.py measure --out "$OUT" --mnist
.gpu-carry/mnist.tar.gz --commit <git rev-parse HEAD> --budget-s 400`, carry
[".gpu-carry"], timeout_s 450. On the H200 at 57db38e it took 263 s (throughput 125 s,
parity 14 s, the main job 78 s, runs 28 s), and a machine's start about 30 s, so a
15-minute lease has room for a smoke run first (NORMBENCH_BENCH_QUICK=1, --steps
throughput parity --parity-steps 2: about 80 s) and the full one after it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = "mnist-cnn"
PARITY_STEPS = 50
# Estimated seconds of each step on the H200 machine, above the most it took in the two
# measurements there (ed5573d, 57db38e: throughput 82 and 125 s, parity 14 and 14 s, the
# main job 78 s, runs 28 and 28 s), so that a step which cannot finish inside the budget
# is skipped rather than cut off. In order of what the throughput work needs most.
ESTIMATED_S = {"throughput": 130, "parity": 30, "main_job": 180, "runs": 45}


def _log(message: str) -> None:
    print(f"[gpu_checks {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True, default=str) + "\n")


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --commit)"


def _unpack_mnist(tarball: Path, data_dir: Path) -> None:
    target = data_dir / "mnist"
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")


def _backends(asked: list[str] | None) -> list[tuple[str, bool]]:
    """(backend, compile) pairs to measure: `asked`, or every installed backend (on the
    lent machine PyTorch and JAX), PyTorch both eager and with --compile. The compiled
    one comes last: its compilations take the longest and are the least needed, so a
    budget that runs out cuts it rather than a backend."""
    from normbench import backends

    eager = [(backends.canonical_name(name), False) for name in asked or backends.available()]
    return eager + [(name, True) for name, _ in eager if name == "torch"]


def _environment(device: str, commit: str, asked: list[str] | None) -> dict:
    from normbench import backends

    engines = {}
    for name, _ in _backends(asked):
        if name in engines:
            continue
        try:
            engine = backends.get_engine(name, device=device)
            engines[name] = {"device": engine.device_description(), "versions": engine.versions()}
        except Exception as exc:  # noqa: BLE001 - reported, the step goes on without it
            engines[name] = {"unavailable": str(exc)}
    return {"commit": commit, "device": device, "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "python": sys.version.split()[0], "host": os.uname().nodename, "cpus": os.cpu_count(), "engines": engines}


def _parity(device: str, asked: list[str] | None, steps: int) -> tuple[bool, str]:
    from normbench import parity, spec as specs

    chosen = [name for name, compiled in _backends(asked) if not compiled]
    return parity.run_parity(specs.load(SPEC), steps=steps, dtype="float32", backends=chosen, device=device)


def _throughput(device: str, asked: list[str] | None, out: Path, stop_at: float) -> dict:
    """Each backend's measurement, one after another, none started after `stop_at` (a
    monotonic time that leaves the later steps their estimated seconds)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_throughput

    measured = {}
    for name, compiled in _backends(asked):
        label = f"{name} --compile" if compiled else name
        if time.monotonic() > stop_at:
            measured[label] = {"failed": "skipped: the budget left was kept for the later steps"}
            _log(f"throughput: {label} {measured[label]['failed']}")
            _write_json(out / "throughput.json", measured)
            continue
        _log(f"throughput: {label}")
        try:
            measured[label] = bench_throughput.measure(name, device=device, compile=compiled)
        except Exception as exc:  # noqa: BLE001 - one backend's failure keeps the others
            measured[label] = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        _write_json(out / "throughput.json", measured)  # after every backend: nothing measured is lost
    return measured


def _main_job(device: str, asked: list[str] | None, out: Path) -> dict:
    """`normbench reproduce` of the spec on the device with the (eager) backends present:
    its wall time and exit status; its output folder (tables, curves, every run's metrics
    and provenance) comes back as main-job.tar.gz."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import _harness
    from normbench import cli, spec as specs

    chosen = [name for name, compiled in _backends(asked) if not compiled]
    spec = specs.load(SPEC)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "main-job"
        command = ["reproduce", SPEC, "--device", device, "--out", str(folder), "--no-progress"]
        seeds = len(spec.seeds)
        if _harness.quick():  # trying the script: the code path, not the job
            seeds, command = 2, command + ["--seeds", "2", "--steps", "20"]
        for name in chosen:
            command += ["--backend", name]
        start = time.perf_counter()
        try:
            code = cli.main(command)
        finally:  # what ran comes back, a failed job's output too
            wall = time.perf_counter() - start
            with tarfile.open(out / "main-job.tar.gz", "w:gz") as archive:
                archive.add(folder, arcname="main-job")
        table = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    _log(f"main_job: exited {code} after {wall:.1f} s")
    if code != 0:
        raise RuntimeError(f"normbench {' '.join(command)} exited {code}")
    return {"command": "normbench " + " ".join(command[:4] + command[6:]), "backends": chosen, "exit": code,
            "wall_s": wall, "runs": len(spec.variants) * seeds * len(chosen), "table": table}


def _runs(device: str, asked: list[str] | None, out: Path) -> list[dict]:
    from normbench import cli

    summaries = []
    with tempfile.TemporaryDirectory() as scratch:
        try:
            for name, compiled in _backends(asked):
                if compiled:
                    continue
                start = time.perf_counter()
                code = cli.main(["run", SPEC, "--backend", name, "--device", device, "--seeds", "1",
                                 "--out", str(Path(scratch) / name)])
                summaries.append({"backend": name, "exit": code, "wall_s": time.perf_counter() - start})
                _log(f"runs: {name} exited {code} after {summaries[-1]['wall_s']:.1f} s")
                if code != 0:
                    raise RuntimeError(f"normbench run {SPEC} --backend {name} exited {code}")
        finally:  # what ran comes back, a failed run's output too
            with tarfile.open(out / "runs.tar.gz", "w:gz") as archive:
                archive.add(scratch, arcname="runs")
    return summaries


def measure(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mnist:
        data_dir = Path(tempfile.mkdtemp(prefix="normbench-data-"))
        _unpack_mnist(Path(args.mnist), data_dir)
        os.environ["NORMBENCH_DATA_DIR"] = str(data_dir)
    deadline = time.monotonic() + args.budget_s
    status = {}
    environment = _environment(args.device, _commit(args.commit), args.backends)
    environment["command"] = " ".join(sys.argv)
    _write_json(out / "environment.json", environment)
    steps = {"parity": lambda: _parity(args.device, args.backends, args.parity_steps),
             "throughput": lambda: _throughput(args.device, args.backends, out, deadline - sum(
                 ESTIMATED_S[later] for later in list(ESTIMATED_S)[list(ESTIMATED_S).index("throughput") + 1:]
                 if later in args.steps)),
             "main_job": lambda: _main_job(args.device, args.backends, out),
             "runs": lambda: _runs(args.device, args.backends, out)}
    for name in ESTIMATED_S:
        step = steps[name]
        if name not in args.steps:
            continue
        left = deadline - time.monotonic()
        if left < ESTIMATED_S[name] * (0.05 if args.device == "cpu" else 1.0):
            status[name] = f"skipped: {left:.0f} s of the budget left, the step takes about {ESTIMATED_S[name]} s"
            _log(status[name])
            continue
        _log(f"{name}: start ({left:.0f} s of the budget left)")
        start = time.perf_counter()
        try:
            result = step()
            if name == "parity":
                ok, text = result
                (out / "parity.txt").write_text(text + "\n")
                status[name] = "passed" if ok else "FAILED (see parity.txt)"
            elif name in ("runs", "main_job"):
                status[name] = result
            else:
                status[name] = "done"
        except Exception as exc:  # noqa: BLE001 - the next step still runs
            status[name] = f"failed: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        _log(f"{name}: {status[name] if isinstance(status[name], str) else 'done'} in {time.perf_counter() - start:.0f} s")
        environment["steps"] = status
        environment["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        _write_json(out / "environment.json", environment)
    return 0 if all(isinstance(s, (list, dict)) or s in ("passed", "done") for s in status.values()) else 1


# ----------------------------------------------------------------------------- publish


def _run_table(measured: dict) -> list[str]:
    """Seconds per run and runs per hour at each group size measured, per backend."""
    sizes = sorted({c["group_size"] for m in measured.values() for c in m.get("cells", [])})
    lines = ["| backend | " + " | ".join(f"group of {s}: s per run | runs per hour" for s in sizes) + " |",
             "|---|" + "---|---|" * len(sizes)]
    for label, m in measured.items():
        cells = []
        for size in sizes:
            runs = [c["run_s"] for c in m.get("cells", []) if c["group_size"] == size]
            cells += [f"{statistics.mean(runs):.2f}", f"{3600 / statistics.mean(runs):.0f}"] if runs else ["n/a", "n/a"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _step_table(measured: dict) -> list[str]:
    """Milliseconds per training step of each variant (a run alone, group size 1), and each
    variant's step over the spec's first variant's (mnist-cnn's unnormalized network: the
    overhead of a normalization), measured side by side."""
    variants = [c["variant"] for c in next(iter(measured.values()))["cells"] if c["group_size"] == 1]
    baseline, others = variants[0], variants[1:]
    lines = ["Training step of a run alone (ms, medians side by side in one process), and each variant's "
             f"over {baseline}'s:", "",
             "| backend | " + " | ".join(variants) + " | " + " | ".join(f"{v} / {baseline}" for v in others) + " |",
             "|---|" + "---|" * (len(variants) + len(others))]
    for label, m in measured.items():
        step = {c["variant"]: c["step_s"] for c in m["cells"] if c["group_size"] == 1}
        ratios = [f"{step[v] / step[baseline]:.2f}" if {v, baseline} <= step.keys() else "n/a" for v in others]
        lines.append(f"| {label} | " + " | ".join(f"{step[v] * 1e3:.2f}" if v in step else "n/a" for v in variants)
                     + " | " + " | ".join(ratios) + " |")
    return lines


def _per_run(m: dict) -> dict:
    """A run alone (group size 1): evaluation per 10k images, evaluation share, the FLOP
    floor's ratio and rate; and the main job at the engine's default group size and at the
    fastest group size measured."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_throughput

    run = bench_throughput._Run()  # the CPU record's formulas, read from the same measurement
    figures = {
        "evaluation_s_per_10k": run.track_evaluation_seconds_per_10k_images(m),
        "evaluation_share": run.track_evaluation_share(m),
        "matmul_gflop_s": m["matmul_flops_per_s"] / 1e9,
    }
    if "run_flops" in m:
        figures["run_to_flop_floor"] = run.track_run_to_flop_floor(m)
    # The main job at every group size measured (the asv figure takes the default's only).
    by_size = {}
    for c in m["cells"]:
        by_size.setdefault(c["group_size"], []).append(c["run_s"] * m["seeds"])
    totals = {size: sum(v) for size, v in by_size.items()}
    default = min(m["fastest_group_size"], m["seeds"])
    figures["main_job_default_s"] = totals.get(default, totals[1])
    figures["default_group_size"] = default if default in totals else 1
    figures["fastest_group_size"] = min(totals, key=totals.get)
    figures["main_job_fastest_s"] = totals[figures["fastest_group_size"]]
    return figures


def publish(args) -> int:
    source, out = Path(args.dir), Path(args.out)
    environment = json.loads((source / "environment.json").read_text())
    measured = json.loads((source / "throughput.json").read_text()) if (source / "throughput.json").exists() else {}
    ok = {k: v for k, v in measured.items() if "cells" in v}
    failed = {k: v["failed"] for k, v in measured.items() if "failed" in v}
    out.mkdir(parents=True, exist_ok=True)
    devices = "; ".join(f"{k}: {v.get('device', v.get('unavailable'))}" for k, v in environment["engines"].items())
    lines = [
        f"# normbench on a GPU: the main job's throughput ({environment['device']})", "",
        "<!-- Generated by `python scripts/gpu_checks.py publish` from the files `measure` wrote on the GPU "
        "machine. Do not edit. -->", "",
        f"Commit `{environment['commit'][:12]}`, measured {environment['started_utc'][:16].replace('T', ' ')} UTC "
        f"on {environment['host']} ({environment['cpus']} CPU cores; {devices}) by `{environment['command']}`. "
        "Each backend in one process, steps timed side by side, as `benchmarks/bench_throughput.py` times the CPU "
        "record (its docstring says how a run's time is projected); raw values: [throughput.json](throughput.json), "
        "provenance: [provenance.json](provenance.json).", "",
    ]
    if any(m.get("quick") for m in ok.values()):
        lines += ["**Measured with NORMBENCH_BENCH_QUICK: tiny counts that try the code path, not a measurement.**", ""]
    status = environment.get("steps", {})
    if "parity" in status:
        summary = ""
        if (source / "parity.txt").exists():
            text = (source / "parity.txt").read_text().splitlines()
            summary = next((line for line in text if "quantities within tolerance" in line), "")
            (out / "parity.txt").write_text("\n".join(text) + "\n")
        lines += ["## Parity on the device", "",
                  f"`normbench parity {SPEC}` between the backends on the GPU (float32 trajectories, "
                  f"each also against a float64 reference): {status['parity']}" + (f"; {summary}" if summary else "")
                  + ". Full table: [parity.txt](parity.txt).", ""]
    if ok:
        lines += ["## Seconds per run of the main job, and runs per hour, by group size", "", *_run_table(ok), ""]
        figures = {label: _per_run(m) for label, m in ok.items()}
        lines += ["## One run alone, and the main job (every variant x 10 seeds)", "",
                  "| backend | evaluation per 10k images | evaluation share | run / FLOP floor | float32 matrix "
                  "product (GFLOP/s) | main job at the default group size | main job at the fastest measured |",
                  "|---|---|---|---|---|---|---|"]
        for label, f in figures.items():
            floor = f"{f['run_to_flop_floor']:.1f}" if "run_to_flop_floor" in f else "n/a"
            lines.append(f"| {label} | {f['evaluation_s_per_10k'] * 1e3:.1f} ms | {f['evaluation_share']:.1%} | {floor} | "
                         f"{f['matmul_gflop_s']:.0f} | {f['main_job_default_s']:.0f} s (groups of "
                         f"{f['default_group_size']}) | {f['main_job_fastest_s']:.0f} s (groups of "
                         f"{f['fastest_group_size']}) |")
        eager = {label: f for label, f in figures.items() if "--compile" not in label}
        total = sum(f["main_job_fastest_s"] for f in eager.values())
        runs = sum(ok[label]["seeds"] * len({c["variant"] for c in ok[label]["cells"]}) for label in eager)
        lines += ["", f"The main job's wall time on this GPU projected from these steps ({', '.join(eager)}, one "
                  f"after another, each at its fastest measured group size): {total / 60:.1f} minutes, "
                  f"{3600 * runs / total:.0f} runs per hour. On a GPU the FLOP floor says little about cnn3: at its "
                  "sizes a step is a few hundred kernel launches of microseconds each, far below the rate a large "
                  "matrix product reaches.", "",
                  *_step_table(ok), ""]
    job = status.get("main_job")
    if isinstance(job, dict):
        lines += ["## The main job, run", "",
                  f"`{job['command']}` on the GPU ({', '.join(job['backends'])}; this machine has no TensorFlow), "
                  f"exit {job['exit']}: {job['runs']} runs in **{job['wall_s']:.0f} s wall** ({job['wall_s'] / 60:.1f} "
                  f"minutes, {3600 * job['runs'] / job['wall_s']:.0f} runs per hour) with data loading, compilations, "
                  "evaluation and writing. Its table ([main-job.tar.gz](main-job.tar.gz) "
                  "holds it, the curves and every run's metrics and provenance):", "", job["table"].strip(), ""]
    if isinstance(status.get("runs"), list) and status["runs"]:
        lines += ["## Real runs against the projection", "",
                  f"`normbench run {SPEC} --seeds 1` per backend (one seed of every variant; wall time with data "
                  "loading, compilation and writing; [runs.tar.gz](runs.tar.gz) holds their metrics and "
                  "provenance), against the projection above of the same runs alone:", "",
                  "| backend | measured wall time | projected |", "|---|---|---|"]
        for run in status["runs"]:
            cells = [c["run_s"] for c in ok.get(run["backend"], {}).get("cells", []) if c["group_size"] == 1]
            lines.append(f"| {run['backend']} | {run['wall_s']:.1f} s | " + (f"{sum(cells):.1f} s |" if cells else "n/a |"))
        lines.append("")
    missing = [f"- {k}: {v}" for k, v in failed.items()] + [
        f"- {name}: {value}" for name, value in status.items()
        if isinstance(value, str) and value.startswith(("skipped", "failed"))]
    if missing:
        lines += ["## Not measured", "", *missing, ""]
    (out / "README.md").write_text("\n".join(lines).rstrip() + "\n")
    if measured:
        _write_json(out / "throughput.json", measured)
    for name in ("runs.tar.gz", "main-job.tar.gz"):
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    _write_json(out / "provenance.json", {**environment, "published_by": "python scripts/gpu_checks.py publish "
                                          f"{args.dir} --out {args.out}"})
    print(f"wrote {out / 'README.md'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("measure", help="run the checks on this machine's GPU (or --device cpu to try the script)")
    p.add_argument("--out", required=True, help="folder for the measured files")
    p.add_argument("--device", default="cuda", help="device of every backend (default: %(default)s)")
    p.add_argument("--mnist", help="a tarball of MNIST's four IDX files, unpacked into a fresh data folder")
    p.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD where git works)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds the whole measurement may take (default: %(default)s)")
    p.add_argument("--steps", nargs="+", default=list(ESTIMATED_S), choices=list(ESTIMATED_S), help="steps to run")
    p.add_argument("--backend", action="append", dest="backends", help="backend to check (repeatable; default: all installed)")
    p.add_argument("--parity-steps", type=int, default=PARITY_STEPS, help="compared training steps (default: %(default)s)")
    p = sub.add_parser("publish", help="write the published tables from the files `measure` wrote")
    p.add_argument("dir", help="the folder `measure` wrote")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "gpu"), help="where to publish (default: %(default)s)")
    args = parser.parse_args(argv)
    return measure(args) if args.command == "measure" else publish(args)


if __name__ == "__main__":
    sys.exit(main())
