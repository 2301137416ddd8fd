"""Where a sweep's runs execute: `normbench run/reproduce --executor NAME`.

    local      this process, one run after another (the default; runner.run_sweep)
    processes  a dask.distributed LocalCluster of --workers N processes on this machine
    dask       any running Dask cluster, reached at --scheduler ADDRESS

Whatever the executor, one run is one unit of work identified by its run key
(runner.run_key), and the results directory is written only by the submitting process,
exactly as a local sweep writes it: a worker trains a run and sends back its metrics and
provenance record; no shared file system is needed. A sweep's results are therefore the
same whichever executor ran it (except wall_time_s and the device fields of provenance),
and resume, locking and metrics.csv behave as documented in normbench.runner.

Each executor is one module here, named in EXECUTORS and imported only when chosen, so
`import normbench` never imports dask. A module provides `open(workers, scheduler, log)`,
a context manager yielding an object with
`run_sweep(spec, backend_names, out, *, device, data_dir, progress, log, compile) -> list[RunResult]`
(`compile` as in runner.run_sweep; the local executor's also takes `group_size`).
"""

from __future__ import annotations

import importlib

# name -> module (relative to this package)
EXECUTORS = {"local": "local", "processes": "processes", "dask": "scheduler"}
DEFAULT = "local"


class ExecutorError(RuntimeError):
    """An executor cannot be used as asked (bad options, an unreachable scheduler, dask not
    installed, a worker refusing a run). One line; the CLI exits 2."""


class RunsFailed(RuntimeError):
    """Some runs failed on the cluster after their retries; every other run was written.
    One line; the CLI exits 1. Re-running the command retries just those runs."""


def names() -> list[str]:
    return list(EXECUTORS)


def check_options(executor: str, workers: int | None, scheduler: str | None, group_size: int | None = None) -> None:
    """Reject option combinations that make no sense, naming the option and the fix."""
    if executor not in EXECUTORS:
        raise ExecutorError(f"--executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    if group_size is not None and executor != "local":
        # A cluster's unit of work is one run (its worker places the data once and trains
        # runs one by one); grouping runs is the local executor's.
        raise ExecutorError(f"--group-size is only for --executor local (got --executor {executor}); "
                            "drop --group-size or use --executor local")
    if workers is not None and executor != "processes":
        raise ExecutorError(f"--workers is only for --executor processes (got --executor {executor}); "
                            "add --executor processes or drop --workers")
    if scheduler is not None and executor != "dask":
        raise ExecutorError(f"--scheduler is only for --executor dask (got --executor {executor}); "
                            "add --executor dask or drop --scheduler")
    if executor == "dask" and not scheduler:
        raise ExecutorError("--executor dask needs --scheduler ADDRESS (e.g. tcp://head-node:8786, "
                            "printed by `dask scheduler`)")


def open(executor: str = DEFAULT, *, workers: int | None = None, scheduler: str | None = None, log=print):  # noqa: A001
    """The executor `executor`, as a context manager (a cluster is started or connected
    on entry and released on exit)."""
    check_options(executor, workers, scheduler)
    module = importlib.import_module(f"{__name__}.{EXECUTORS[executor]}")
    return module.open(workers=workers, scheduler=scheduler, log=log)
