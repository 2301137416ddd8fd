"""Tests for normbench.datasets.cifar10: the python version's pickled batches, brought by the user.

Every test writes tiny batches in the official format (dicts with b"data", a (N, 3072)
uint8 array of channel-first rows, and b"labels"), as a cifar-10-batches-py/ folder or
a cifar-10-python.tar.gz archive, into a temporary data root; the real data are never
needed.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from normbench import cli, datasets
from normbench.datasets import cifar10
from normbench.datasets.base import DatasetError

BATCH_SIZES = {"data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 1, "data_batch_4": 2, "data_batch_5": 4,
               "test_batch": 3}


def _batch(images: np.ndarray, labels: list[int], name: str) -> dict:
    """The official batch dict: each row the red, green and blue 32x32 planes, row-major."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    return {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
            b"filenames": [f"image_{index}.png".encode() for index in range(len(images))]}


def _meta() -> dict:
    return {b"num_cases_per_batch": 10000, b"label_names": [name.encode() for name in cifar10.CLASS_NAMES],
            b"num_vis": 3072}


def write_batches(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The seven files, tiny, in `folder`; returns batch name -> (NHWC images, labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, count in BATCH_SIZES.items():
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, 10, count)]
        labels[0] = 9
        (folder / name).write_bytes(pickle.dumps(_batch(images, labels, name), protocol=2))
        written[name] = (images, labels)
    (folder / "batches.meta").write_bytes(pickle.dumps(_meta(), protocol=2))
    return written


def write_archive(path: Path, folder: Path, *, extra: dict[str, bytes] | None = None, skip: str | None = None) -> str:
    """cifar-10-python.tar.gz holding `folder`'s files as cifar-10-batches-py/<name>; returns its MD5."""
    with tarfile.open(path, "w:gz") as archive:
        for name in cifar10.FILES:
            if name != skip:
                archive.add(folder / name, arcname=f"cifar-10-batches-py/{name}")
        for name, data in (extra or {}).items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def unpacked(root):
    return write_batches(root / "cifar10" / "cifar-10-batches-py")


def _expected(written, names):
    images = np.concatenate([written[name][0] for name in names])
    labels = np.concatenate([written[name][1] for name in names]).astype(np.int64)
    return images, labels


# --- loading ------------------------------------------------------------------------


