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

Memory: when the uint8 arrays, N x size x size x 3 bytes (ImageNet-1k at 224, training
and validation: 200 GB), fit in half of the memory available (MemAvailable, capped by a
cgroup limit; the runner also makes float copies of them), they are held in memory.
Otherwise the folder is *streamed*: decoded once, with the same transform, into a cache
of raw uint8 arrays beside it (``<folder>/.decoded-<size>-<resize>/{train,val}.npy``),
which later loads memory-map instead of decoding. The runner then reads one batch at a
time from the map (`Dataset.streamed`), so memory holds a batch, not the data set; the
disk holds the arrays once (checked before the build starts). The build keeps what it
has decoded in chunks of STREAM_CHUNK images: an interrupted build (a killed process, a
bad file) resumes where it stopped. `streaming=True` streams a folder that would fit,
`streaming=False` refuses one that does not, naming the sizes.

Checksums: none are published per file.  Every file's SHA-256 is computed from the
bytes read for decoding; the first load that decodes everything records them in
``<data root>/imagenet_folder/SHA256SUMS`` and later loads refuse a folder whose files
changed, appeared or disappeared (delete the manifest to accept them).  A streamed load
that finds its decoded cache does not read the images again: it compares every file's
size and modification time with those the cache was built from, refuses a folder that
differs (delete the cache to rebuild it), and records the manifest's own SHA-256 as the
run's data file (one digest that pins every image, instead of 1.3 million entries in each
run's provenance).  With
``check_counts`` (the default) the folder must also hold ImageNet-1k's 1,000 classes,
1,281,167 training and 50,000 validation images.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from normbench.durable import fsync_path
from normbench.provenance import schedulable_cores

from .base import (
    HELD_MEMORY_FRACTION,
    MANIFEST_NAME,
    Dataset,
    DatasetError,
    DatasetInfo,
    check_manifest,
    data_root,
    data_root_origin,
    missing_files_error,
    record_manifest,
)

__all__ = ["DESCRIPTION", "EXTENSIONS", "IMAGE_SIZE", "INFO", "cache_dir", "decode_image", "default_resize", "load",
           "stream_cache_dir"]

NAME = "imagenet_folder"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
INFO = DatasetInfo(name=NAME, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_classes=NUM_CLASSES,
                   train_examples=1281167, test_examples=50000, streams=True)
SPLITS = ("train", "val")
EXTENSIONS = (".jpeg", ".jpg", ".png")
DOWNLOAD_URL = "https://image-net.org/download.php"
STREAM_CHUNK = 1024  # images decoded between two durable checkpoints of a streamed build

DESCRIPTION = (
    f"{NAME}: an ImageNet-style folder brought by the user (train/<class>/*.JPEG, val/<class>/*.JPEG; shorter side "
    f"256, centre crop; in memory, or streamed from a decoded cache when too large; SHA-256 recorded on first load); 1281167 train / 50000 val images, "
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
    streaming: bool | None = None,
) -> Dataset:
    """Load the image folder in ``<data root>/imagenet_folder`` (see the module docstring).

    `fetch` has no effect: nothing can be downloaded.  `image_size` is the side of the
    centre crop, `resize_to` the shorter side before it (default_resize(image_size)).
    `check_counts=False` accepts any number of classes and images.  `memory_limit`
    (bytes) replaces the default bound on the arrays held in memory (half the memory
    available).  `streaming`: None streams a folder too large for memory through the
    decoded cache, True always, False never (a folder too large is refused).
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
    too_large = _memory_problem(directory, len(listing["train"]) + len(listing["val"]), image_size, memory_limit)
    if streaming or (streaming is None and too_large):
        return _load_streamed(directory, classes, listing, image_size, resize_to)
    if too_large:
        raise DatasetError(too_large)

    digests: dict[str, str] = {}
    arrays = {}
    for split in SPLITS:
        images = np.empty((len(listing[split]), image_size, image_size, 3), dtype=np.uint8)
        for index, (relative, _) in enumerate(listing[split]):
            digests[relative], images[index] = _read_and_decode(directory / relative, image_size, resize_to)
        arrays[split] = (images, np.array([label for _, label in listing[split]], dtype=np.int64))

    recorded = check_manifest(directory, digests, what=NAME)
    if not recorded:
        record_manifest(directory, digests, what=NAME)
    return _dataset(directory, classes, arrays, image_size, resize_to, digests,
                    f"SHA-256 {'checked against' if recorded else 'recorded in'} {directory / MANIFEST_NAME}")


def _dataset(directory: Path, classes: list[str], arrays: dict, image_size: int, resize_to: int, files: dict,
             how: str, streamed: bool = False) -> Dataset:
    """The Dataset of `arrays` (split -> (images, labels)); `how`: how they were loaded, for `source`."""
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["val"]
    return Dataset(
        name=NAME,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=len(classes),
        source=(f"image folder {directory} ({len(classes)} classes; val/ as the test split), shorter side {resize_to}, "
                f"centre crop {image_size}x{image_size}; {how}"),
        files=files,
        streamed=streamed,
    )


def _read_and_decode(path: Path, image_size: int, resize_to: int) -> tuple[str, np.ndarray]:
    """(SHA-256 of the file, its decoded image); DatasetError naming a file that cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: unreadable ({error.strerror or error})") from None
    try:
        return hashlib.sha256(data).hexdigest(), decode_image(data, image_size, resize_to)
    except Exception as error:  # noqa: BLE001 -- Pillow raises many kinds of errors for a bad file
        raise DatasetError(f"{path}: cannot be decoded as an image ({type(error).__name__}: {error}); "
                           "replace or remove it") from None


