"""`--executor processes --workers N`: a dask.distributed LocalCluster of N worker
processes (one thread each) on this machine, started for the sweep and stopped after it.

Each worker's frameworks get cores / N intra-op threads, or $OMP_NUM_THREADS when it is
set: runs compared bit for bit need the same thread count (see tests/test_reliability.py),
and the provenance `device` field records it. Each worker is also bound to its own
cores / N of the cores this process may use (`dask_setup`, run as the worker starts):
PyTorch reads $OMP_NUM_THREADS, but JAX's XLA and TensorFlow size their thread pools by
the cores they may run on, so unbound workers each ran a thread per core of the machine
and competed for them. Bound (and with backends.base.keep_freed_memory), two workers on
the 2-core machine trained mnist-cnn's runs 1.2x (torch), 1.36x (JAX) and 1.45x
(TensorFlow) as fast as one run after another on both cores."""

from __future__ import annotations

import contextlib
import logging
import os

from normbench.executors import ExecutorError
from normbench.executors.dask_sweep import ALLOWED_FAILURES, DaskExecutor, import_distributed
from normbench.provenance import schedulable_cores

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WORKERS_VARIABLE = "NORMBENCH_LOCAL_WORKERS"  # set for the workers: how many share the cores


def worker_cores(index: int, workers: int, cores: list[int]) -> list[int]:
    """The cores worker `index` of `workers` is bound to: an equal share of `cores`, or one
    core each (shared round-robin) when there are more workers than cores."""
    if workers > len(cores):
        return [cores[index % len(cores)]]
    share = len(cores) // workers
    return cores[index * share:(index + 1) * share]


def default_workers() -> int:
    """`--workers` left out: one worker per core this process may run on."""
    return schedulable_cores()


def worker_threads(workers: int) -> int:
    """Each worker's intra-op threads where $OMP_NUM_THREADS does not choose: its share of the cores."""
    return max(1, schedulable_cores() // workers)


def dask_setup(worker):
    """Run by each worker process as it starts (a Dask preload), before any framework is
    imported: binds every thread of the process, and so every thread it starts later, to
    this worker's share of the cores. LocalCluster names its workers 0, 1, ..."""
    workers = os.environ.get(WORKERS_VARIABLE)
    if not workers or not hasattr(os, "sched_setaffinity") or not str(worker.name).isdigit():
        return
    cores = worker_cores(int(worker.name), int(workers), sorted(os.sched_getaffinity(0)))
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread), cores)


@contextlib.contextmanager
def open(workers=None, scheduler=None, log=print):  # noqa: A001
    distributed = import_distributed()
    import dask

    n = workers or default_workers()
    chosen = os.environ.get("OMP_NUM_THREADS")
    threads = chosen or str(worker_threads(n))
    env = {name: threads for name in THREAD_VARIABLES}
    if not chosen:  # a thread count the user chose is theirs to place
        env[WORKERS_VARIABLE] = str(n)
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        try:
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                               dashboard_address=":0", silence_logs=logging.ERROR, env=env,
                                               preload=[__name__])
        except Exception as exc:
            raise ExecutorError(f"--executor processes --workers {n}: cannot start a local Dask cluster "
                                f"({type(exc).__name__}: {exc}); try fewer --workers or --executor local") from None
        try:
            with distributed.Client(cluster, set_as_default=False) as client:
                log(f"local Dask cluster: {n} worker processes x 1 thread ({threads} framework threads each)")
                yield DaskExecutor("processes", client, cluster.scheduler_address, gpu_resources=False, log=log)
        finally:
            cluster.close()
