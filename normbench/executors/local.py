"""The default executor: every run in this process, one after another (runner.run_sweep)."""

from __future__ import annotations

import contextlib


class LocalExecutor:
    name = "local"

    def run_sweep(self, spec, backend_names, out, *, device=None, data_dir=None, progress=True, log=print,
                  group_size=None, compile=False):  # noqa: A002
        from normbench import runner

        return runner.run_sweep(spec, backend_names, out, device=device, data_dir=data_dir, progress=progress, log=log,
                                group_size=group_size, compile=compile)


@contextlib.contextmanager
def open(workers=None, scheduler=None, log=print):  # noqa: A001
    yield LocalExecutor()
