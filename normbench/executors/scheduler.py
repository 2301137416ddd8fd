"""`--executor dask --scheduler ADDRESS`: any running Dask cluster (started by hand with
`dask scheduler` / `dask worker`, by dask-jobqueue on Slurm, ...; see docs/cluster.md).

The submitting process connects as a client and writes the results; workers need
normbench (the same version) and the frameworks installed, not the results directory.
Runs on a CUDA device ask for one `GPU` worker resource each."""

from __future__ import annotations

import contextlib
import logging

from normbench.executors import ExecutorError
from normbench.executors.dask_sweep import CONNECT_TIMEOUT_S, DaskExecutor, _one_line, import_distributed


@contextlib.contextmanager
def open(workers=None, scheduler=None, log=print):  # noqa: A001
    distributed = import_distributed()
    from distributed.comm import parse_address, parse_host_port

    try:  # a malformed address would otherwise cost the whole timeout, and a traceback at exit
        scheme, location = parse_address(scheduler)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError as exc:
        raise ExecutorError(f"--scheduler {scheduler}: not a Dask scheduler address ({_one_line(exc)}); "
                            "expected e.g. tcp://head-node:8786") from None
    # A refused connection is retried until the timeout, and logged at every retry: the one
    # line below says it all.
    quiet = logging.getLogger("distributed")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        client = distributed.Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=False)
    except Exception as exc:  # OSError/TimeoutError when nobody answers, ValueError for a malformed address
        raise ExecutorError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler within {CONNECT_TIMEOUT_S} s "
                            f"({type(exc).__name__}: {_one_line(exc)}); start one with `dask scheduler` or fix the address") from None
    finally:
        quiet.setLevel(level)
    try:
        yield DaskExecutor("dask", client, scheduler, gpu_resources=True, log=log)
    finally:
        client.close()
