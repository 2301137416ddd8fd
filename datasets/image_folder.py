"""An ImageNet-style image folder, brought by the user: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``.

Registered as ``imagenet_folder`` (underscore, like the other data sets' names).  The
folder is ``<data root>/imagenet_folder/`` (see base.data_root; ``--data-dir`` or
``NORMBENCH_DATA_DIR`` choose the root); no source here can download it.  For ImageNet
(ILSVRC 2012) get ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` from
https://image-net.org/download.php (registration needed), unpack the training images
into ``train/<wnid>/`` and sort the validation images into ``val/<wnid>/`` by their
labels (the archive has them in one flat folder).  Any folder of that shape works
(Imagenette, a subset of ImageNet, your own classes) with ``check_counts=False``.

- Classes are the sorted names of the subfolders of ``train/``; label i is the i-th.
  Every folder of ``val/`` must be one of them; a class may have no validation images.
  Files ending in .jpeg, .jpg or .png (any case) are images; hidden files and folders
  are skipped.  Examples are ordered by class, then by file name.
- Each image is decoded with Pillow, converted to RGB, resized so that its shorter side
  is `resize_to` pixels (bilinear, antialiased when shrinking; default
  round(image_size * 256 / 224), 256 for 224: the usual ImageNet evaluation transform)
  and centre-cropped to image_size x image_size (default 224; odd margins leave the
  extra pixel at the right and bottom).  The same transform is used for both splits:
  random crops and flips for training belong to the augmentations
  (normbench.augmentations), not to the data set.
- Returned like the other image data sets: uint8 NHWC (N, size, size, 3), int64 labels.

Limit: the whole data set is held in memory as uint8 arrays, N x size x size x 3 bytes
(ImageNet-1k at 224, training and validation: 200 GB, more than any benchmark machine
has).  Before decoding anything, load() counts the images and refuses, naming the
sizes, when the arrays would take more than half of the memory available (MemAvailable,
capped by a cgroup limit; the runner also makes float copies of them): use a subset or a
smaller image_size.  A streaming loader would lift this limit; the Dataset record
(in-memory arrays) does not support one yet.

Checksums: none are published per file.  Every file's SHA-256 is computed from the
bytes read for decoding; the first load that decodes everything records them in
``<data root>/imagenet_folder/SHA256SUMS`` and later loads refuse a folder whose files
changed, appeared or disappeared (delete the manifest to accept them).  With
``check_counts`` (the default) the folder must also hold ImageNet-1k's 1,000 classes,
1,281,167 training and 50,000 validation images.
"""

from __future__ import annotations

import hashlib
import io
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
)

__all__ = ["DESCRIPTION", "EXTENSIONS", "IMAGE_SIZE", "INFO", "cache_dir", "decode_image", "default_resize", "load"]

NAME = "imagenet_folder"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
INFO = DatasetInfo(name=NAME, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_classes=NUM_CLASSES,
                   train_examples=1281167, test_examples=50000)
SPLITS = ("train", "val")
EXTENSIONS = (".jpeg", ".jpg", ".png")
DOWNLOAD_URL = "https://image-net.org/download.php"
MEMORY_FRACTION = 0.5  # of the memory available, at most, for the uint8 arrays

DESCRIPTION = (
    f"{NAME}: an ImageNet-style folder brought by the user (train/<class>/*.JPEG, val/<class>/*.JPEG; shorter side "
    f"256, centre crop; held in memory, SHA-256 recorded on first load); 1281167 train / 50000 val images, "
    f"{IMAGE_SIZE}x{IMAGE_SIZE}x3 uint8, 1000 classes"
)


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding train/ and val/: ``<data root>/imagenet_folder``."""
    return data_root(data_dir) / NAME


def default_resize(image_size: int) -> int:
    """The shorter side images are resized to before the centre crop: image_size * 256 / 224, rounded."""
    return round(image_size * 256 / 224)


def load(
    data_dir: str | os.PathLike | None = None,
    *,
    fetch: bool = True,
    image_size: int = IMAGE_SIZE,
    resize_to: int | None = None,
    check_counts: bool = True,
    memory_limit: int | None = None,
) -> Dataset:
    """Load the image folder in ``<data root>/imagenet_folder`` into memory (see the module docstring).

    `fetch` has no effect: nothing can be downloaded.  `image_size` is the side of the
    centre crop, `resize_to` the shorter side before it (default_resize(image_size)).
    `check_counts=False` accepts any number of classes and images.  `memory_limit`
    (bytes) replaces the default bound on the arrays (half the memory available).
    Raises DatasetError naming what is missing or wrong.
    """
    del fetch  # nothing to fetch: the user brings the files
    resize_to = default_resize(image_size) if resize_to is None else resize_to
    if image_size < 1 or resize_to < image_size:
        raise DatasetError(f"{NAME}: need 1 <= image_size <= resize_to, got image_size {image_size}, resize_to {resize_to}")
    directory = cache_dir(data_dir)
    missing = [f"{split}/<class>/*.JPEG" for split in SPLITS if not (directory / split).is_dir()]
    if missing:
        raise missing_files_error(
            directory, missing, origin=data_root_origin(data_dir), what=NAME,
            how_to_get=(f"For ImageNet: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from {DOWNLOAD_URL} "
                        "(registration needed); unpack the training images into train/<wnid>/ and sort the validation "
                        "images into val/<wnid>/ by their labels. Any folder of that shape loads with "
                        "check_counts=False."),
        )
    classes = _class_folders(directory / "train")
    listing = {split: _list_images(directory, split, classes) for split in SPLITS}
    if check_counts:
        found = (len(classes), len(listing["train"]), len(listing["val"]))
        official = (NUM_CLASSES, INFO.train_examples, INFO.test_examples)
        if found != official:
            raise DatasetError(
                f"{NAME}: {directory} holds {found[0]} classes, {found[1]} training and {found[2]} validation images; "
                f"ImageNet-1k has {official[0]}, {official[1]} and {official[2]}: pass check_counts=False to load "
                "another folder"
            )
    _check_memory(directory, len(listing["train"]) + len(listing["val"]), image_size, memory_limit)

    digests: dict[str, str] = {}
    arrays = {}
    for split in SPLITS:
        images = np.empty((len(listing[split]), image_size, image_size, 3), dtype=np.uint8)
        for index, (relative, _) in enumerate(listing[split]):
            path = directory / relative
            try:
                data = path.read_bytes()
            except OSError as error:
                raise DatasetError(f"{path}: unreadable ({error.strerror or error})") from None
            digests[relative] = hashlib.sha256(data).hexdigest()
            try:
                images[index] = decode_image(data, image_size, resize_to)
            except Exception as error:  # noqa: BLE001 -- Pillow raises many kinds of errors for a bad file
                raise DatasetError(f"{path}: cannot be decoded as an image ({type(error).__name__}: {error}); "
                                   "replace or remove it") from None
        arrays[split] = (images, np.array([label for _, label in listing[split]], dtype=np.int64))

    recorded = check_manifest(directory, digests, what=NAME)
    if not recorded:
        record_manifest(directory, digests, what=NAME)
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["val"]
    return Dataset(
        name=NAME,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=len(classes),
        source=(f"image folder {directory} ({len(classes)} classes; val/ as the test split), shorter side {resize_to}, "
                f"centre crop {image_size}x{image_size}; SHA-256 {'checked against' if recorded else 'recorded in'} "
                f"{directory / 'SHA256SUMS'}"),
        files=digests,
    )


def decode_image(data: bytes, image_size: int = IMAGE_SIZE, resize_to: int | None = None) -> np.ndarray:
    """One encoded image as (image_size, image_size, 3) uint8: RGB, shorter side resized to `resize_to`, centre crop."""
    from PIL import Image  # Pillow comes with matplotlib, a dependency

    resize_to = default_resize(image_size) if resize_to is None else resize_to
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = resize_to / min(width, height)
    size = (resize_to, max(resize_to, round(height * scale))) if width <= height else (max(resize_to, round(width * scale)), resize_to)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    return np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda entry: entry.name)


def _class_folders(train: Path) -> list[str]:
    classes = [entry.name for entry in _visible_entries(train) if entry.is_dir()]
    if not classes:
        raise DatasetError(f"{NAME}: {train} has no class folders: expected train/<class>/*.JPEG")
    return classes


def _list_images(directory: Path, split: str, classes: list[str]) -> list[tuple[str, int]]:
    """(path relative to `directory`, label) of every image of `split`, by class then file name."""
    label_of = {name: label for label, name in enumerate(classes)}
    folders = [entry.name for entry in _visible_entries(directory / split) if entry.is_dir()]
    strangers = [name for name in folders if name not in label_of]
    if strangers:
        raise DatasetError(f"{NAME}: {directory / split} has class folders that train/ does not: "
                           f"{', '.join(strangers[:5])}{' ...' if len(strangers) > 5 else ''}")
    listing = []
    for name in folders:
        images = [entry.name for entry in _visible_entries(directory / split / name)
                  if entry.is_file() and entry.name.lower().endswith(EXTENSIONS)]
        if not images and split == "train":
            raise DatasetError(f"{NAME}: {directory / split / name} holds no images ({', '.join(EXTENSIONS)})")
        listing += [(f"{split}/{name}/{image}", label_of[name]) for image in images]
    return listing


def _check_memory(directory: Path, count: int, image_size: int, memory_limit: int | None) -> None:
    needed = count * image_size * image_size * 3
    if memory_limit is None:
        from normbench.resources import host_memory_available  # imported here: resources imports this package

        available = host_memory_available()
        if available is None:
            return
        memory_limit, what = int(available * MEMORY_FRACTION), f"half of the {_size(available)} of memory available"
    else:
        what = f"the limit of {_size(memory_limit)}"
    if needed > memory_limit:
        raise DatasetError(
            f"{NAME}: {directory} holds {count} images: {_size(needed)} as uint8 arrays at "
            f"{image_size}x{image_size}x3, more than {what}. This loader holds the whole data set in memory: "
            "use a subset of the folder (check_counts=False) or a smaller image_size"
        )


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"
