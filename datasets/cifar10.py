"""CIFAR-10 (Krizhevsky 2009): 60,000 32x32 colour images of 10 classes, from the python version's pickled batches.

The data are brought by the user: no source here can download them.  Put either the
official archive ``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz,
MD5 c58f30108f718f92721af3b95e74349a as published on https://www.cs.toronto.edu/~kriz/cifar.html)
or the folder it unpacks to, ``cifar-10-batches-py/``, into ``<data root>/cifar10/``
(see base.data_root; ``--data-dir`` or ``NORMBENCH_DATA_DIR`` choose the root).

- The archive is checked against the published MD5 before anything in it is read; then
  only the seven members ``cifar-10-batches-py/<name>`` below are copied out, each as a
  regular file to a path this module builds (never one the archive names), so a hostile
  archive cannot write anywhere else.  Only missing files are extracted; the archive is
  left in place.
- The folder holds ``data_batch_1`` .. ``data_batch_5`` (training, 10,000 images each),
  ``test_batch`` (10,000) and ``batches.meta`` (the 10 class names).  Each batch is a
  pickled dict with b"data", a (10000, 3072) uint8 array, each row an image's red,
  green and blue 32x32 planes in row-major order, and b"labels", a list of class indices.

Only these seven named files are ever unpickled, with ``encoding="bytes"`` and an
unpickler that refuses every global but the three NumPy needs to rebuild an array and
``_codecs.encode`` (bytes re-pickled by Python 3): a pickle could run any code otherwise.
Images are returned like MNIST's, uint8 NHWC (N, 32, 32, 3); labels int64, in the
official order: training batches 1..5, then the test batch.

Checksums: only the archive's MD5 is published, not the files'.  Every load checks the
structure (dict keys, array shape and dtype, label count and range, the 10 class names
and, unless ``check_counts=False``, the official 50,000 / 10,000 images), and the first
load that finds everything valid records each file's SHA-256 in
``<data root>/cifar10/SHA256SUMS``; later loads refuse files that changed (delete the
manifest to accept new ones).  A folder brought without the archive is trusted as it is
on that first load.  ``check_counts=False`` accepts batches of other sizes (the tests'
tiny ones); every other check still applies.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .base import (
    Dataset,
    DatasetError,
    DatasetInfo,
    check_manifest,
    data_dir_error,
    data_root,
    data_root_origin,
    missing_files_error,
    record_manifest,
    sha256_file,
)

__all__ = ["ARCHIVE_MD5", "DESCRIPTION", "INFO", "cache_dir", "load"]

NAME = "cifar10"
NUM_CLASSES = 10
IMAGE_SIDE = 32
INFO = DatasetInfo(name=NAME, image_shape=(IMAGE_SIDE, IMAGE_SIDE, 3), num_classes=NUM_CLASSES,
                   train_examples=50000, test_examples=10000)
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
FILES = (*TRAIN_BATCHES, TEST_BATCH, META)
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DESCRIPTION = (
    f"{NAME}: CIFAR-10 colour images, brought by the user ({ARCHIVE_NAME}, MD5 checked, or its {FOLDER}/; "
    "structure checked, SHA-256 recorded on first load); 50000 train / 10000 test images, 32x32x3 uint8, 10 classes"
)


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory the user places the archive or folder in: ``<data root>/cifar10``."""
    return data_root(data_dir) / NAME