# ----------------------------------------------------------------------------- streaming


def stream_cache_dir(directory: Path, image_size: int, resize_to: int) -> Path:
    """Where a streamed load keeps the decoded arrays of `directory` for one transform."""
    return directory / f".decoded-{image_size}-{resize_to}"


def _stat_listing(directory: Path, listing: dict) -> str:
    """One line per image, `split`, path, label, size and modification time: what the
    decoded cache was built from, compared on every later load instead of re-reading."""
    lines = []
    for split in SPLITS:
        for relative, label in listing[split]:
            try:
                stat = (directory / relative).stat()
            except OSError as error:
                raise DatasetError(f"{directory / relative}: unreadable ({error.strerror or error})") from None
            lines.append(f"{split}\t{relative}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n")
    return "".join(lines)


def _listing_difference(built: str, now: str) -> str:
    before = {line.split("\t")[1]: line for line in built.splitlines()}
    after = {line.split("\t")[1]: line for line in now.splitlines()}
    changed = sorted(name for name in after if name in before and before[name] != after[name])
    gone = sorted(name for name in before if name not in after)
    new = sorted(name for name in after if name not in before)
    return "; ".join(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                     for label, names in (("changed", changed), ("missing", gone), ("new", new)) if names)


def _load_streamed(directory: Path, classes: list[str], listing: dict, image_size: int, resize_to: int) -> Dataset:
    cache = stream_cache_dir(directory, image_size, resize_to)
    now = _stat_listing(directory, listing)
    listing_path = cache / "listing.tsv"
    complete = all((cache / f"{split}.npy").exists() for split in SPLITS)
    built = listing_path.read_text(encoding="utf-8") if listing_path.exists() else None
    if complete and built != now:
        raise DatasetError(f"{NAME}: the files in {directory} differ from those its decoded cache {cache} was built "
                           f"from ({_listing_difference(built or '', now)}); delete {cache} to decode them again")
    if not complete:
        if built != now:  # a cache of other files, or none: start over
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True, exist_ok=True)
            _check_disk(cache, listing, image_size)
            _write_durably(listing_path, now)
        digests = {}
        for split in SPLITS:
            digests.update(_build_split(directory, cache, split, listing[split], image_size, resize_to))
        if not check_manifest(directory, digests, what=NAME):
            record_manifest(directory, digests, what=NAME)
    manifest = directory / MANIFEST_NAME
    arrays = {}
    for split in SPLITS:
        images = np.load(cache / f"{split}.npy", mmap_mode="r")
        if images.shape != (len(listing[split]), image_size, image_size, 3) or images.dtype != np.uint8:
            raise DatasetError(f"{NAME}: {cache / f'{split}.npy'} holds {images.dtype} {images.shape}, not the decoded "
                               f"{split} images; delete {cache} to decode them again")
        arrays[split] = (images, np.array([label for _, label in listing[split]], dtype=np.int64))
    files = {MANIFEST_NAME: hashlib.sha256(manifest.read_bytes()).hexdigest()} if manifest.exists() else {}
    return _dataset(directory, classes, arrays, image_size, resize_to, files,
                    f"streamed from its decoded cache {cache}; SHA-256 of every image in {manifest}", streamed=True)


def _build_split(directory: Path, cache: Path, split: str, entries: list, image_size: int,
                 resize_to: int) -> dict[str, str]:
    """Decode `entries` into ``<cache>/<split>.npy``, resuming a partial build; returns
    every file's SHA-256. Each chunk's digests are appended to ``<split>.sha256`` only
    after its images are flushed, so the digest lines count the images safely written."""
    final, partial, digest_path = cache / f"{split}.npy", cache / f"{split}.npy.partial", cache / f"{split}.sha256"
    shape = (len(entries), image_size, image_size, 3)
    text = digest_path.read_text(encoding="utf-8") if digest_path.exists() else ""
    lines = text[:text.rfind("\n") + 1].splitlines()  # a line torn by a crash counts as not written
    if final.exists():
        return {name: digest for digest, _, name in (line.partition("  ") for line in lines)}
    images = None
    if partial.exists() and lines:
        try:
            images = np.lib.format.open_memmap(partial, mode="r+")
        except (OSError, ValueError):
            images = None
        if images is not None and images.shape != shape:
            images = None
    if images is None:  # nothing usable yet: begin this split
        lines = []
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
    _write_durably(digest_path, "".join(f"{line}\n" for line in lines))
    digests = {name: digest for digest, _, name in (line.partition("  ") for line in lines)}
    workers = min(8, schedulable_cores())
    # Pillow decodes and resizes without holding the GIL: threads use every core this process may run on.
    with ThreadPoolExecutor(workers) as pool:
        for start in range(len(lines), len(entries), STREAM_CHUNK):
            chunk = [relative for relative, _ in entries[start:start + STREAM_CHUNK]]
            decoded = list(pool.map(lambda relative: _read_and_decode(directory / relative, image_size, resize_to),
                                    chunk))
            for offset, (_, image) in enumerate(decoded):
                images[start + offset] = image
            images.flush()
            with open(digest_path, "a", encoding="utf-8") as file:
                file.write("".join(f"{digest}  {relative}\n" for relative, (digest, _) in zip(chunk, decoded)))
                file.flush()
                os.fsync(file.fileno())
            digests.update((relative, digest) for relative, (digest, _) in zip(chunk, decoded))
    del images
    os.replace(partial, final)
    fsync_path(cache)
    return digests


def _check_disk(cache: Path, listing: dict, image_size: int) -> None:
    needed = sum(len(listing[split]) for split in SPLITS) * image_size * image_size * 3
    free = shutil.disk_usage(cache).free
    if needed > free:
        raise DatasetError(f"{NAME}: streaming needs {_size(needed)} for the decoded arrays in {cache}, and its disk "
                           f"has {_size(free)} free: free space there, or use a subset or a smaller image_size")


def _write_durably(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(path.parent)


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


def _memory_problem(directory: Path, count: int, image_size: int, memory_limit: int | None) -> str | None:
    """Why `count` images at `image_size` cannot be held in memory, or None when they can."""
    needed = count * image_size * image_size * 3
    if memory_limit is None:
        from normbench.resources import host_memory_available  # imported here: resources imports this package

        available = host_memory_available()
        if available is None:
            return None
        memory_limit = int(available * HELD_MEMORY_FRACTION)
        what = f"{HELD_MEMORY_FRACTION:.0%} of the {_size(available)} of memory available"
    else:
        what = f"the limit of {_size(memory_limit)}"
    if needed <= memory_limit:
        return None
    return (f"{NAME}: {directory} holds {count} images: {_size(needed)} as uint8 arrays at {image_size}x{image_size}x3, "
            f"more than {what}. Stream it from disk (streaming=True, the default for a folder this large), use a "
            "subset of the folder (check_counts=False) or a smaller image_size")


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"
