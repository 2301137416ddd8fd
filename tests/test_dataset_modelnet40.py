"""Tests for normbench.datasets.modelnet40: PointNet's HDF5 files, brought by the user.

Every test writes small files in the official layout (train_files.txt, test_files.txt,
shape_names.txt, ply_data_*.h5 with `data` and `label`) into a temporary data root; the
real data are never needed.  Tests that write HDF5 files skip without h5py (tox's
single-backend environments do not install the modelnet extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from normbench import cli, datasets
from normbench.datasets import modelnet40
from normbench.datasets.base import DatasetError

SHAPE_NAMES = [f"shape{index:02d}" for index in range(40)]


@pytest.fixture
def h5py():
    return pytest.importorskip("h5py")


def write_modelnet(folder: Path, h5py, *, train=(3, 2), test=(2,), points=32, seed=0) -> dict[str, tuple]:
    """Files in the official layout: one ply_data_train<i>.h5 per count in `train`, likewise test.

    Returns file name -> (data, labels) as written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, counts in (("train", train), ("test", test)):
        names = [f"ply_data_{split}{index}.h5" for index in range(len(counts))]
        # The archive's lists hold paths relative to PointNet's repository.
        (folder / f"{split}_files.txt").write_text("".join(f"data/modelnet40_ply_hdf5_2048/{name}\n" for name in names))
        for name, count in zip(names, counts):
            data = rng.uniform(-1, 1, (count, points, 3)).astype(np.float32)
            labels = rng.integers(0, 40, (count, 1)).astype(np.uint8)
            labels[0, 0] = 39  # the largest label occurs
            with h5py.File(folder / name, "w") as file:
                file.create_dataset("data", data=data)
                file.create_dataset("label", data=labels)
                file.create_dataset("normal", data=np.zeros_like(data))  # the official files carry more; ignored
            written[name] = (data, labels)
    (folder / "shape_names.txt").write_text("\n".join(SHAPE_NAMES) + "\n")
    return written


@pytest.fixture
def unpacked(tmp_path, h5py):
    """A data root with the archive unpacked into modelnet40/ (as `unzip -d`), and what was written."""
    root = tmp_path / "data"
    written = write_modelnet(root / "modelnet40" / modelnet40.FOLDER, h5py)
    return root, written


def _expected(written, split, num_points):
    names = sorted(name for name in written if name.startswith(f"ply_data_{split}"))
    data = np.concatenate([written[name][0] for name in names])[:, :num_points]
    labels = np.concatenate([written[name][1] for name in names]).reshape(-1)
    return data.reshape(len(data), num_points, 1, 3), labels.astype(np.int64)


# --- loading ------------------------------------------------------------------------


def test_loads_the_archive_folder(unpacked):
    root, written = unpacked
    dataset = modelnet40.load(root, num_points=16, check_counts=False)
    assert dataset.name == "modelnet40" and dataset.num_classes == 40
    assert dataset.train_images.shape == (5, 16, 1, 3) and dataset.train_images.dtype == np.float32
    assert dataset.test_images.shape == (2, 16, 1, 3) and dataset.test_images.dtype == np.float32
    assert dataset.train_labels.dtype == np.int64 and dataset.test_labels.dtype == np.int64
    for split, images, labels in (("train", dataset.train_images, dataset.train_labels),
                                  ("test", dataset.test_images, dataset.test_labels)):
        expected_images, expected_labels = _expected(written, split, 16)
        np.testing.assert_array_equal(images, expected_images)  # the first 16 points of each model
        np.testing.assert_array_equal(labels, expected_labels)
    assert dataset.train_labels.max() == 39
    assert set(dataset.files) == {f"{modelnet40.FOLDER}/{name}" for name in
                                  ["train_files.txt", "test_files.txt", "shape_names.txt", *written]}


