"""ModelNet40 (Wu et al. 2015) as PointNet distributes it: CAD models of 40 categories as point clouds.

The data are brought by the user: no source here can download them.  Unzip PointNet's
``modelnet40_ply_hdf5_2048.zip`` (https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip)
into ``<data root>/modelnet40/`` (see base.data_root; ``--data-dir`` or
``NORMBENCH_DATA_DIR`` choose the root).  The files are looked for in that directory
itself or in the ``modelnet40_ply_hdf5_2048/`` folder the archive unpacks to:

- ``train_files.txt`` and ``test_files.txt``: one HDF5 file per line (the archive writes
  ``data/modelnet40_ply_hdf5_2048/ply_data_train0.h5``; only the file name is used);
- ``ply_data_train0.h5`` .. ``ply_data_train4.h5`` (9,840 models) and ``ply_data_test0.h5``,
  ``ply_data_test1.h5`` (2,468), each with ``data`` (N, 2048, 3) float32, the points of
  each model (centred and scaled to the unit sphere by PointNet), and ``label`` (N, 1)
  uint8, the class index;
- ``shape_names.txt``: the 40 class names, in label order.

Examples are (num_points, 1, 3) float32, points stored as a (P, 1, C) image in the
canonical NHWC layout, as mnist_point_clouds does, and coordinates as stored (not to be
divided by 255).  Through the registry and specs, num_points is 1024: the first 1,024 of
each model's 2,048 points, as PointNet's reference training (``train.py`` with its
default ``--num_point 1024``) takes them.  ``load(num_points=...)`` chooses another count
up to 2,048 when called directly; INFO, and so spec validation, always says 1024.

Checksums.  The archive's SHA-256 is not published and could not be computed here (the
archive cannot be downloaded from this machine), so no digest is pinned and none is
invented.  Instead every load checks the structure (the files the lists name, the
datasets' shapes and dtypes, finite coordinates, labels in 0..39, 40 class names and,
unless ``check_counts=False``, the official 9,840 / 2,468 examples of 2,048 points), and
the first load that finds everything valid records each file's SHA-256 in
``<data root>/modelnet40/SHA256SUMS``; later loads compare the files with it and refuse
ones that changed (delete the manifest to accept new files).  So the first copy a user
brings is trusted as it is, and only changes after that are detected.  Every load reads
the whole files to hash them (about 420 MB; a second or two).

``check_counts=False`` accepts other sizes (a subset, the tests' tiny files): every check
but the example counts and the 2,048 points per model still applies.  Reading needs h5py:
``pip install normbench[modelnet]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import (
    Dataset,
    DatasetError,
    DatasetInfo,
    check_manifest,
    data_root,
    data_root_origin,
    missing_files_error,
    record_manifest,
    sha256_file,
)

__all__ = ["DESCRIPTION", "INFO", "NUM_POINTS", "cache_dir", "load"]

NAME = "modelnet40"
NUM_CLASSES = 40
NUM_POINTS = 1024  # PointNet's reference training uses the first 1024 of each model's points
STORED_POINTS = 2048
INFO = DatasetInfo(name=NAME, image_shape=(NUM_POINTS, 1, 3), num_classes=NUM_CLASSES,
                   train_examples=9840, test_examples=2468, kind="point_clouds")

ARCHIVE_NAME = "modelnet40_ply_hdf5_2048.zip"
ARCHIVE_URL = "https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip"
FOLDER = "modelnet40_ply_hdf5_2048"  # what the archive unpacks to
TRAIN_LIST = "train_files.txt"
TEST_LIST = "test_files.txt"
SHAPE_NAMES = "shape_names.txt"
TRAIN_FILES = tuple(f"ply_data_train{index}.h5" for index in range(5))
TEST_FILES = ("ply_data_test0.h5", "ply_data_test1.h5")
OFFICIAL_FILES = (TRAIN_LIST, TEST_LIST, SHAPE_NAMES, *TRAIN_FILES, *TEST_FILES)
INSTALL_HINT = "pip install normbench[modelnet]"

DESCRIPTION = (
    f"{NAME}: 40 CAD object categories as point clouds, brought by the user (PointNet's {ARCHIVE_NAME}; "
    f"the first {NUM_POINTS} of {STORED_POINTS} points, structure checked, SHA-256 recorded on first load); "
    f"9840 train / 2468 test clouds, {NUM_POINTS}x1x3 float32, 40 classes"
)


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory the user places the files in: ``<data root>/modelnet40``."""
    return data_root(data_dir) / NAME


