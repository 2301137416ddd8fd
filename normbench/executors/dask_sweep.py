"""A sweep on a Dask cluster: the submitter (this process) and the task a worker runs.

The submitter does everything local sweeps do with the results directory, and only that:
it finds the finished runs (resume), takes each remaining run's lock, submits the run
as one task keyed by its run key, and, as each task comes back, writes the run
(runner.store_run, under the lock it holds) and releases the lock. Workers read and
write no results directory: `train_task` loads and verifies the data set through
runner.load_data on the worker (its own cache), trains with runner.train_run and returns
the outcome and provenance record. So nothing needs a shared file system, and the
guarantees of normbench.runner (atomic runs, resume, two sweeps sharing one directory,
metrics.csv) hold unchanged.

Faults:
- a worker that dies while running a run (SIGKILL, OOM kill, a lost node): the scheduler
  runs it again on another worker, up to `distributed.scheduler.allowed-failures` times
  (ALLOWED_FAILURES on a LocalCluster; the scheduler's own setting elsewhere); then the
  run is reported as failed, nothing of it is written, and the sweep goes on;
- a run that raises: retried RETRIES times, then reported as failed likewise;
- a run that diverges: recorded as diverged, exactly as locally;
- input a worker cannot run (an absent framework or device on the worker, unusable data,
  a different normbench version): the sweep stops with one line naming the worker (exit 2);
- the submitter killed: its locks die with it; the same command resumes, reusing every
  run written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from normbench.executors import ExecutorError, RunsFailed

RETRIES = 1
ALLOWED_FAILURES = 3
CONNECT_TIMEOUT_S = 5

_WORKER_CACHE: dict = {}  # per worker process: engines, data sets, placed arrays, memory checks


def import_distributed():
    try:
        import distributed
    except ImportError:
        raise ExecutorError("dask.distributed is not installed; pip install 'dask[distributed]' "
                            "(or `pip install -e \".[all]\"`), or use --executor local") from None
    return distributed


def _one_line(exc: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


# ----------------------------------------------------------------------------- on a worker


def _worker_address() -> str | None:
    try:
        from distributed import get_worker
        return get_worker().address
    except Exception:  # not inside a worker (called directly)
        return None


def _cached(key, make):
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = make()
    return _WORKER_CACHE[key]


def train_task(spec, variant_name: str, seed: int, backend: str, device: str | None, data_dir: str | None,
               expected_key: str, compile: bool = False) -> dict:  # noqa: A002
    """Train one run on this worker: {"outcome", "record"}, or {"refused", "worker"} when the
    worker cannot run it at all (retrying would not help). `compile` as in runner.run_sweep:
    the worker compiles each variant once and its runs share the compiled step."""
    import normbench
    from normbench import backends, provenance, resources, runner
    from normbench.datasets import DatasetError
    from normbench.spec import SpecError

    try:
        variant = next(v for v in spec.variants if v.name == variant_name)
        key = runner.run_key(spec, variant, seed, backend)
        if key != expected_key:
            raise ExecutorError(f"run key {key} computed here differs from the submitter's {expected_key}: this worker "
                                f"has normbench {normbench.__version__} at {provenance.git_state()['git_commit']}; "
                                "install the submitter's version on every worker")
        engine_key = ("engine", backend, device, spec.dtype, compile)
        engine = _cached(engine_key,
                         lambda: backends.get_engine(backend, device=device, dtype=spec.dtype, compile=compile))
        data_key = ("data", spec.dataset, spec.dtype, data_dir)
        data = _cached(data_key, lambda: runner.load_data(spec, data_dir))
        _cached(("fits", engine_key, spec.hash()), lambda: resources.check_fits(spec, [engine]))
        placed = _cached(("placed", engine_key, data_key, spec.train_eval_examples),
                         lambda: runner.place_data(engine, data, spec))
    except (ExecutorError, SpecError, DatasetError, backends.UnknownBackend, backends.BackendUnavailable) as exc:
        return {"refused": _one_line(exc), "worker": _worker_address()}
    outcome, record = runner.train_run(spec, variant, seed, engine, data, placed, provenance.environment())
    return {"outcome": outcome, "record": {**record, "worker": _worker_address()}}


# ----------------------------------------------------------------------------- the submitter


class DaskExecutor:
    """Runs sweeps through `client`; `where` names the cluster in messages."""

    def __init__(self, name: str, client, where: str, *, gpu_resources: bool, log=print):
        self.name, self.client, self.where, self.gpu_resources = name, client, where, gpu_resources
        info = client.scheduler_info()
        port = info.get("services", {}).get("dashboard")
        if port:
            log(f"Dask dashboard: {client.dashboard_link}")
        self.workers = info.get("workers", {})
        if not self.workers:
            log(f"no Dask worker is connected to {where} yet; the runs wait for one (`dask worker {where}`)")

    def run_sweep(self, spec, backend_names, out, *, device=None, data_dir=None, progress=True, log=print,
                  compile=False):  # noqa: A002
        resources = None
        if self.gpu_resources and device and device.startswith("cuda"):
            resources = {"GPU": 1}  # one run holds one GPU
            if not any(w.get("resources", {}).get("GPU") for w in self.workers.values()):
                log(f"no worker of {self.where} offers a GPU resource yet; the runs wait for one "
                    f"(start them with `dask worker {self.where} --resources GPU=1`, see docs/cluster.md)")
        return run_sweep(self.client, spec, backend_names, out, device=device, data_dir=data_dir, progress=progress,
                         log=log, resources=resources, where=self.where, compile=compile)


def run_sweep(client, spec, backend_names, out, *, device=None, data_dir=None, progress=True, log=print,
              resources=None, where="the cluster", compile=False):  # noqa: A002
    """Run every variant x seed of `spec` on each backend through `client`, resuming
    finished runs; the same results directory, files and guarantees as runner.run_sweep."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from normbench import backends as backend_registry, provenance, runner

    out = Path(out)
    backend_names = list(dict.fromkeys(backend_registry.canonical_name(b) for b in backend_names))
    todo = [(b, v, s) for b in backend_names for v in spec.variants for s in spec.seeds]
    keys = [runner.run_key(spec, v, s, b) for b, v, s in todo]
    dirs = [runner.run_dir_for(out, b, v, s) for b, v, s in todo]
    labels = [f"{b}/{v.name}/seed {s}" for b, v, s in todo]
    pending = {i for i in range(len(todo)) if not runner.is_finished(dirs[i], keys[i])}  # raises on a conflict
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise runner.ResultsUnwritable(f"{out}: cannot create the results directory ({exc.strerror or exc}); "
                                       "use another --out") from None
    if len(pending) < len(todo):
        log(f"resuming: {len(todo) - len(pending)} of {len(todo)} runs already finished in {out}")
    runner.write_resolved_spec(out, spec)
    command = provenance.command_line()
    results: dict[int, runner.RunResult] = {}
    locks: dict[int, contextlib.ExitStack] = {}  # held while a worker trains the run
    futures: dict = {}
    failed: list[int] = []
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), unit="run", disable=not progress, dynamic_ncols=True)

    def reuse(i: int) -> str:
        results[i] = runner._summarize(dirs[i], reused=True)
        bar.update(1 if i in pending else 0)  # pending at the start: finished by another process since
        return "done"

    def claim(i: int, blocking: bool) -> str:
        """'done' (finished: reused), 'busy' (another process holds it) or 'claimed' (locked here, to submit)."""
        if runner.is_finished(dirs[i], keys[i]):
            return reuse(i)
        stack = contextlib.ExitStack()
        if not stack.enter_context(runner._run_lock(dirs[i], blocking)):
            stack.close()
            return "busy"
        if runner.is_finished(dirs[i], keys[i]):  # finished by another process meanwhile
            stack.close()
            return reuse(i)
        locks[i] = stack
        return "claimed"

    def submit(i: int):
        backend, variant, seed = todo[i]
        # Dask shares a task between submitters that give the same key: a compiled and an
        # eager run of one run key must not answer for each other (provenance differs).
        task = f"normbench-run-{keys[i]}" + ("-compiled" if compile else "")
        future = client.submit(train_task, spec, variant.name, seed, backend, device, data_dir, keys[i], compile,
                               key=task, resources=resources, retries=RETRIES)
        futures[future] = i
        return future

    def finish(future) -> None:
        i = futures.pop(future)
        try:
            if future.status == "finished":
                answer = future.result()
                if "refused" in answer:
                    raise ExecutorError(f"{labels[i]}: worker {answer['worker']} of {where} cannot run it: {answer['refused']}")
                results[i] = runner.store_run(dirs[i], answer["outcome"], {**answer["record"], "command": command}, spec, log)
            elif future.status == "cancelled":
                raise ExecutorError(f"{labels[i]}: cancelled by the Dask scheduler at {where} (connection lost?); "
                                    "finished runs are kept, re-run the same command to resume")
            else:  # KilledWorker after allowed-failures deaths, or the run's own exception after its retries
                exc = future.exception()
                failed.append(i)
                log(f"{labels[i]}: failed on {where} ({type(exc).__name__}: {_one_line(exc)}); "
                    "nothing written for it, the sweep goes on")
        finally:
            locks.pop(i).close()
        bar.set_description(labels[i])
        bar.update(1)

    try:
        deferred = []
        for i in range(len(todo)):
            state = claim(i, blocking=False)
            if state == "claimed":
                submit(i)
            elif state == "busy":
                log(f"{dirs[i]}: another process is running it; coming back to it later")
                deferred.append(i)
        for future in as_completed(list(futures), loop=client.loop):
            finish(future)
        for i in deferred:
            log(f"waiting for another process to finish {dirs[i]}")
            if claim(i, blocking=True) == "claimed":
                finish(next(as_completed([submit(i)], loop=client.loop)))
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            runner.collect(out)
        raise
    finally:
        for stack in locks.values():
            stack.close()
        for future in futures:
            future.cancel()
        bar.close()
    runner.collect(out)
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(todo)} runs failed on {where} ({', '.join(labels[i] for i in failed)}); "
                         f"every other run is written to {out}; re-run the same command to retry them")
    return [results[i] for i in range(len(todo))]
