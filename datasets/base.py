"""What every data set module shares: the Dataset record, the errors, and the file cache.

The cache keeps a data set's raw files under ``<data root>/<data set name>/``.  Every
load checks each file against a pinned SHA-256; a missing or bad file is fetched again
from a list of sources, each a callable ``source(dest_dir)`` that places the files in
``dest_dir`` or raises SourceError (`HttpSource` downloads from a mirror).  Fetched files
are verified before they enter the cache, and enter it by os.replace, so a reader never
sees a half-written file; a lock file keeps two processes from fetching into the same
directory at once.

Data the user brings (files no source can download and whose official checksums are not
published per file) cannot be pinned: `missing_files_error` says what to place where,
and a manifest (`check_manifest` / `record_manifest`, ``SHA256SUMS`` in the data set's
directory) records each file's SHA-256 on the first load, so that later loads detect a
file that changed.

Every error about the data directory names where it came from (`data_root_origin`):
``--data-dir DIR``, ``NORMBENCH_DATA_DIR=DIR`` or the default.
"""

from __future__ import annotations


import errno
import gzip
import hashlib
import logging
import math
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
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
    "MANIFEST_NAME",
    "DataDirError",
    "Dataset",
    "DatasetError",
    "HttpSource",
    "Source",
    "SourceError",
    "check_manifest",
    "data_dir_error",
    "data_root",
    "data_root_origin",
    "ensure_files",
    "missing_files_error",
    "obtained",
    "one_line",
    "record_manifest",
    "sha256_file",
]

DATA_DIR_ENV_VAR = "NORMBENCH_DATA_DIR"
MANIFEST_NAME = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks it too

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


class DataDirError(DatasetError):
    """The data cache directory cannot be created or written; the message names the option it came from."""

    def __init__(self, message: str, directory: Path | None = None, reason: str = ""):
        super().__init__(message)  # only the message in args, so the error pickles (Dask workers send it back)
        self.directory = directory
        self.reason = reason


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
    # What an example is, for the augmentations a spec may apply: "images" (H, W, C) or
    # "point_clouds" (points, 1, 3), which share the rank and must not be mistaken.
    kind: str = "images"
    # The loader streams the set from disk (`Dataset.streamed`) when its uint8 arrays would
    # take more than HELD_MEMORY_FRACTION of the memory available (`streams_from_disk`).
    streams: bool = False


# Of the memory available, the most a data set's uint8 arrays may take to be held in memory.
HELD_MEMORY_FRACTION = 0.5


def streams_from_disk(info: DatasetInfo, available: int | None) -> bool:
    """Whether a loader that `streams` streams this set, given the bytes of memory
    `available` (None: unknown, held), as its load decides."""
    held = (info.train_examples + info.test_examples) * math.prod(info.image_shape)
    return info.streams and available is not None and held > available * HELD_MEMORY_FRACTION


@dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification data set, held in memory as NumPy arrays (or memory-mapped
    from disk, `streamed`).

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
    # The images are read-only memory maps of arrays on disk (a set too large for memory):
    # index a batch at a time, never copy them whole (the runner's ScaledImages).
    streamed: bool = False


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


def data_root_origin(data_dir: str | os.PathLike | None = None) -> str:
    """Where `data_root(data_dir)` comes from, as the user sets it, for messages.

    ``--data-dir DIR`` (the CLI's option; `data_dir` in Python), ``NORMBENCH_DATA_DIR=DIR``,
    or ``the default data cache DIR``.
    """
    if data_dir is not None and str(data_dir) != "":
        return f"--data-dir {data_dir}"
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    if from_env:
        return f"{DATA_DIR_ENV_VAR}={from_env}"
    return f"the default data cache {data_root()}"


def one_line(error: BaseException) -> str:
    """`error`'s message with its lines joined by " | " (the CLI prints one line per error)."""
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())


def obtained(used_sources: Sequence[str], made: str = "fetched now via {}") -> str:
    """How a load got its files, for `Dataset.source`: `made` filled with the sources, or "already cached"."""
    return made.format(", ".join(used_sources)) if used_sources else "already cached"


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
    origin: str | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Make every file in `expected` (name -> SHA-256) present and intact in `directory`.

    Missing or bad files are restored from gzip copies placed by hand next to them
    (``<name>.gz``), then, if `fetch`, from `sources` in order.  Returns the verified
    digests and the names of the sources that provided files in this call.  Raises
    DatasetError, with every problem, every source tried and `how_to_fix`, when the
    files cannot be made right, or DataDirError naming the directory and `origin` (see
    data_root_origin: where the data root was set) when it cannot be created or written.
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
    except OSError as error:  # whatever the errno (ENOENT under /proc, say): the fix is another directory
        raise data_dir_error(directory, error, origin, creating=True) from error
    try:
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
            raise data_dir_error(directory, error, origin) from error
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


def data_dir_error(directory: Path, error: OSError, origin: str | None, *, creating: bool = False) -> DataDirError:
    """The error for a data cache `directory` that cannot be created (`creating`) or written, naming `origin`."""
    reason = str(error.strerror or error)
    detail = f"cannot create it: {reason}" if creating else reason
    if origin is None:  # a caller that does not say where the data root came from
        message = (f"The data cache directory {directory} cannot be written ({detail}). "
                   f"Set {DATA_DIR_ENV_VAR} or pass --data-dir to a writable directory with enough free space.")
    else:
        message = (f"{origin}: the data cache {directory} cannot be written ({detail}); pass a writable directory "
                   f"with enough free space as --data-dir or in {DATA_DIR_ENV_VAR}")
    return DataDirError(message, directory, reason)


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


