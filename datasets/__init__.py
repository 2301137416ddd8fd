"""Data sets for the benchmarks, importable only as ``normbench.datasets``.

    from normbench import datasets
    mnist = datasets.load("mnist")  # fetched into the cache once, SHA-256 checked on every load

Each data set is one module of this folder that provides ``INFO`` (a `DatasetInfo`:
name, image shape, classes, split sizes), ``load(data_dir=None, *, fetch=True)`` and a
one-line ``DESCRIPTION``; the folder is the registry (no list of names anywhere else).
"""

from __future__ import annotations

if __name__ != "normbench.datasets":  # the repository root is on sys.path; do not shadow another `datasets`
    raise ModuleNotFoundError(f"No module named {__name__!r} ({__file__} is normbench.datasets, never a top-level package)",
                              name=__name__)

import os
from types import ModuleType

from normbench.plugins import FolderRegistry

from .base import DataDirError, Dataset, DatasetError, DatasetInfo, SourceError, streams_from_disk
from .idx import IdxFormatError

__all__ = ["DataDirError", "Dataset", "DatasetError", "DatasetInfo", "IdxFormatError", "SourceError", "describe", "info",
           "load", "names", "streams_from_disk"]


def _collect(module):
    found = getattr(module, "INFO", None)
    return [(found.name, module)] if isinstance(found, DatasetInfo) else []


REGISTRY = FolderRegistry(__name__, "data set", _collect)


def names() -> list[str]:
    """The names of the available data sets, sorted."""
    return sorted(REGISTRY.names())


def load(name: str, data_dir: str | os.PathLike | None = None, *, fetch: bool = True) -> Dataset:
    """Load data set `name`, fetching it into the cache (under `data_dir` if given) when needed.

    Raises DatasetError for an unknown name or when the data cannot be provided.
    """
    return _module(name).load(data_dir, fetch=fetch)


def describe(name: str) -> str:
    """One line about data set `name`: where it comes from and its sizes."""
    return _module(name).DESCRIPTION


def info(name: str) -> DatasetInfo:
    """Shapes and sizes of data set `name`, without loading it."""
    return _module(name).INFO


def _module(name: str) -> ModuleType:
    try:
        return REGISTRY.get(name)
    except KeyError:
        raise DatasetError(f"unknown data set {name!r}; available: {', '.join(names())}") from None