def test_files_directly_in_the_directory_and_the_default_point_count(tmp_path, h5py):
    root = tmp_path / "data"
    written = write_modelnet(root / "modelnet40", h5py, points=2048)
    dataset = modelnet40.load(root, check_counts=False)
    assert modelnet40.INFO.image_shape == (1024, 1, 3)
    assert dataset.train_images.shape == (5, 1024, 1, 3)
    np.testing.assert_array_equal(dataset.train_images, _expected(written, "train", 1024)[0])
    assert set(dataset.files) == {"train_files.txt", "test_files.txt", "shape_names.txt", *written}


def test_the_official_counts_are_checked_unless_told_otherwise(tmp_path, h5py):
    root = tmp_path / "data"
    write_modelnet(root / "modelnet40", h5py, points=2048)
    with pytest.raises(DatasetError, match=r"hold 5 training examples, the official modelnet40_ply_hdf5_2048\.zip 9840; "
                                           r"pass check_counts=False"):
        datasets.load("modelnet40", root)  # the registry's load is the official one
    small = tmp_path / "small"
    write_modelnet(small / "modelnet40", h5py, points=32)
    with pytest.raises(DatasetError, match=r"ply_data_train0\.h5: 'data' holds 32 points per model, expected 2048"):
        modelnet40.load(small)
    with pytest.raises(DatasetError, match=r"holds 32 points per model, expected at least 64"):
        modelnet40.load(small, num_points=64, check_counts=False)
    with pytest.raises(DatasetError, match=r"num_points must be in 1\.\.2048, got 4096"):
        modelnet40.load(small, num_points=4096, check_counts=False)


def test_registry_info_and_cli_listing(capsys):
    info = datasets.info("modelnet40")
    assert (info.image_shape, info.num_classes, info.train_examples, info.test_examples) == ((1024, 1, 3), 40, 9840, 2468)
    line = datasets.describe("modelnet40")
    assert "\n" not in line and "1024" in line and "brought by the user" in line
    assert cli.main(["datasets"]) == 0
    assert any(line.split()[0] == "modelnet40" for line in capsys.readouterr().out.splitlines())


# --- missing and bad files ----------------------------------------------------------


def test_missing_files_say_which_where_and_from_where(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMBENCH_DATA_DIR", raising=False)
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as caught:
        modelnet40.load(root)
    message = str(caught.value)
    assert "\n" not in message
    assert f"missing in {root / 'modelnet40'}: " in message
    for name in modelnet40.OFFICIAL_FILES:
        assert name in message
    assert f"--data-dir {root}" in message and "NORMBENCH_DATA_DIR" in message
    assert "https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip" in message
    assert f"unzip modelnet40_ply_hdf5_2048.zip -d {root / 'modelnet40'}" in message

    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(root))
    with pytest.raises(DatasetError, match=rf"comes from NORMBENCH_DATA_DIR={root};"):
        datasets.load("modelnet40")


def test_a_missing_listed_file_is_named(unpacked):
    root, _ = unpacked
    (root / "modelnet40" / modelnet40.FOLDER / "ply_data_train1.h5").unlink()
    with pytest.raises(DatasetError, match=r"missing in .*modelnet40_ply_hdf5_2048: ply_data_train1\.h5\. "):
        modelnet40.load(root, check_counts=False)