# --- downloads --------------------------------------------------------------------------


class HttpSource:
    """Downloads ``<base_url><name><suffix>`` for each name; a ``.gz`` suffix is decompressed.

    Every socket operation (connecting, each read) gives up after `timeout_s`, so an
    unreachable mirror fails in seconds and the next source is tried.  A file larger
    than `max_bytes`, compressed or not, is refused.  The first file that cannot be had
    ends the attempt with a SourceError naming its URL and the reason; what the source
    placed is checked against the pinned digests by ensure_files, as for any source.
    """

    def __init__(self, base_url: str, names: Sequence[str], *, suffix: str = ".gz", timeout_s: float = 10.0,
                 max_bytes: int = 256 << 20) -> None:
        self.base_url = base_url
        self.names = tuple(names)
        self.suffix = suffix
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.label = base_url

    def __repr__(self) -> str:
        return f"HttpSource({self.base_url!r}, {list(self.names)!r}, suffix={self.suffix!r}, timeout_s={self.timeout_s!r})"

    def __call__(self, dest_dir: Path) -> None:
        dest_dir = Path(dest_dir)
        for name in self.names:
            url = f"{self.base_url}{name}{self.suffix}"
            downloaded = dest_dir / f"{name}{self.suffix}"
            self._download(url, downloaded)
            if self.suffix == ".gz":
                self._gunzip(url, downloaded, dest_dir / name)
                downloaded.unlink()

    def _download(self, url: str, path: Path) -> None:
        # Only the network calls are guarded: an OSError writing `path` (a full disk) is the
        # cache directory's problem, which ensure_files reports as such.
        request = urllib.request.Request(url, headers={"User-Agent": "normbench"})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except Exception as error:  # noqa: BLE001 -- every way a request fails is this source failing
            raise SourceError(f"{url}: {_network_reason(error, self.timeout_s)}") from None
        size = 0
        with response, open(path, "wb") as file:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except Exception as error:  # noqa: BLE001
                    raise SourceError(f"{url}: {_network_reason(error, self.timeout_s)} after {size} bytes") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise SourceError(f"{url}: larger than {self.max_bytes} bytes; refused")
                file.write(chunk)

    def _gunzip(self, url: str, packed: Path, unpacked: Path) -> None:
        size = 0
        with open(packed, "rb") as source, open(unpacked, "wb") as target:
            try:
                with gzip.GzipFile(fileobj=source) as stream:
                    while chunk := stream.read(1 << 20):
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise SourceError(f"{url}: decompresses to more than {self.max_bytes} bytes; refused")
                        target.write(chunk)
            except (gzip.BadGzipFile, EOFError, zlib.error) as error:
                raise SourceError(f"{url}: not a valid gzip file ({error})") from None


def _network_reason(error: Exception, timeout_s: float) -> str:
    """One short phrase: 'HTTP 404 Not Found', 'timed out after 10 s', 'Name or service not known', ..."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return str(reason.strerror)
    if isinstance(reason, str):
        return reason
    return f"{type(reason).__name__}: {reason}"


# --- data the user brings ---------------------------------------------------------------


def missing_files_error(directory: Path, missing: Sequence[str], *, origin: str, what: str, how_to_get: str) -> DatasetError:
    """The error for files a user must place by hand: where, which files, the option that sets the directory, and where to get them."""
    listed = ", ".join(missing)
    return DatasetError(
        f"{what}: missing in {directory}: {listed}. No source can download them: place them there by hand. "
        f"The data directory comes from {origin}; choose another with --data-dir or {DATA_DIR_ENV_VAR}. {how_to_get}"
    )


def check_manifest(directory: Path, digests: Mapping[str, str], *, what: str) -> bool:
    """Compare `digests` (path relative to `directory` -> SHA-256) with the manifest recorded on the first load.

    Returns False when there is no manifest yet (record_manifest writes it once the
    files have been found valid).  Raises DatasetError naming the files that changed,
    disappeared or appeared since, and how to accept the new ones.
    """
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{what}: cannot read the manifest {path} ({error}); delete it to record the files again") from None
    recorded: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise DatasetError(f"{what}: {path} line {number} is not '<sha256>  <file>'; delete it to record the files again")
        recorded[name] = digest
    changed = sorted(name for name in digests if name in recorded and recorded[name] != digests[name])
    gone = sorted(name for name in recorded if name not in digests)
    new = sorted(name for name in digests if name not in recorded)
    if changed or gone or new:
        parts = [f"{label}: {_first(names)}" for label, names in (("changed", changed), ("missing", gone), ("new", new))
                 if names]
        raise DatasetError(
            f"{what}: files in {directory} differ from those recorded in {path} on the first load ({'; '.join(parts)}). "
            f"Restore them, or if you replaced them on purpose, delete {path} and load again to record the new ones."
        )
    return True


def record_manifest(directory: Path, digests: Mapping[str, str], *, what: str) -> None:
    """Write the manifest of `digests` into `directory` atomically; warn (and go on) when it cannot be written."""
    path = directory / MANIFEST_NAME
    if any("\n" in name or "\r" in name for name in digests):
        raise DatasetError(f"{what}: a file name in {directory} holds a line break; rename it")
    lines = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    temporary = None
    try:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, prefix=f".{MANIFEST_NAME}.tmp-",
                                         delete=False) as file:
            temporary = Path(file.name)
            file.write(lines)
        fsync_path(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        warnings.warn(f"{what}: cannot record the SHA-256 manifest {path} ({error.strerror or error}); "
                      "later loads will not notice changed files", stacklevel=_outside_package())


def _first(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown
