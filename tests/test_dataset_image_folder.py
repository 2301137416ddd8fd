"""Tests for normbench.datasets.image_folder (registered as imagenet_folder): train/<class>/*.JPEG, val/<class>/*.JPEG.

Every test writes a handful of small images with Pillow into a temporary data root; no
real ImageNet is needed.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normbench import cli, datasets
from normbench.datasets import image_folder
from normbench.datasets.base import DatasetError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def _save(path: Path, image: Image.Image, format_: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format_, **({"quality": 95} if format_ == "JPEG" else {}))


def _solid(color, size=(20, 14), mode="RGB"):
    return Image.new(mode, size, color)


@pytest.fixture
def root(tmp_path):
    """A data root whose imagenet_folder/ has three classes; the class 'c' has no validation images."""
    root = tmp_path / "data"
    folder = root / "imagenet_folder"
    _save(folder / "train" / "b" / "2.JPEG", _solid(BLUE))
    _save(folder / "train" / "b" / "1.jpg", _solid(BLUE, (9, 30)))
    _save(folder / "train" / "a" / "x.JPEG", _solid(RED, (30, 30)))
    _save(folder / "train" / "a" / "grey.png", _solid(128, (12, 16), mode="L"), "PNG")
    _save(folder / "train" / "c" / "only.JPEG", _solid(GREEN))
    (folder / "train" / "c" / "notes.txt").write_text("not an image")
    (folder / "train" / "a" / ".hidden.JPEG").write_bytes(b"skipped")
    (folder / "train" / ".cache").mkdir()
    _save(folder / "val" / "b" / "v1.JPEG", _solid(BLUE, (40, 20)))
    _save(folder / "val" / "a" / "v2.JPEG", _solid(RED))
    return root


def _load(root, **options):
    return image_folder.load(root, **{"image_size": 8, "check_counts": False, **options})


# --- loading ------------------------------------------------------------------------


def test_classes_labels_order_shapes_and_colours(root):
    dataset = _load(root)
    assert dataset.name == "imagenet_folder" and dataset.num_classes == 3
    assert dataset.train_images.shape == (5, 8, 8, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (2, 8, 8, 3) and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int64
    # Sorted classes a, b, c; within a class, sorted file names; .txt and hidden entries skipped.
    assert dataset.train_labels.tolist() == [0, 0, 1, 1, 2]
    assert list(dataset.files)[:5] == ["train/a/grey.png", "train/a/x.JPEG", "train/b/1.jpg", "train/b/2.JPEG",
                                       "train/c/only.JPEG"]
    assert dataset.test_labels.tolist() == [0, 1]
    assert np.abs(dataset.train_images[1].astype(int) - RED).max() <= 3  # JPEG rounding
    assert np.all(dataset.train_images[0] == 128)  # grey PNG, converted to RGB
    assert np.abs(dataset.train_images[4].astype(int) - GREEN).max() <= 3
    assert "3 classes" in dataset.source and "shorter side 9, centre crop 8x8" in dataset.source


def test_decode_resizes_the_shorter_side_and_crops_the_centre():
    assert image_folder.default_resize(224) == 256 and image_folder.default_resize(8) == 9
    wide = Image.new("RGB", (40, 10), RED)
    wide.paste(BLUE, (20, 0, 40, 10))  # left half red, right half blue
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    crop = image_folder.decode_image(buffer.getvalue(), image_size=8, resize_to=8)  # 32x8, columns 12..19 kept
    assert crop.shape == (8, 8, 3) and crop.dtype == np.uint8
    assert tuple(crop[4, 0]) == RED and tuple(crop[4, 7]) == BLUE  # the centre: half red, half blue

    tall = Image.new("RGB", (10, 40), RED)
    tall.paste(BLUE, (0, 20, 10, 40))
    buffer = io.BytesIO()
    tall.save(buffer, format="PNG")
    crop = image_folder.decode_image(buffer.getvalue(), image_size=8, resize_to=16)  # 16x64, rows 28..35 kept
    assert tuple(crop[0, 4]) == RED and tuple(crop[7, 4]) == BLUE


def test_the_official_counts_are_checked_unless_told_otherwise(root):
    with pytest.raises(DatasetError, match=r"holds 3 classes, 5 training and 2 validation images; ImageNet-1k has 1000, "
                                           r"1281167 and 50000: pass check_counts=False"):
        datasets.load("imagenet_folder", root)


def test_a_folder_too_large_for_memory_is_refused_before_decoding_when_streaming_is_off(root):
    with pytest.raises(DatasetError) as caught:
        _load(root, image_size=224, memory_limit=1_000_000, streaming=False)
    message = str(caught.value)
    assert "holds 7 images: 1.1 MB as uint8 arrays at 224x224x3, more than the limit of 1.0 MB" in message
    assert "Stream it from disk (streaming=True" in message
    assert not (root / "imagenet_folder" / "SHA256SUMS").exists()
    assert not _load(root).streamed  # the default bound: half the memory available


# --- streaming ----------------------------------------------------------------------


def test_a_folder_too_large_for_memory_streams_from_a_decoded_cache(root):
    folder = root / "imagenet_folder"
    held = _load(root)
    streamed = _load(root, memory_limit=1)
    assert streamed.streamed and isinstance(streamed.train_images, np.memmap)
    for split in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(streamed, split), getattr(held, split))
    cache = image_folder.stream_cache_dir(folder, 8, 9)
    assert sorted(p.name for p in cache.iterdir()) == ["listing.tsv", "train.npy", "train.sha256", "val.npy",
                                                        "val.sha256"]
    # One digest pins every image: the manifest's, not one entry per image in each run's provenance.
    assert streamed.files == {"SHA256SUMS": hashlib.sha256((folder / "SHA256SUMS").read_bytes()).hexdigest()}
    assert "streamed from its decoded cache" in streamed.source
    assert _load(root, streaming=True).streamed  # asked for, though it would fit


def test_a_streamed_load_reads_its_cache_and_refuses_changed_files(root, monkeypatch):
    folder = root / "imagenet_folder"
    first = _load(root, streaming=True)
    monkeypatch.setattr(image_folder, "decode_image", lambda *_: pytest.fail("the cache was decoded again"))
    again = _load(root, streaming=True)
    np.testing.assert_array_equal(again.train_images, first.train_images)
    _save(folder / "train" / "a" / "x.JPEG", _solid(BLUE, (31, 30)))
    (folder / "val" / "a" / "v2.JPEG").unlink()
    with pytest.raises(DatasetError) as caught:
        _load(root, streaming=True)
    message = str(caught.value)
    assert "differ from those its decoded cache" in message and "changed: train/a/x.JPEG; missing: val/a/v2.JPEG" in message
    assert f"delete {image_folder.stream_cache_dir(folder, 8, 9)}" in message and "\n" not in message


def test_an_interrupted_streamed_build_resumes_where_it_stopped(root, monkeypatch):
    """A build killed part-way (here: a file that cannot be read) keeps its finished chunks;
    the next load decodes only the rest, and the result is the whole folder."""
    monkeypatch.setattr(image_folder, "STREAM_CHUNK", 2)
    real = image_folder._read_and_decode
    decoded, failures = [], [True]

    def flaky(path, *args):
        if path.name == "only.JPEG" and failures:  # the fifth training image, in the third chunk, once
            failures.pop()
            raise DatasetError(f"{path}: unreadable (simulated)")
        decoded.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(image_folder, "_read_and_decode", flaky)
    with pytest.raises(DatasetError, match="only.JPEG: unreadable"):
        _load(root, streaming=True)
    cache = image_folder.stream_cache_dir(root / "imagenet_folder", 8, 9)
    assert len((cache / "train.sha256").read_text().splitlines()) == 4 and not (cache / "train.npy").exists()
    with open(cache / "train.sha256", "a") as file:  # a line torn by a crash while it was written
        file.write("0123abc")
    decoded.clear()
    streamed = _load(root, streaming=True)
    assert decoded == ["only.JPEG", "v2.JPEG", "v1.JPEG"]  # the rest of train/, then val/ (class a, then b)
    np.testing.assert_array_equal(streamed.train_images, _load(root).train_images)


def test_streaming_checks_the_disk_before_decoding(root, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(DatasetError, match=r"streaming needs .* for the decoded arrays in .* and its disk has 0.0 MB "
                                           r"free"):
        _load(root, streaming=True)


def test_registry_info_and_cli_listing(capsys):
    info = datasets.info("imagenet_folder")
    assert (info.image_shape, info.num_classes, info.train_examples, info.test_examples) == ((224, 224, 3), 1000,
                                                                                              1281167, 50000)
    assert "\n" not in datasets.describe("imagenet_folder")
    assert cli.main(["datasets"]) == 0
    assert any(line.split()[0] == "imagenet_folder" for line in capsys.readouterr().out.splitlines())


# --- missing and bad files ----------------------------------------------------------


def test_missing_folders_say_what_where_and_from_where(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMBENCH_DATA_DIR", raising=False)
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as caught:
        image_folder.load(root)
    message = str(caught.value)
    assert "\n" not in message
    assert f"missing in {root / 'imagenet_folder'}: train/<class>/*.JPEG, val/<class>/*.JPEG" in message
    assert f"--data-dir {root}" in message and "NORMBENCH_DATA_DIR" in message
    assert "https://image-net.org/download.php" in message

    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(root))
    with pytest.raises(DatasetError, match=rf"comes from NORMBENCH_DATA_DIR={root};"):
        datasets.load("imagenet_folder")


def test_folder_shape_errors(root):
    folder = root / "imagenet_folder"
    _save(folder / "val" / "zebra" / "z.JPEG", _solid(RED))
    with pytest.raises(DatasetError, match=r"val has class folders that train/ does not: zebra"):
        _load(root)
    (folder / "val" / "zebra" / "z.JPEG").unlink()
    (folder / "val" / "zebra").rmdir()
    (folder / "train" / "d").mkdir()
    with pytest.raises(DatasetError, match=r"train/d holds no images"):
        _load(root)


def test_a_file_that_is_not_an_image_is_named(root):
    path = root / "imagenet_folder" / "train" / "b" / "2.JPEG"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DatasetError, match=r"2\.JPEG: cannot be decoded as an image") as caught:
        _load(root)
    assert str(path) in str(caught.value)


# --- the SHA-256 manifest -----------------------------------------------------------


def test_first_load_records_the_files_and_later_loads_detect_changes(root):
    folder = root / "imagenet_folder"
    first = _load(root)
    assert len(first.files) == 7 and "SHA-256 recorded in" in first.source
    assert len((folder / "SHA256SUMS").read_text().splitlines()) == 7
    assert "SHA-256 checked against" in _load(root, image_size=4).source  # the files, not the transform, are recorded

    _save(folder / "train" / "a" / "x.JPEG", _solid(BLUE, (30, 30)))
    _save(folder / "train" / "c" / "new.JPEG", _solid(GREEN))
    (folder / "val" / "a" / "v2.JPEG").unlink()
    with pytest.raises(DatasetError) as caught:
        _load(root)
    message = str(caught.value)
    assert "changed: train/a/x.JPEG; missing: val/a/v2.JPEG; new: train/c/new.JPEG" in message
    assert f"delete {folder / 'SHA256SUMS'}" in message
