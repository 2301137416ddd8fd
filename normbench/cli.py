"""The `normbench` command-line tool.

Invalid input (a bad spec, an unknown backend, an absent device, unusable data) exits
with code 2 and one line on stderr, never a traceback. Finished runs are always kept:
an interrupted command resumes when re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

EXIT_FAILED = 1  # some runs failed on a cluster; every other run is kept
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input detected by normbench itself."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _apply_overrides(spec, seeds: int | None, steps: int | None):
    changes = {}
    if seeds is not None:
        changes["seeds"] = seeds
    if steps is not None:
        changes["steps"] = steps
        changes["eval_every"] = min(spec.eval_every, steps)
        # An explicit --steps caps variants that set their own budget too.
        changes["variants"] = [dataclasses.replace(v, steps=min(v.steps, steps) if v.steps else None) for v in spec.variants]
    return spec.replace(**changes) if changes else spec


def _grouping(args) -> dict:
    """run_sweep's group_size and compile, passed only when given (the cluster executors
    take no group_size; check_options says so)."""
    return {**({} if args.group_size is None else {"group_size": args.group_size}),
            **({"compile": True} if args.compile else {})}


def _progress_enabled(args) -> bool:
    return not args.no_progress


def _add_run_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--seeds", type=_positive_int, help="run seeds 0..N-1 instead of the spec's seeds")
    p.add_argument("--steps", type=_positive_int, help="override the number of training steps (for quick looks)")
    p.add_argument("--device", help="device for the backend, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--out", help=f"results directory (default: {default_out})")
    p.add_argument("--data-dir", help="data cache directory (default: $NORMBENCH_DATA_DIR or ~/.cache/normbench)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch: compile the training step and the evaluation with torch.compile (the first of each then takes seconds; "
                        "JAX and TensorFlow always compile theirs); recorded in each run's provenance")
    p.add_argument("--group-size", type=_positive_int, metavar="N",
                   help="train up to N seeds of a variant together, in one vectorized step where the backend can "
                        "(torch, jax); results and run keys are those of the runs alone (default: the fastest "
                        "measured for the device: 1 on CPU, 10 on a GPU)")
    p.add_argument("--executor", default="local", metavar="NAME",
                   help="where runs execute: local (this process, the default), processes (a local Dask cluster "
                        "of --workers processes) or dask (the Dask cluster at --scheduler); see docs/cluster.md")
    p.add_argument("--workers", type=_positive_int,
                   help="worker processes of --executor processes (default: the cores this process may run on)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler of --executor dask, e.g. tcp://head:8786")


class _Once(argparse.Action):
    """An option given at most once: `normbench run` trains one backend, and a second
    --backend would otherwise replace the first without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r}, {values!r}); "
                         f"`run` trains one backend: run it once per backend, or use `normbench reproduce`")
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), like every other error.
    Subparsers inherit the class, so `normbench run --steps 0` behaves the same way."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"normbench: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normbench", description="Benchmark the standardization loss against batch norm, identically across PyTorch, JAX and TensorFlow.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a spec (bundled name or .toml path) on one backend")
    p.add_argument("spec", help="bundled spec name (see `normbench specs`) or path to a .toml spec")
    p.add_argument("--backend", required=True, action=_Once, help="torch, jax or tensorflow (see `normbench backends`)")
    _add_run_options(p, default_out="runs/<spec name>")

    p = sub.add_parser("reproduce", help="reproduce a named paper experiment (tables and figures)")
    p.add_argument("experiment", help="experiment name (see `normbench list`), or all")
    p.add_argument("--backend", action="append", dest="backends", help="backend to run (repeatable; default: the experiment's)")
    _add_run_options(p, default_out="results/<experiment>; with `all`, one per experiment under it")

    p = sub.add_parser("report", help="rebuild tables and figures of a results directory from its stored metrics")
    p.add_argument("dir", help="results directory written by `run` or `reproduce`")
    p.add_argument("--experiment", help="compare with this paper experiment (default: recorded in the directory)")

    p = sub.add_parser("parity", help="run a spec on every available backend from the same weights and batches and compare")
    p.add_argument("spec", help="bundled spec name or path to a .toml spec")
    p.add_argument("--steps", type=_positive_int, default=50, help="training steps whose losses are compared (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="precision (default: the spec's dtype; float32 also compares each backend with a float64 run)")
    p.add_argument("--backend", action="append", dest="backends", help="backend to include (repeatable; default: all available)")
    p.add_argument("--device", help="device of every backend, e.g. cpu, cuda, cuda:1 (default: cpu)")

    p = sub.add_parser("specs", help="list bundled specs, or print one to copy")
    p.add_argument("name", nargs="?", help="print this bundled spec's TOML")
    p.add_argument("--format", action="store_true", help="describe every spec field")

    sub.add_parser("backends", help="list backends and whether they are installed")
    sub.add_parser("datasets", help="list data sets")
    p = sub.add_parser("models", help="list architectures with parameter counts and forward FLOPs per example")
    p.add_argument("--normalization", default="none",
                   help="method in every normalization slot while counting (default: %(default)s; published "
                        "counts of batch-normalized networks include its scale and shift)")
    sub.add_parser("list", help="list bundled specs, experiments, backends and data sets")
    return parser


# ----------------------------------------------------------------------------- commands


def _open_executor(args):
    from normbench import executors

    return executors.open(args.executor, workers=args.workers, scheduler=args.scheduler, log=_info)


def _cmd_run(args) -> int:
    from normbench import backends, executors, spec as spec_module

    executors.check_options(args.executor, args.workers, args.scheduler, args.group_size)
    spec = _apply_overrides(spec_module.load(args.spec), args.seeds, args.steps)
    backend = backends.canonical_name(args.backend)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    with _open_executor(args) as executor:
        results = executor.run_sweep(spec, [backend], out, device=args.device, data_dir=args.data_dir,
                                     progress=_progress_enabled(args), log=_info, **_grouping(args))
    _print_run_summary(results, out)
    return 0


def _cmd_reproduce(args) -> int:
    from normbench import executors, experiments

    executors.check_options(args.executor, args.workers, args.scheduler, args.group_size)
    if args.experiment != "all":  # an unknown name fails before a cluster is started
        try:
            experiments.get(args.experiment)
        except KeyError as exc:
            raise UsageError(exc.args[0]) from None
    with _open_executor(args) as executor:  # one cluster for every experiment of `all`
        if args.experiment == "all":  # every experiment, each into <--out or results>/<name>
            root = Path(args.out) if args.out else Path("results")
            for name in experiments.names():
                _reproduce(argparse.Namespace(**{**vars(args), "experiment": name, "out": str(root / name)}), executor)
            return 0
        return _reproduce(args, executor)


def _reproduce(args, executor) -> int:
    from normbench import backends, experiments, provenance, reporting, spec as spec_module

    experiment = experiments.get(args.experiment)
    spec = _apply_overrides(spec_module.load(experiment.spec), args.seeds, args.steps)
    chosen = [backends.canonical_name(b) for b in (args.backends or experiment.default_backends)]
    out = Path(args.out) if args.out else Path("results") / experiment.name
    out.mkdir(parents=True, exist_ok=True)
    # Backends that run the same number of seeds share one sweep (an experiment may ask
    # for fewer seeds on some backends; an explicit --seeds applies to every backend).
    seeds_of = {b: len(spec.seeds) if args.seeds else experiment.seeds_for(b, len(spec.seeds)) for b in chosen}
    (out / "experiment.json").write_text(json.dumps({"experiment": experiment.name, "backends": chosen,
                                                     "seeds": seeds_of, "command": provenance.command_line()},
                                                    indent=2) + "\n")
    groups: dict[int, list[str]] = {}
    for backend in chosen:
        groups.setdefault(seeds_of[backend], []).append(backend)
    # Fewest seeds first: each sweep rewrites <out>/spec.toml, and the last one, with the
    # most seeds, leaves the spec whose seeds every backend's runs are drawn from.
    for seeds, members in sorted(groups.items()):
        executor.run_sweep(spec if seeds == len(spec.seeds) else spec.replace(seeds=seeds), members, out,
                           device=args.device, data_dir=args.data_dir, progress=_progress_enabled(args), log=_info,
                           **_grouping(args))
    built = reporting.build_report(out, experiment.name)
    print(built["markdown"])
    print(f"wrote {out}/table.md, table.tex, table.csv and {', '.join(str(p) for p in built['figures'])}")
    index = reporting.update_index(out)  # results/README.md, when out is results/<experiment>
    if index:
        print(f"updated {index}")
    return 0


def _cmd_report(args) -> int:
    from normbench import experiments, reporting

    if args.experiment and args.experiment not in experiments.names():
        raise UsageError(f"unknown experiment {args.experiment!r}; choose from {', '.join(experiments.names())}")
    if reporting.is_results_root(args.dir):  # a folder of experiment folders: rebuild each, then the index
        for built in reporting.build_all(args.dir):
            print(f"wrote {', '.join(str(p) for p in built['figures'])} and their tables")
        print(f"wrote {Path(args.dir) / reporting.INDEX_NAME}")
        return 0
    built = reporting.build_report(args.dir, args.experiment)
    print(built["markdown"])
    print(f"wrote {args.dir}/table.md, table.tex, table.csv and {', '.join(str(p) for p in built['figures'])}")
    index = reporting.update_index(args.dir)
    if index:
        print(f"updated {index}")
    return 0


def _cmd_parity(args) -> int:
    from normbench import backends, parity, spec as spec_module

    spec = spec_module.load(args.spec)
    chosen = [backends.canonical_name(b) for b in args.backends] if args.backends else backends.available()
    if len(chosen) < 2:
        raise UsageError(f"parity needs at least two installed backends, have {chosen}; install more with pip install 'normbench[all]'")
    ok, text = parity.run_parity(spec, steps=args.steps, dtype=args.dtype or spec.dtype, backends=chosen, device=args.device)
    print(text)
    if not ok:
        print("normbench: parity: at least one quantity exceeded its tolerance (marked FAIL above)", file=sys.stderr)
    return 0 if ok else 1


def _cmd_specs(args) -> int:
    from normbench import spec as spec_module

    if args.format:
        print(SPEC_FORMAT.replace("{plugins}", _plugin_format()))
        return 0
    bundled = spec_module.bundled_specs()
    if args.name:
        if args.name not in bundled:
            raise UsageError(f"no bundled spec {args.name!r}; bundled: {', '.join(bundled)}")
        print(bundled[args.name].read_text(), end="")
        return 0
    for name, path in bundled.items():
        s = spec_module.load(path)
        print(f"{name:12s} {s.description}")
    print("\n`normbench specs NAME > my.toml` copies one; `normbench specs --format` documents the fields.")
    return 0


def _plugin_format() -> str:
    """Every normalization method, auxiliary loss and augmentation with its options, from the registries."""
    from normbench import augmentations, auxiliary_losses, normalizations

    lines = []
    for title, registry in (("normalization methods", normalizations), ("auxiliary losses", auxiliary_losses)):
        lines.append(f"\n{title}:")
        for name, cls in registry.REGISTRY.items():
            lines.append(f"  {name:22s} {cls.summary}")
            lines.extend(f"      {option.describe()}" for option in cls.options)
    lines.append("\naugmentations (top-level `augmentations`; each for one kind of data set):")
    for name in augmentations.names():
        augmentation = augmentations.get(name)
        lines.append(f"  {name:22s} {augmentation.input.replace('_', ' ')}: {augmentation.description}")
        lines.extend(f"      {option.describe()}" for option in augmentation.options)
    return "\n".join(lines)


def _cmd_backends(_args) -> int:
    from normbench import backends

    for name in backends.names():
        state = "available" if backends.is_available(name) else ("framework not installed" if backends.is_implemented(name) else "not implemented")
        print(f"{name:11s} {state}")
    return 0


def _cmd_datasets(_args) -> int:
    from normbench import datasets

    width = max(map(len, datasets.names()))
    for name in datasets.names():
        print(f"{name:{width}s} {datasets.describe(name)}")
    return 0


def _cmd_models(args) -> int:
    from normbench import architectures, normalizations
    from normbench.plan import architecture_counts
    from normbench.spec import PluginSpec

    if args.normalization not in normalizations.names():
        raise UsageError(f"--normalization: unknown method {args.normalization!r}; known: {', '.join(normalizations.names())}")
    rows = []
    for name, arch in architectures.REGISTRY.items():
        try:
            counts = architecture_counts(arch, PluginSpec(args.normalization))
        except ValueError as exc:  # the method does not fit this network: say why, count the others
            counts = {"parameters": None, "flops": None, "why": str(exc)}
        shape = "x".join(map(str, arch.input_shape))
        rows.append((name, "small" if arch.small else "full", shape, arch.num_classes, counts))
    print(f"parameters with normalization = {args.normalization}; forward FLOPs per example (2 x multiply-accumulates "
          f"of convolutions and dense layers)")
    print(f"{'architecture':20s} {'size':5s} {'input':>11s} {'classes':>7s} {'parameters':>12s} {'MFLOPs':>10s}")
    for name, size, shape, classes, counts in rows:
        if counts["parameters"] is None:
            print(f"{name:20s} {size:5s} {shape:>11s} {classes:7d} {'n/a':>12s} {'n/a':>10s}  ({counts['why']})")
        else:
            print(f"{name:20s} {size:5s} {shape:>11s} {classes:7d} {counts['parameters']:12,d} "
                  f"{counts['flops'] / 1e6:10.2f}")
    return 0


def _cmd_list(args) -> int:
    from normbench import architectures, auxiliary_losses, experiments, normalizations

    print("bundled specs:")
    _cmd_specs(argparse.Namespace(format=False, name=None))
    print("\nexperiments (normbench reproduce NAME):")
    for name, e in experiments.by_name().items():
        print(f"  {name:26s} {e.figure}: {e.title}")
    print("\narchitectures (spec `model`):")
    for name, arch in architectures.REGISTRY.items():
        print(f"  {name:26s} {arch.description}")
    print("\nnormalization methods (variant `normalization`):")
    for name, cls in normalizations.REGISTRY.items():
        print(f"  {name:26s} {cls.summary}")
    print("\nauxiliary losses (variant `auxiliary_losses`):")
    for name, cls in auxiliary_losses.REGISTRY.items():
        print(f"  {name:26s} {cls.summary}")
    print("\nbackends:")
    _cmd_backends(args)
    print("\ndata sets:")
    _cmd_datasets(args)
    return 0


def _print_run_summary(results, out: Path) -> None:
    ok = [r for r in results if r.status == "ok"]
    diverged = [r for r in results if r.status == "diverged"]
    reused = sum(r.reused for r in results)
    print(f"{len(results)} runs in {out} ({reused} reused, {len(diverged)} diverged); metrics: {out / 'metrics.csv'}")
    for r in ok:
        print(f"  {r.run_dir.relative_to(out)}: final test accuracy {100 * r.final_test_accuracy:.2f}%")
    for r in diverged:
        print(f"  {r.run_dir.relative_to(out)}: diverged at step {r.diverged_at_step}")


def _one_line(exc: BaseException) -> str:
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _info(message: str) -> None:
    print(message, file=sys.stderr)


COMMANDS = {"run": _cmd_run, "reproduce": _cmd_reproduce, "report": _cmd_report, "parity": _cmd_parity, "specs": _cmd_specs,
            "backends": _cmd_backends, "datasets": _cmd_datasets, "models": _cmd_models,
            "list": _cmd_list}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)  # _Parser exits 2 with a one-line message on bad usage
    from normbench import provenance

    provenance.set_command_line(["normbench", *argv])
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from normbench.backends import BackendUnavailable, UnknownBackend
    from normbench.datasets import DatasetError
    from normbench.executors import ExecutorError, RunsFailed
    from normbench.runner import ResultsConflict
    from normbench.spec import SpecError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, SpecError, UnknownBackend, BackendUnavailable, DatasetError, ResultsConflict, ExecutorError,
            OSError) as exc:
        # One line, always: multi-line messages (a data fetch lists every source tried) are folded.
        print(f"normbench: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except RunsFailed as exc:  # the other runs are written; re-running retries these
        print(f"normbench: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("normbench: interrupted; finished runs are kept, re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


SPEC_FORMAT = """\
normbench spec format (TOML). Unknown keys, wrong types and impossible values are rejected.

top level
  name                 string, required         experiment name (used for the default output folder)
  description          string                   one line shown by `normbench specs`
  model                an architecture (`normbench list`)
  dataset              a data set (`normbench datasets`)
  dtype                float32 | float64        (default float32)
  batch_size           integer >= 1
  steps                integer >= 1             SGD updates per run
  eval_every           integer >= 1             evaluate test set + training subset every N steps (and at 0 and the end)
  eval_resolution      number in (0, 1)         also evaluate the test set on a geometric grid, so steps to an accuracy
                                                are known within this fraction (the speed-up metric; default: off)
  train_eval_examples  integer >= 1             size of the fixed training subset evaluated (default 10000)
  test_examples        integer >= 1             evaluate the first N test examples only (smoke runs; default: all)
  seeds                integer N (seeds 0..N-1) or a list of distinct integers >= 0
  track_percentiles    list of layer names      record the 1/20/80/99th percentiles of these pre-activations
  augmentations        list of names or inline  training batches augmented on the host, in order, from the run's
                       tables                   own random stream (identical in every backend; evaluation sees the
                                                data as stored), e.g. ["horizontal_flip", { name = "random_crop",
                                                padding = 4 }] (default: none)

[optimizer]            name = sgd | rmsprop | adam; learning_rate > 0; weight_decay >= 0 (0.5*wd*sum(kernel^2))
  reference_batch_size integer >= 1 (optional)  learning_rate is the rate at this batch size; a run at batch b
                                                uses learning_rate * b / reference_batch_size (linear scaling)
  sgd:      momentum in [0, 1) (default 0), nesterov (bool, needs momentum > 0)
  rmsprop:  decay in [0, 1) (0.9), momentum in [0, 1) (0), epsilon > 0 (1e-10, inside the sqrt)
  adam:     beta1 (0.9), beta2 (0.999) in [0, 1), epsilon > 0 (1e-8)
[schedule]             name = constant | step_decay | piecewise; warmup_steps >= 0 (linear ramp from 0)
  step_decay: decay_rate in (0, 1], decay_every >= 1 (steps), or decay_every_epochs > 0 (epochs of the
              variant's batch size: a batch-size sweep's variants decay after the same examples)
  piecewise:  boundaries (increasing steps), multipliers (len(boundaries) + 1 factors)
[[variant]]            one table per method compared:
  name                 letters, digits, - _ .
  normalization        a method name, or an inline table { name = "group_norm", groups = 4 } (default "none")
  affine               true: a learned per-channel scale and shift after every slot (default false)
  auxiliary_losses     list of inline tables [{ name = "standardization", weight = 1.0 }, ...]
  steps                optional per-variant budget (e.g. a longer baseline)
  batch_size           optional per-variant batch size (a batch-size sweep; see reference_batch_size)
  model                optional per-variant architecture
  Legacy shorthands still load: normalization = "batch_norm_shift" | "batch_norm_scale_shift" |
  "standardization_loss" (with standardization_loss_weight).
[<method or loss>]     a top-level table named after a method or auxiliary loss sets option defaults for
                       every variant that uses it (e.g. [batch_norm] running_decay = 0.99)
{plugins}"""


if __name__ == "__main__":
    sys.exit(main())