def load(
    data_dir: str | os.PathLike | None = None,
    *,
    fetch: bool = True,
    num_points: int = NUM_POINTS,
    check_counts: bool = True,
) -> Dataset:
    """Load ModelNet40 from the files placed in ``<data root>/modelnet40`` (see the module docstring).

    `fetch` has no effect: no source can download the files.  `num_points` (1..2048)
    keeps that many of each model's points, the first ones.  `check_counts=False`
    accepts other example counts and fewer stored points (a subset, tiny test files).
    Returns clouds as float32 (N, num_points, 1, 3) in the data set's image fields and
    int64 labels.  Raises DatasetError naming the file and what is wrong, or, when files
    are missing, which ones, where to put them and where to get them.
    """
    del fetch  # nothing to fetch: the user brings the files
    if not 1 <= num_points <= STORED_POINTS:
        raise DatasetError(f"{NAME}: num_points must be in 1..{STORED_POINTS}, got {num_points}")
    directory = cache_dir(data_dir)
    folder = _files_folder(directory)
    if not all((folder / name).is_file() for name in (TRAIN_LIST, TEST_LIST, SHAPE_NAMES)):
        raise _missing(directory, folder, [name for name in OFFICIAL_FILES if not (folder / name).is_file()], data_dir)
    train_files, test_files = _listed(folder, TRAIN_LIST), _listed(folder, TEST_LIST)
    missing = [name for name in (*train_files, *test_files) if not (folder / name).is_file()]
    if missing:
        raise _missing(directory, folder, missing, data_dir)
    h5py = _import_h5py()

    relative = folder.relative_to(directory)
    digests = {(relative / name).as_posix(): sha256_file(folder / name)
               for name in (TRAIN_LIST, TEST_LIST, SHAPE_NAMES, *train_files, *test_files)}
    recorded = check_manifest(directory, digests, what=NAME)

    class_names = _class_names(folder / SHAPE_NAMES)
    train_clouds, train_labels = _read_split(h5py, folder, train_files, num_points, check_counts)
    test_clouds, test_labels = _read_split(h5py, folder, test_files, num_points, check_counts)
    if check_counts:
        for split, labels, expected, listing in (("training", train_labels, INFO.train_examples, TRAIN_LIST),
                                                 ("test", test_labels, INFO.test_examples, TEST_LIST)):
            if len(labels) != expected:
                raise DatasetError(
                    f"{NAME}: the files of {folder / listing} hold {len(labels)} {split} examples, the official "
                    f"{ARCHIVE_NAME} {expected}; pass check_counts=False to load another selection"
                )
    if not recorded:
        record_manifest(directory, digests, what=NAME)
    state = "checked against" if recorded else "recorded in"
    return Dataset(
        name=NAME,
        train_images=train_clouds,
        train_labels=train_labels,
        test_images=test_clouds,
        test_labels=test_labels,
        num_classes=len(class_names),
        source=(f"ModelNet40 ({ARCHIVE_NAME}, brought by the user) in {folder}, first {num_points} points, "
                f"structure checked; SHA-256 {state} {directory / 'SHA256SUMS'}"),
        files=digests,
    )


def _files_folder(directory: Path) -> Path:
    """`directory`, or the archive's folder inside it when the files are there."""
    unpacked = directory / FOLDER
    if not (directory / TRAIN_LIST).is_file() and unpacked.is_dir():
        return unpacked
    return directory


