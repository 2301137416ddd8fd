"""Where a number came from: code version, environment, device, spec, seed, command."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import normbench

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def git_state() -> dict[str, object]:
    """Commit of the normbench checkout in use, and whether it had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(_SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "normbench", "backends", "datasets")
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def schedulable_cores() -> int:
    """How many cores this process may run on: its affinity where the platform has one
    (taskset, a container's cpuset, a Slurm allocation), else every core of the machine.
    Sizes worker pools and thread counts; `os.cpu_count()` would count cores the process
    cannot use and oversubscribe the ones it can."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# The command line being served, set by the CLI (which may be called as `main(argv)` from
# Python, where sys.argv is the caller's, not normbench's).
_command_line: list[str] | None = None


def set_command_line(argv: list[str]) -> None:
    global _command_line
    _command_line = list(argv)


def command_line() -> str:
    argv = _command_line if _command_line is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    return " ".join(argv)


def environment() -> dict[str, object]:
    import numpy
    return {
        "normbench_version": normbench.__version__,
        **git_state(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "command": command_line(),
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
