"""`--executor processes --workers N`: a dask.distributed LocalCluster of N worker
processes (one thread each) on this machine, started for the sweep and stopped after it.

Each worker's frameworks get cores / N intra-op threads, or $OMP_NUM_THREADS when it is
set: runs compared bit for bit need the same thread count (see tests/test_reliability.py),
and the provenance `device` field records it."""

from __future__ import annotations

import contextlib
import logging
import os

from normbench.executors import ExecutorError
from normbench.executors.dask_sweep import ALLOWED_FAILURES, DaskExecutor, import_distributed

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def open(workers=None, scheduler=None, log=print):  # noqa: A001
    distributed = import_distributed()
    import dask

    n = workers or os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    env = {name: threads for name in THREAD_VARIABLES}
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        try:
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                               dashboard_address=":0", silence_logs=logging.ERROR, env=env)
        except Exception as exc:
            raise ExecutorError(f"--executor processes --workers {n}: cannot start a local Dask cluster "
                                f"({type(exc).__name__}: {exc}); try fewer --workers or --executor local") from None
        try:
            with distributed.Client(cluster, set_as_default=False) as client:
                log(f"local Dask cluster: {n} worker processes x 1 thread ({threads} framework threads each)")
                yield DaskExecutor("processes", client, cluster.scheduler_address, gpu_resources=False, log=log)
        finally:
            cluster.close()