def _missing(directory: Path, folder: Path, names: list[str], data_dir) -> DatasetError:
    return missing_files_error(
        folder, names, origin=data_root_origin(data_dir), what=NAME,
        how_to_get=(
            f"They are the contents of PointNet's {ARCHIVE_NAME} ({ARCHIVE_URL}): "
            f"`unzip {ARCHIVE_NAME} -d {directory}` puts them in place (its {FOLDER}/ folder is found too)."
        ),
    )


def _listed(folder: Path, listing: str) -> list[str]:
    """The HDF5 file names a list file names, by their last path component."""
    path = folder / listing
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: unreadable ({error}); replace it with the one from {ARCHIVE_NAME}") from None
    names = [Path(line.replace("\\", "/")).name for line in lines]
    if not names or any(not name.endswith(".h5") for name in names):
        raise DatasetError(f"{path}: expected one .h5 file per line (as in {ARCHIVE_NAME}), got {lines[:3]!r}")
    return names


def _class_names(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: unreadable ({error}); replace it with the one from {ARCHIVE_NAME}") from None
    if len(names) != NUM_CLASSES:
        raise DatasetError(f"{path}: expected the {NUM_CLASSES} class names, one per line, found {len(names)}")
    return names


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise DatasetError(f"{NAME}: reading its HDF5 files needs h5py, which is not installed: {INSTALL_HINT}") from None
    return h5py


def _read_split(h5py, folder: Path, names: list[str], num_points: int, check_counts: bool) -> tuple[np.ndarray, np.ndarray]:
    clouds, labels = [], []
    for name in names:
        points, classes = _read_file(h5py, folder / name, num_points, check_counts)
        clouds.append(points)
        labels.append(classes)
    return np.concatenate(clouds), np.concatenate(labels)


def _read_file(h5py, path: Path, num_points: int, check_counts: bool) -> tuple[np.ndarray, np.ndarray]:
    """(clouds (N, num_points, 1, 3) float32, labels (N,) int64) of one HDF5 file, its structure checked."""
    fix = f"replace it with the file from {ARCHIVE_NAME}"
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DatasetError(f"{path}: not a readable HDF5 file ({error}); {fix}") from None
    with file:
        for key in ("data", "label"):
            if not isinstance(file.get(key), h5py.Dataset):
                raise DatasetError(f"{path}: no '{key}' dataset (found {sorted(file.keys())}); {fix}")
        data, label = file["data"], file["label"]
        if data.dtype != np.float32 or data.ndim != 3 or data.shape[2] != 3:
            raise DatasetError(f"{path}: 'data' must be float32 (N, {STORED_POINTS}, 3), got {data.dtype} {data.shape}; {fix}")
        stored = data.shape[1]
        if (check_counts and stored != STORED_POINTS) or stored < num_points:
            wanted = STORED_POINTS if check_counts else f"at least {num_points}"
            raise DatasetError(f"{path}: 'data' holds {stored} points per model, expected {wanted}; {fix}")
        if label.dtype.kind not in "iu" or label.shape not in ((len(data), 1), (len(data),)):
            raise DatasetError(f"{path}: 'label' must be integers (N, 1) with N = {len(data)}, got {label.dtype} "
                               f"{label.shape}; {fix}")
        try:
            points = np.asarray(data[:, :num_points, :], dtype=np.float32)
            classes = np.asarray(label[...]).reshape(-1).astype(np.int64)
        except OSError as error:  # a truncated file opens but fails when read
            raise DatasetError(f"{path}: cannot be read ({error}); {fix}") from None
    if not np.isfinite(points).all():
        raise DatasetError(f"{path}: 'data' holds non-finite coordinates; {fix}")
    if classes.size and (classes.min() < 0 or classes.max() >= NUM_CLASSES):
        raise DatasetError(f"{path}: labels must be in 0..{NUM_CLASSES - 1}, found {classes.min()}..{classes.max()}; {fix}")
    return points.reshape(len(points), num_points, 1, 3), classes