def test_missing_h5py_says_how_to_install_it(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "modelnet40"
    folder.mkdir(parents=True)
    for name in modelnet40.OFFICIAL_FILES:
        (folder / name).write_text("")
    (folder / "train_files.txt").write_text("ply_data_train0.h5\n")
    (folder / "test_files.txt").write_text("ply_data_test0.h5\n")
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` raises ImportError
    with pytest.raises(DatasetError, match=r"needs h5py, which is not installed: pip install normbench\[modelnet\]"):
        modelnet40.load(tmp_path / "data")


def _rewrite(path, h5py, **datasets_):
    with h5py.File(path, "w") as file:
        for key, value in datasets_.items():
            file.create_dataset(key, data=value)


@pytest.mark.parametrize("change, message", [
    (lambda path, h5py: path.write_bytes(b"not an HDF5 file at all"), r"ply_data_test0\.h5: not a readable HDF5 file"),
    (lambda path, h5py: _rewrite(path, h5py, data=np.zeros((2, 32, 3), np.float32)), r"no 'label' dataset"),
    (lambda path, h5py: _rewrite(path, h5py, data=np.zeros((2, 32, 3)), label=np.zeros((2, 1), np.uint8)),
     r"'data' must be float32 \(N, 2048, 3\), got float64"),
    (lambda path, h5py: _rewrite(path, h5py, data=np.zeros((2, 32, 3), np.float32), label=np.zeros((3, 1), np.uint8)),
     r"'label' must be integers \(N, 1\) with N = 2"),
    (lambda path, h5py: _rewrite(path, h5py, data=np.zeros((2, 32, 3), np.float32), label=np.full((2, 1), 40, np.uint8)),
     r"labels must be in 0\.\.39, found 40\.\.40"),
    (lambda path, h5py: _rewrite(path, h5py, data=np.full((2, 32, 3), np.nan, np.float32), label=np.zeros((2, 1), np.uint8)),
     r"non-finite coordinates"),
], ids=["not-hdf5", "no-label", "float64", "label-count", "label-range", "nan"])
def test_bad_files_are_named_with_what_is_wrong(unpacked, h5py, change, message):
    root, _ = unpacked
    path = root / "modelnet40" / modelnet40.FOLDER / "ply_data_test0.h5"
    change(path, h5py)
    with pytest.raises(DatasetError, match=message) as caught:
        modelnet40.load(root, num_points=16, check_counts=False)
    assert str(path) in str(caught.value) and "replace it with the file from modelnet40_ply_hdf5_2048.zip" in str(caught.value)
    assert not (root / "modelnet40" / "SHA256SUMS").exists()  # nothing invalid is ever recorded


def test_wrong_class_names_and_lists(unpacked):
    root, _ = unpacked
    folder = root / "modelnet40" / modelnet40.FOLDER
    (folder / "shape_names.txt").write_text("airplane\nbathtub\n")
    with pytest.raises(DatasetError, match=r"shape_names\.txt: expected the 40 class names, one per line, found 2"):
        modelnet40.load(root, num_points=16, check_counts=False)
    (folder / "train_files.txt").write_text("")
    with pytest.raises(DatasetError, match=r"train_files\.txt: expected one \.h5 file per line"):
        modelnet40.load(root, num_points=16, check_counts=False)


# --- the SHA-256 manifest -----------------------------------------------------------


def test_first_load_records_the_files_and_later_loads_detect_changes(unpacked, h5py):
    root, written = unpacked
    directory = root / "modelnet40"
    first = modelnet40.load(root, num_points=16, check_counts=False)
    assert "SHA-256 recorded in" in first.source
    manifest = (directory / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in manifest) == sorted(first.files)
    assert all(first.files[line.split("  ")[1]] == line.split("  ")[0] for line in manifest)
    assert "SHA-256 checked against" in modelnet40.load(root, num_points=16, check_counts=False).source

    # A file replaced by another valid one is still refused: it is not the one first loaded.
    write_modelnet(directory / modelnet40.FOLDER, h5py, seed=1)
    with pytest.raises(DatasetError) as caught:
        modelnet40.load(root, num_points=16, check_counts=False)
    message = str(caught.value)
    assert f"differ from those recorded in {directory / 'SHA256SUMS'} on the first load" in message
    assert "changed: modelnet40_ply_hdf5_2048/ply_data_test0.h5, modelnet40_ply_hdf5_2048/ply_data_train0.h5" in message
    assert f"delete {directory / 'SHA256SUMS'}" in message

    (directory / "SHA256SUMS").unlink()
    again = modelnet40.load(root, num_points=16, check_counts=False)
    assert again.files != first.files and "SHA-256 recorded in" in again.source


def test_a_damaged_manifest_is_reported(unpacked):
    root, _ = unpacked
    modelnet40.load(root, num_points=16, check_counts=False)
    (root / "modelnet40" / "SHA256SUMS").write_text("not a manifest\n")
    with pytest.raises(DatasetError, match=r"SHA256SUMS line 1 is not '<sha256>  <file>'; delete it"):
        modelnet40.load(root, num_points=16, check_counts=False)
