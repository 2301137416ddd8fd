"""MNIST point clouds (PointNet++, Qi et al. 2017b, supplementary B.3): each digit as 512 2-D points.

Built deterministically from the cached MNIST (``normbench.datasets.load("mnist")``), one
cloud per image, with MNIST's own 60,000 / 10,000 split and labels:

1. Points: the pixels brighter than half scale (value / 255 > 0.5, i.e. value >= 128),
   in row-major order.  The pixel in row r, column c becomes x = (c - 13.5) / 13.5,
   y = (13.5 - r) / 13.5: centred on the image, in [-1, 1], x to the right and y up, so
   the digit is upright when plotted the usual way.  Neighbouring pixels are 1/13.5 =
   0.074 apart.
2. Exactly 512 points.  Each image draws from its own generator,
   ``np.random.Generator(np.random.PCG64([2017, split, index]))`` (split 0 for training,
   1 for test; index the image's position in MNIST's file).  A digit with more than 512
   points keeps ``rng.choice(n, 512, replace=False)`` of them, in row-major order.  A
   digit with fewer keeps all n and appends 512 - n jittered copies: the points
   ``rng.integers(0, n, 512 - n)``, moved by ``clip(rng.normal(0, 0.01, (512 - n, 2)),
   -0.03, 0.03)`` (std 0.01, clipped at 0.03, less than half the pixel spacing, so a copy
   stays nearer its own pixel than any other).
3. Zero mean and unit ball, per cloud: subtract the centroid of the 512 points, divide by
   their largest distance from it (norms at most 1 up to float32 rounding, ~1e-7).
4. A third coordinate of zero, so a 3-D PointNet applies unchanged.

Each example is float32 of shape (512, 1, 3): the points stored as a (P, 1, C) image in
the canonical NHWC layout, over which ``global_max_pool`` pools.  Unlike the image data
sets' uint8 pixels, these are coordinates, returned as they are (not to be divided by 255).

The clouds are built once into ``<data root>/mnist_point_clouds/`` as IDX files
(train-points-idx4-float (60000, 512, 1, 3), 368 MB; t10k-points-idx4-float, 61 MB; and
copies of MNIST's two label files).  IDX, unlike .npz, has no time stamps, so the files'
SHA-256 digests depend on the data alone: they are pinned, checked on every load, and a
rebuild that does not reproduce them (a change in this construction, or NumPy changing
its random streams) is an error.  A missing or bad file is rebuilt from the cached MNIST.

Measured on MNIST: points per digit before resampling min 15, median 101, max 312 for
the training set; 19, 103, 258 for the test set.  No digit has more than 512, so step 2
only ever pads on the real data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .base import DATA_DIR_ENV_VAR, Dataset, DatasetError, DatasetInfo, Source, SourceError, data_root, data_root_origin, one_line
from .idx import load_idx_dataset, write_idx

__all__ = [
    "DESCRIPTION",
    "EXPECTED_SHA256",
    "NUM_POINTS",
    "BuildFromMnist",
    "build_clouds",
    "cache_dir",
    "digit_points",
    "example_generator",
    "load",
    "normalize",
    "point_cloud",
    "resample",
]

NAME = "mnist_point_clouds"
NUM_CLASSES = 10
NUM_POINTS = 512
INFO = DatasetInfo(name=NAME, image_shape=(NUM_POINTS, 1, 3), num_classes=NUM_CLASSES,
                   train_examples=60000, test_examples=10000, kind="point_clouds")

POINT_THRESHOLD = 127  # value / 255 > 0.5 exactly when the uint8 value exceeds 127
IMAGE_CENTRE = 13.5  # half of 28 - 1: the centre between the two middle pixels
JITTER_STD = 0.01
JITTER_CLIP = 0.03
SEED = 2017
SPLIT_NUMBERS = {"train": 0, "test": 1}

TRAIN_POINTS = "train-points-idx4-float"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_POINTS = "t10k-points-idx4-float"
TEST_LABELS = "t10k-labels-idx1-ubyte"
SPLITS = ((TRAIN_POINTS, TRAIN_LABELS), (TEST_POINTS, TEST_LABELS))

# SHA-256 of the four IDX files built from the pinned MNIST (the label files are MNIST's,
# byte for byte).  Module-level so tests can substitute a table for tiny fake MNIST files;
# load() also takes one.
EXPECTED_SHA256 = {
    TRAIN_POINTS: "d500aff077f851d85f5c5e20a87c94c17ba224e0122c58d407807135bd56033b",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_POINTS: "9dfae4a6d438f85c79b1a489e896fab58043db51d85cabe5638135369b289271",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

DESCRIPTION = (
    f"{NAME}: MNIST digits as {NUM_POINTS} 2-D points (pixels > 0.5, padded with jittered copies, "
    "zero mean, unit ball, z = 0; PointNet++ B.3), built from mnist, SHA-256 pinned; "
    f"60000 train / 10000 test clouds, {NUM_POINTS}x1x3 float32, 10 classes"
)


def digit_points(image: np.ndarray) -> np.ndarray:
    """The (n, 2) float64 (x, y) coordinates of the pixels of a (28, 28) uint8 `image` above half scale, row-major."""
    rows, columns = np.nonzero(np.asarray(image) > POINT_THRESHOLD)
    return np.stack([(columns - IMAGE_CENTRE) / IMAGE_CENTRE, (IMAGE_CENTRE - rows) / IMAGE_CENTRE], axis=1)


def example_generator(split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split` ("train" or "test")."""
    return np.random.Generator(np.random.PCG64([SEED, SPLIT_NUMBERS[split], index]))