def load(
    data_dir: str | os.PathLike | None = None,
    *,
    fetch: bool = True,
    check_counts: bool = True,
    archive_md5: str | None = None,
) -> Dataset:
    """Load CIFAR-10 from ``<data root>/cifar10`` (the archive or its folder; see the module docstring).

    `fetch` has no effect: no source can download the files.  `check_counts=False`
    accepts batches of other sizes.  `archive_md5` replaces the published MD5 (for
    tests' small archives).  Raises DatasetError naming the file and what is wrong, or,
    when files are missing, which ones, where to put them and where to get them.
    """
    del fetch  # nothing to fetch: the user brings the files
    directory = cache_dir(data_dir)
    folder = directory / FOLDER
    missing = [name for name in FILES if not (folder / name).is_file()]
    extracted = False
    if missing:
        archive = directory / ARCHIVE_NAME
        if not archive.is_file():
            raise missing_files_error(
                folder, missing, origin=data_root_origin(data_dir), what=NAME,
                how_to_get=(f"Get them from the official archive {ARCHIVE_NAME} ({ARCHIVE_URL}): put the archive itself "
                            f"in {directory} (it is checked and unpacked on load), or unpack it there "
                            f"(`tar xzf {ARCHIVE_NAME} -C {directory}`)."),
            )
        _extract(archive, ARCHIVE_MD5 if archive_md5 is None else archive_md5, missing, folder, data_dir)
        extracted = True

    digests = {f"{FOLDER}/{name}": sha256_file(folder / name) for name in FILES}
    recorded = check_manifest(directory, digests, what=NAME)
    _check_meta(folder / META)
    train_images, train_labels = _read_batches(folder, TRAIN_BATCHES)
    test_images, test_labels = _read_batches(folder, (TEST_BATCH,))
    if check_counts:
        for split, labels, expected in (("training", train_labels, INFO.train_examples),
                                        ("test", test_labels, INFO.test_examples)):
            if len(labels) != expected:
                raise DatasetError(f"{NAME}: {folder} holds {len(labels)} {split} images, the official files "
                                   f"{expected}; pass check_counts=False to load other batches")
    if not recorded:
        record_manifest(directory, digests, what=NAME)
    origin = f"unpacked now from {directory / ARCHIVE_NAME} (MD5 checked)" if extracted else "already unpacked"
    return Dataset(
        name=NAME,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=NUM_CLASSES,
        source=(f"CIFAR-10 python batches in {folder}, {origin}, structure checked; SHA-256 "
                f"{'checked against' if recorded else 'recorded in'} {directory / 'SHA256SUMS'}"),
        files=digests,
    )


def _extract(archive: Path, md5: str, names: list[str], folder: Path, data_dir) -> None:
    """Copy `names` out of the MD5-checked `archive` into `folder`, through a staging directory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(archive, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != md5:
        raise DatasetError(
            f"{archive}: MD5 {digest.hexdigest()} ({archive.stat().st_size} bytes), expected {md5}: not the official "
            f"{ARCHIVE_NAME} (truncated or another file); download it again from {ARCHIVE_URL}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
    except OSError as error:
        raise data_dir_error(folder, error, data_root_origin(data_dir), creating=True) from error
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for name in names:
                    member_name = f"{FOLDER}/{name}"
                    try:
                        member = tar.getmember(member_name)
                    except KeyError:
                        raise DatasetError(f"{archive}: has no {member_name}") from None
                    if not member.isfile():
                        raise DatasetError(f"{archive}: {member_name} is not a regular file")
                    with tar.extractfile(member) as packed, open(staging / name, "wb") as unpacked:
                        shutil.copyfileobj(packed, unpacked, 1 << 20)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise data_dir_error(folder, error, data_root_origin(data_dir)) from error
            raise DatasetError(f"{archive}: cannot be read ({error}); download it again from {ARCHIVE_URL}") from None
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch: dicts, lists, bytes, ints and NumPy arrays, nothing that could run code."""

    # Python 2's cPickle wrote numpy.core.multiarray; NumPy 2 writes numpy._core.multiarray.
    # Python 3 writes bytes through _codecs.encode at protocol 2 (a re-pickled batch).
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch") from None


def _unpickle(path: Path) -> object:
    fix = f"replace it with the file from {ARCHIVE_NAME}"
    try:
        with open(path, "rb") as file:
            return _BatchUnpickler(file, encoding="bytes").load()
    except OSError as error:
        raise DatasetError(f"{path}: unreadable ({error.strerror or error}); {fix}") from None
    except Exception as error:  # noqa: BLE001 -- a corrupt pickle raises anything from EOFError to ValueError
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {error}); {fix}") from None


def _check_meta(path: Path) -> None:
    meta = _unpickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise DatasetError(f"{path}: expected a dict with b'label_names', the {NUM_CLASSES} class names; "
                           f"replace it with the file from {ARCHIVE_NAME}")


def _read_batches(folder: Path, names) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        batch_images, batch_labels = _read_batch(folder / name)
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one batch file, its structure checked."""
    fix = f"replace it with the file from {ARCHIVE_NAME}"
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"{path}: expected a dict with b'data' and b'labels', got {keys}; {fix}")
    data, labels = batch[b"data"], batch[b"labels"]
    pixels = 3 * IMAGE_SIDE * IMAGE_SIDE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: b'data' must be a uint8 array (N, {pixels}), got {found}; {fix}")
    try:
        labels = np.asarray(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    except (TypeError, ValueError):  # not a sequence, or ragged
        labels = np.asarray([None])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DatasetError(f"{path}: b'labels' must be {len(data)} integers, one per image, got {labels.dtype} "
                           f"{labels.shape}; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetError(f"{path}: labels must be in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}; {fix}")
    # Each row is the red, green and blue planes in turn: (N, C, H, W), turned into NHWC.
    images = np.ascontiguousarray(data.reshape(len(data), 3, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)
