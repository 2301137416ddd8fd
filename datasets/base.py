"""What every data set module shares: the Dataset record, the errors, and the file cache.

The cache keeps a data set's raw files under ``<data root>/<data set name>/``.  Every
load checks each file against a pinned SHA-256; a missing or bad file is fetched again
from a list of sources, each a callable ``source(dest_dir)`` that places the files in
``dest_dir`` or raises SourceError.  Fetched files are verified before they enter the
cache, and enter it by os.replace, so a reader never sees a half-written file; a lock
file keeps two processes from fetching into the same directory at once.
"""

from __future__ import annotations


import errno
import gzip
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normbench.durable import fsync_path

try:
    import fcntl
except ImportError:  # not POSIX: fetch without the inter-process lock
    fcntl = None

__all__ = [
    "DATA_DIR_ENV_VAR",
    "Dataset",
    "DatasetError",
    "Source",
    "SourceError",
    "data_root",
    "ensure_files",
    "sha256_file",
]

DATA_DIR_ENV_VAR = "NORMBENCH_DATA_DIR"

logger = logging.getLogger(__name__)

Source = Callable[[Path], None]

# errno values that mean "this directory cannot take the files" (read-only, full, or a
# file in the way): the fix is another directory, not another source.
_UNUSABLE_DIR_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
}
_STAGING_PREFIX = ".fetch-"
_LOCK_NAME = ".lock"


class DatasetError(ValueError):
    """A data set cannot be provided; the message says why and how to fix it."""


class SourceError(Exception):
    """A source could not provide the files; str(error) is the reason, shown to the user."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the spec validator and the memory estimate need to know before loading."""

    name: str
    image_shape: tuple[int, ...]  # one example, canonical (H, W, C)
    num_classes: int
    train_examples: int
    test_examples: int


@dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification data set, held in memory as NumPy arrays.

    Images are uint8 in NHWC layout, exactly as stored; runners scale them themselves.
    Labels are int64 class indices in ``range(num_classes)``.
    """

    name: str
    train_images: np.ndarray = field(repr=False)
    train_labels: np.ndarray = field(repr=False)
    test_images: np.ndarray = field(repr=False)
    test_labels: np.ndarray = field(repr=False)
    num_classes: int = 10
    source: str = ""  # where the files came from, for the results' metadata
    files: dict[str, str] = field(default_factory=dict, repr=False)  # file name -> SHA-256


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding all cached data sets.

    In order: `data_dir` (the CLI's --data-dir), $NORMBENCH_DATA_DIR,
    $XDG_CACHE_HOME/normbench, ~/.cache/normbench.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg_cache and Path(xdg_cache).is_absolute():
        return Path(xdg_cache) / "normbench"
    return Path.home() / ".cache" / "normbench"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 digest of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_files(
    directory: Path,
    expected: Mapping[str, str],
    *,
    sources: Sequence[Source],
    fetch: bool = True,
    how_to_fix: str = "",
) -> tuple[dict[str, str], list[str]]:
    """Make every file in `expected` (name -> SHA-256) present and intact in `directory`.

    Missing or bad files are restored from gzip copies placed by hand next to them
    (``<name>.gz``), then, if `fetch`, from `sources` in order.  Returns the verified
    digests and the names of the sources that provided files in this call.  Raises
    DatasetError, with every problem, every source tried and `how_to_fix`, when the
    files cannot be made right, or naming the directory when it is not writable.
    """
    digests, problems = _check(directory, expected)
    if not problems:
        return digests, []
    for name, problem in problems.items():
        if problem == "missing":
            logger.info("%s: missing, trying to provide it", directory / name)
        else:  # a file that was there and went bad deserves the user's attention
            warnings.warn(f"{directory / name}: {problem}; trying to replace it", stacklevel=_outside_package())

    attempts: list[str] = []
    used: list[str] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _cache_lock(directory):
            # Another process may have repaired the cache while this one waited for the lock.
            digests, problems = _check(directory, expected)
            _remove_stale_staging(directory)
            candidates = _hand_placed_gzip_sources(directory, problems) + (list(sources) if fetch else [])
            for source in candidates:
                if not problems:
                    break
                label = _source_label(source)
                try:
                    installed, shortfalls = _fetch_from(source, directory, expected, set(problems))
                except SourceError as error:
                    attempts.append(f"{label}: {error}")
                    continue
                except OSError as error:
                    if error.errno in _UNUSABLE_DIR_ERRNOS:
                        raise
                    attempts.append(f"{label}: {error}")
                    continue
                for name, digest in installed.items():
                    digests[name] = digest
                    del problems[name]
                if installed:
                    used.append(label)
                if shortfalls:
                    attempts.append(f"{label}: {'; '.join(shortfalls)}")
    except OSError as error:
        if error.errno in _UNUSABLE_DIR_ERRNOS:
            raise _unusable(directory, error) from error
        raise

    if problems:
        raise DatasetError(_failure_message(directory, problems, attempts, fetch, how_to_fix))
    return {name: digests[name] for name in expected}, used


def _check(directory: Path, expected: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split the expected files into verified (name -> digest) and problems (name -> what is wrong)."""
    digests: dict[str, str] = {}
    problems: dict[str, str] = {}
    for name, expected_digest in expected.items():
        path = directory / name
        try:
            size = path.stat().st_size
            digest = sha256_file(path)
        except (FileNotFoundError, NotADirectoryError):
            problems[name] = "missing"
            continue
        except OSError as error:
            problems[name] = f"unreadable ({error.strerror or error})"
            continue
        if digest == expected_digest:
            digests[name] = digest
        else:
            problems[name] = _mismatch(size, digest, expected_digest)
    return digests, problems


def _mismatch(size: int, digest: str, expected_digest: str) -> str:
    return f"checksum mismatch ({size} bytes, SHA-256 {digest[:16]}..., expected {expected_digest[:16]}...)"


def _fetch_from(
    source: Source, directory: Path, expected: Mapping[str, str], needed: set[str]
) -> tuple[dict[str, str], list[str]]:
    """Run `source` into a staging directory; move the needed files that verify into the cache.

    Returns the installed files (name -> digest) and what was wrong with the others.
    """
    # Staging inside the cache directory keeps it on the same file system, so os.replace
    # moves each file into place atomically.
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory))
    try:
        source(staging)
        verified: dict[str, str] = {}
        shortfalls: list[str] = []
        for name in sorted(needed):
            path = staging / name
            if not path.is_file():
                shortfalls.append(f"did not provide {name}")
                continue
            digest = sha256_file(path)
            if digest != expected[name]:
                shortfalls.append(f"{name}: {_mismatch(path.stat().st_size, digest, expected[name])}")
                continue
            verified[name] = digest
        for name in verified:
            fsync_path(staging / name)
            os.replace(staging / name, directory / name)
        if verified:
            fsync_path(directory)  # make the renames themselves durable
        return verified, shortfalls
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hand_placed_gzip_sources(directory: Path, problems: Mapping[str, str]) -> list[Source]:
    """A source decompressing ``<name>.gz`` files a user put in the cache, if there are any."""
    present = [name for name in problems if (directory / f"{name}.gz").is_file()]
    if not present:
        return []

    def hand_placed_gzip_files(dest_dir: Path) -> None:
        for name in present:
            try:
                with gzip.open(directory / f"{name}.gz", "rb") as packed, open(dest_dir / name, "wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked, 1 << 20)
            except (gzip.BadGzipFile, EOFError, zlib.error) as error:
                raise SourceError(f"{name}.gz is not a valid gzip file ({error})") from error

    hand_placed_gzip_files.label = f"hand-placed {', '.join(f'{name}.gz' for name in present)}"
    return [hand_placed_gzip_files]


def _outside_package() -> int:
    """The stacklevel of the first caller outside this package, so warnings point at user code."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package_dir:
        frame, level = frame.f_back, level + 1
    return level


def _source_label(source: Source) -> str:
    return getattr(source, "label", None) or getattr(source, "__name__", None) or str(source)


@contextmanager
def _cache_lock(directory: Path) -> Iterator[None]:
    with open(directory / _LOCK_NAME, "a") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _remove_stale_staging(directory: Path) -> None:
    # Only the lock holder stages files, so any staging directory seen under the lock
    # was left behind by a process that died mid-fetch.
    for stale in directory.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _unusable(directory: Path, error: OSError) -> DatasetError:
    return DatasetError(
        f"The data cache directory {directory} cannot be written ({error.strerror or error}). "
        f"Set {DATA_DIR_ENV_VAR} or pass --data-dir to a writable directory with enough free space."
    )


def _failure_message(
    directory: Path, problems: Mapping[str, str], attempts: Sequence[str], fetch: bool, how_to_fix: str
) -> str:
    lines = [f"Data files missing or bad in {directory}:"]
    lines += [f"  {name}: {problem}" for name, problem in problems.items()]
    if attempts:
        lines.append("Sources tried:")
        lines += [f"  {attempt}" for attempt in attempts]
    if not fetch:
        lines.append("Fetching is disabled (fetch=False), so no download was tried.")
    elif not attempts:
        lines.append("No source was configured.")
    if how_to_fix:
        lines.append(how_to_fix)
    return "\n".join(lines)