def resample(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exactly NUM_POINTS of `points` (n >= 1): a subset without replacement, or all plus jittered copies."""
    count = len(points)
    if count >= NUM_POINTS:
        return points[np.sort(rng.choice(count, NUM_POINTS, replace=False))]
    copied = points[rng.integers(0, count, NUM_POINTS - count)]
    jitter = np.clip(rng.normal(0.0, JITTER_STD, copied.shape), -JITTER_CLIP, JITTER_CLIP)
    return np.concatenate([points, copied + jitter])


def normalize(points: np.ndarray) -> np.ndarray:
    """`points` moved to zero mean and scaled so that the farthest is at distance 1."""
    centred = points - points.mean(axis=0)
    radius = np.sqrt((centred**2).sum(axis=1)).max()
    return centred / radius if radius > 0 else centred


def point_cloud(image: np.ndarray, split: str, index: int) -> np.ndarray:
    """The (NUM_POINTS, 1, 3) float32 cloud of example `index` of `split`, from its (28, 28) uint8 `image`.

    Raises ValueError when no pixel of the image is above half scale.
    """
    points = digit_points(image)
    if len(points) == 0:
        raise ValueError(f"MNIST {split} image {index} has no pixel above half scale: no point cloud")
    planar = normalize(resample(points, example_generator(split, index)))
    cloud = np.zeros((NUM_POINTS, 1, 3), dtype=np.float32)
    cloud[:, 0, :2] = planar
    return cloud


def build_clouds(images: np.ndarray, split: str) -> np.ndarray:
    """The clouds of MNIST `images` (N, 28, 28, 1) uint8 of `split`: (N, NUM_POINTS, 1, 3) float32."""
    clouds = np.empty((len(images), NUM_POINTS, 1, 3), dtype=np.float32)
    for index, image in enumerate(images):
        clouds[index] = point_cloud(image[..., 0], split, index)
    return clouds


class BuildFromMnist:
    """Builds the four IDX files from MNIST, loaded (and fetched if `fetch`) under `data_dir`."""

    label = "build from MNIST"

    def __init__(self, data_dir: str | os.PathLike | None = None, *, fetch: bool = True) -> None:
        self.data_dir = data_dir
        self.fetch = fetch

    def __repr__(self) -> str:
        return f"BuildFromMnist({self.data_dir!r}, fetch={self.fetch!r})"

    def __call__(self, dest_dir: Path) -> None:
        from normbench import datasets  # the registry, imported here: it imports this module

        try:
            mnist = datasets.load("mnist", self.data_dir, fetch=self.fetch)
        except DatasetError as error:
            raise SourceError(f"MNIST: {one_line(error)}") from None
        try:
            train_clouds = build_clouds(mnist.train_images, "train")
            test_clouds = build_clouds(mnist.test_images, "test")
        except ValueError as error:
            raise SourceError(str(error)) from None
        write_idx(Path(dest_dir) / TRAIN_POINTS, train_clouds)
        write_idx(Path(dest_dir) / TRAIN_LABELS, mnist.train_labels.astype(np.uint8))
        write_idx(Path(dest_dir) / TEST_POINTS, test_clouds)
        write_idx(Path(dest_dir) / TEST_LABELS, mnist.test_labels.astype(np.uint8))


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the point cloud files: ``<data root>/mnist_point_clouds``."""
    return data_root(data_dir) / NAME


def load(
    data_dir: str | os.PathLike | None = None,
    *,
    fetch: bool = True,
    sources: Sequence[Source] | None = None,
    expected: Mapping[str, str] | None = None,
) -> Dataset:
    """Load the MNIST point clouds, building them into the cache first if a file is missing or bad.

    `data_dir` overrides the data root (see base.data_root), for these files and for the
    MNIST they are built from.  Building needs no network; `fetch=False` only keeps MNIST
    from being downloaded when it is not cached.  `sources` replaces the builder and
    `expected` the table of SHA-256 digests; both exist for tests.  Returns clouds as
    float32 (N, 512, 1, 3) in the dataset's image fields.  Raises DatasetError, one line
    saying what is wrong with which file and how to fix it.
    """
    directory = cache_dir(data_dir)
    return load_idx_dataset(
        INFO,
        directory,
        EXPECTED_SHA256 if expected is None else expected,
        SPLITS,
        sources=[BuildFromMnist(data_dir, fetch=fetch)] if sources is None else sources,
        fetch=True,  # building is local; the builder passes `fetch` on to MNIST
        how_to_fix=_how_to_fix(directory),
        origin=data_root_origin(data_dir),
        describe=f"MNIST point clouds (PointNet++ B.3) built from MNIST, IDX files in {directory}, SHA-256 verified",
        made="just made ({})",
        dtype=np.float32,
        fold_errors=True,
    )


def _how_to_fix(directory: Path) -> str:
    return (
        f"The files in {directory} are built from the cached MNIST on load.  If MNIST is the problem, its own message "
        "comes first.  If a fresh build does not match the pinned SHA-256, the construction changed "
        "(datasets/mnist_point_clouds.py, or NumPy's random streams): restore it, or if the change is intended "
        f"update EXPECTED_SHA256 there.  Set {DATA_DIR_ENV_VAR} (or pass --data-dir) to use another cache."
    )