def test_loads_the_unpacked_folder(root, unpacked):
    dataset = cifar10.load(root, check_counts=False)
    assert dataset.name == "cifar10" and dataset.num_classes == 10
    assert dataset.train_images.shape == (12, 32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (3, 32, 32, 3) and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int64 and dataset.test_labels.dtype == np.int64
    train_images, train_labels = _expected(unpacked, cifar10.TRAIN_BATCHES)  # batches 1..5 in order
    np.testing.assert_array_equal(dataset.train_images, train_images)
    np.testing.assert_array_equal(dataset.train_labels, train_labels)
    np.testing.assert_array_equal(dataset.test_images, unpacked["test_batch"][0])
    assert dataset.test_labels.tolist() == unpacked["test_batch"][1]
    assert dataset.train_images.flags.c_contiguous
    assert "already unpacked" in dataset.source
    assert set(dataset.files) == {f"cifar-10-batches-py/{name}" for name in cifar10.FILES}


def test_pixel_layout_is_the_documented_one(root, unpacked):
    """Row element c * 1024 + r * 32 + x is channel c of pixel (r, x)."""
    row = pickle.loads((root / "cifar10" / "cifar-10-batches-py" / "test_batch").read_bytes())[b"data"][1]
    image = cifar10.load(root, check_counts=False).test_images[1]
    for channel, r, x in [(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 17, 31)]:
        assert image[r, x, channel] == row[channel * 1024 + r * 32 + x]


def test_python2_pickles_are_read(root, unpacked):
    """The official files come from Python 2's cPickle: numpy.core.multiarray, str keys read as bytes."""
    path = root / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    batch = pickle.loads(path.read_bytes())
    data = pickle.dumps(batch, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n" in data
    path.write_bytes(data)
    np.testing.assert_array_equal(cifar10.load(root, check_counts=False).train_images[:3], unpacked["data_batch_1"][0])


def test_the_official_counts_are_checked_unless_told_otherwise(root, unpacked):
    with pytest.raises(DatasetError, match=r"holds 12 training images, the official files 50000; pass check_counts=False"):
        datasets.load("cifar10", root)


def test_registry_info_and_cli_listing(capsys):
    info = datasets.info("cifar10")
    assert (info.image_shape, info.num_classes, info.train_examples, info.test_examples) == ((32, 32, 3), 10, 50000, 10000)
    assert "\n" not in datasets.describe("cifar10")
    assert cli.main(["datasets"]) == 0
    assert any(line.split()[0] == "cifar10" for line in capsys.readouterr().out.splitlines())


# --- the archive --------------------------------------------------------------------


def test_the_archive_is_checked_and_unpacked(root, tmp_path):
    written = write_batches(tmp_path / "origin")
    directory = root / "cifar10"
    directory.mkdir(parents=True)
    md5 = write_archive(directory / "cifar-10-python.tar.gz", tmp_path / "origin",
                        extra={"cifar-10-batches-py/readme.html": b"<html>", "../../escaped": b"never extracted",
                               "cifar-10-batches-py/data_batch_6": b"never read"})
    dataset = cifar10.load(root, check_counts=False, archive_md5=md5)
    assert f"unpacked now from {directory / 'cifar-10-python.tar.gz'} (MD5 checked)" in dataset.source
    np.testing.assert_array_equal(dataset.test_images, written["test_batch"][0])
    assert sorted(p.name for p in (directory / "cifar-10-batches-py").iterdir()) == sorted(cifar10.FILES)
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()
    assert (directory / "cifar-10-python.tar.gz").exists()  # left in place
    assert "already unpacked" in cifar10.load(root, check_counts=False, archive_md5=md5).source


def test_an_archive_that_is_not_the_official_one_is_refused(root, tmp_path):
    write_batches(tmp_path / "origin")
    directory = root / "cifar10"
    directory.mkdir(parents=True)
    write_archive(directory / "cifar-10-python.tar.gz", tmp_path / "origin")
    with pytest.raises(DatasetError) as caught:
        cifar10.load(root, check_counts=False)  # the published MD5
    message = str(caught.value)
    assert str(directory / "cifar-10-python.tar.gz") in message
    assert "expected c58f30108f718f92721af3b95e74349a" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert not (directory / "cifar-10-batches-py" / "data_batch_1").exists()


def test_an_archive_without_a_member_is_named(root, tmp_path):
    write_batches(tmp_path / "origin")
    directory = root / "cifar10"
    directory.mkdir(parents=True)
    md5 = write_archive(directory / "cifar-10-python.tar.gz", tmp_path / "origin", skip="test_batch")
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: has no cifar-10-batches-py/test_batch"):
        cifar10.load(root, check_counts=False, archive_md5=md5)
    assert not (directory / "cifar-10-batches-py" / "data_batch_1").exists()  # all or nothing
    assert not list((directory / "cifar-10-batches-py").glob(".extract-*"))


def test_a_link_in_the_archive_is_not_followed(root, tmp_path):
    write_batches(tmp_path / "origin")
    directory = root / "cifar10"
    directory.mkdir(parents=True)
    archive = directory / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in cifar10.FILES:
            if name == "batches.meta":
                link = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(link)
            else:
                tar.add(tmp_path / "origin" / name, arcname=f"cifar-10-batches-py/{name}")
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py/batches\.meta is not a regular file"):
        cifar10.load(root, check_counts=False, archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())


# --- missing and bad files ----------------------------------------------------------


def test_missing_files_say_which_where_and_from_where(root, monkeypatch):
    monkeypatch.delenv("NORMBENCH_DATA_DIR", raising=False)
    with pytest.raises(DatasetError) as caught:
        cifar10.load(root)
    message = str(caught.value)
    assert "\n" not in message
    assert f"missing in {root / 'cifar10' / 'cifar-10-batches-py'}: data_batch_1, " in message
    assert all(name in message for name in cifar10.FILES)
    assert f"--data-dir {root}" in message and "NORMBENCH_DATA_DIR" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert f"put the archive itself in {root / 'cifar10'}" in message

    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(root))
    with pytest.raises(DatasetError, match=rf"comes from NORMBENCH_DATA_DIR={root};"):
        datasets.load("cifar10")


class _Exploit:
    """Unpickling this would run a shell command (what a hostile pickle does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(root, unpacked, tmp_path):
    marker = tmp_path / "exploited"
    path = root / "cifar10" / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_2: not a CIFAR-10 python batch \(UnpicklingError: refusing to "
                                           r"load (posix|nt)\.system"):
        cifar10.load(root, check_counts=False)
    assert not marker.exists()


def test_only_the_named_files_are_unpickled(root, unpacked, tmp_path):
    marker = tmp_path / "exploited"
    for name in ("data_batch_6", "readme.html"):
        (root / "cifar10" / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(_Exploit(marker)))
    cifar10.load(root, check_counts=False)
    assert not marker.exists()


@pytest.mark.parametrize("batch, message", [
    (b"\x80\x02}q\x00(", r"not a CIFAR-10 python batch \((EOFError|UnpicklingError)"),
    ([1, 2, 3], r"expected a dict with b'data' and b'labels', got list"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"b'data' must be a uint8 array \(N, 3072\), got float32"),
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"b'data' must be a uint8 array \(N, 3072\), got uint8 \(2, 1024\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"b'labels' must be 2 integers, one per image"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must be in 0\.\.9, found 0\.\.10"),
], ids=["truncated", "not-a-dict", "float-data", "short-rows", "label-count", "label-range"])
def test_bad_batches_are_named_with_what_is_wrong(root, unpacked, batch, message):
    path = root / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match=message) as caught:
        cifar10.load(root, check_counts=False)
    assert str(path) in str(caught.value) and "cifar-10-python.tar.gz" in str(caught.value)
    assert not (root / "cifar10" / "SHA256SUMS").exists()  # nothing invalid is ever recorded


def test_bad_meta_is_named(root, unpacked):
    path = root / "cifar10" / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}, protocol=2))
    with pytest.raises(DatasetError, match=r"batches\.meta: expected a dict with b'label_names', the 10 class names"):
        cifar10.load(root, check_counts=False)


# --- the SHA-256 manifest -----------------------------------------------------------


def test_first_load_records_the_files_and_later_loads_detect_changes(root, unpacked):
    directory = root / "cifar10"
    first = cifar10.load(root, check_counts=False)
    assert "SHA-256 recorded in" in first.source
    lines = (directory / "SHA256SUMS").read_text().splitlines()
    assert {line.split("  ")[1]: line.split("  ")[0] for line in lines} == first.files
    assert "SHA-256 checked against" in cifar10.load(root, check_counts=False).source

    write_batches(directory / "cifar-10-batches-py", seed=1)  # valid files, but not the ones first loaded
    with pytest.raises(DatasetError, match=r"differ from those recorded in .*SHA256SUMS on the first load \(changed: "
                                           r"cifar-10-batches-py/data_batch_1, .*delete .*SHA256SUMS"):
        cifar10.load(root, check_counts=False)
    (directory / "SHA256SUMS").unlink()
    assert cifar10.load(root, check_counts=False).files != first.files
