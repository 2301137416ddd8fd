"""Reader and writer for the IDX file format, in which MNIST is distributed.

An IDX file is a 4-byte magic number -- two zero bytes, an element type code and the
number of dimensions -- then one big-endian uint32 per dimension, then the elements in
C order, big-endian.  A gzip-compressed IDX file (as served by the original MNIST site)
is read transparently: it is recognised by its content, not by its name.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .base import Dataset, DatasetError, DatasetInfo, Source, ensure_files, obtained, one_line

__all__ = ["IdxFormatError", "load_idx_dataset", "read_idx", "read_split", "write_idx"]

_DTYPE_BY_CODE = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_BY_KIND_AND_SIZE = {(dtype.kind, dtype.itemsize): code for code, dtype in _DTYPE_BY_CODE.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIM = 0xFFFFFFFF


class IdxFormatError(DatasetError):
    """An IDX file is malformed; the message names the file and what is wrong."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a native-endian, writable array.

    Raises IdxFormatError for a truncated file, a bad magic number, an unknown element
    type, or a data size that does not match the dimensions in the header.
    """
    path = Path(path)
    return _parse(_read_contents(path), path)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzip-compressed if `path` ends in ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64.  The write is not
    atomic; it exists for tests and for converting data, not for the cache.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _CODE_BY_KIND_AND_SIZE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(f"IDX cannot store dtype {array.dtype}; supported: uint8, int8, int16, int32, float32, float64")
    if array.ndim > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {array.ndim}")
    if any(dim > _MAX_DIM for dim in array.shape):
        raise ValueError(f"IDX dimensions must fit in 32 bits, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(header)
        file.write(body)


def _read_contents(path: Path) -> bytearray:
    # A bytearray rather than bytes, so that np.frombuffer gives writable arrays without a copy.
    with open(path, "rb") as file:
        if file.read(2) != _GZIP_MAGIC:
            contents = bytearray(os.fstat(file.fileno()).st_size)
            file.seek(0)
            size = file.readinto(contents)
            return contents[:size] if size < len(contents) else contents
        file.seek(0)
        try:
            with gzip.GzipFile(fileobj=file) as unzipped:
                return bytearray(unzipped.read())
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise IdxFormatError(f"{path}: corrupt or truncated gzip data ({error})") from error


def _parse(contents: bytearray, path: Path) -> np.ndarray:
    if len(contents) < 4:
        raise IdxFormatError(f"{path}: truncated: {len(contents)} bytes, shorter than the 4-byte IDX magic number")
    if contents[0] != 0 or contents[1] != 0:
        raise IdxFormatError(
            f"{path}: bad magic number 0x{bytes(contents[:4]).hex()}: an IDX file starts with two zero bytes"
        )
    code, ndim = contents[2], contents[3]
    dtype = _DTYPE_BY_CODE.get(code)
    if dtype is None:
        known = ", ".join(f"0x{known_code:02X}" for known_code in _DTYPE_BY_CODE)
        raise IdxFormatError(f"{path}: bad magic number: unknown element type code 0x{code:02X} (known: {known})")

    header_size = 4 + 4 * ndim
    if len(contents) < header_size:
        raise IdxFormatError(
            f"{path}: truncated header: {ndim} dimensions need {header_size} header bytes, the file has {len(contents)}"
        )
    shape = struct.unpack(f">{ndim}I", contents[4:header_size])
    count = math.prod(shape)
    expected_bytes = count * dtype.itemsize
    actual_bytes = len(contents) - header_size
    if actual_bytes < expected_bytes:
        raise IdxFormatError(
            f"{path}: truncated: shape {shape} of {dtype.name} needs {expected_bytes} data bytes, found {actual_bytes}"
        )
    if actual_bytes > expected_bytes:
        raise IdxFormatError(
            f"{path}: size mismatch: shape {shape} of {dtype.name} needs {expected_bytes} data bytes, "
            f"found {actual_bytes} ({actual_bytes - expected_bytes} extra)"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype.newbyteorder("="))
    array = np.frombuffer(contents, dtype=dtype, count=count, offset=header_size).reshape(shape)
    # Byte-swap multi-byte types once here, so callers never see big-endian arrays.
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_split(directory: Path, examples_name: str, labels_name: str, *, info: DatasetInfo,
               dtype: np.dtype | type = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of a data set stored as IDX files: (examples, int64 labels).

    The examples must be `dtype` of shape (N, *info.image_shape); examples stored without
    a trailing channel axis of size 1 (MNIST's (N, 28, 28)) are returned with it.  The
    labels must be uint8 (N,) in range(info.num_classes).  Raises DatasetError naming
    the file otherwise.
    """
    examples = read_idx(directory / examples_name)
    labels = read_idx(directory / labels_name)
    shape = tuple(info.image_shape)
    stored_shapes = [shape] + ([shape[:-1]] if shape[-1] == 1 else [])
    if examples.dtype != np.dtype(dtype) or examples.shape[1:] not in stored_shapes:
        raise DatasetError(f"{directory / examples_name}: expected {np.dtype(dtype).name} examples "
                           f"(N, {', '.join(map(str, stored_shapes[-1]))}), got {examples.dtype} {examples.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{directory / labels_name}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if len(examples) != len(labels):
        raise DatasetError(f"{directory}: {examples_name} has {len(examples)} examples but {labels_name} {len(labels)} labels")
    if labels.size and labels.max() >= info.num_classes:
        raise DatasetError(f"{directory / labels_name}: label {labels.max()} outside 0..{info.num_classes - 1}")
    if examples.shape[1:] != shape:
        examples = examples[..., np.newaxis]
    return examples, labels.astype(np.int64)


def load_idx_dataset(
    info: DatasetInfo,
    directory: Path,
    expected: Mapping[str, str],
    splits: Sequence[tuple[str, str]],
    *,
    sources: Sequence[Source],
    fetch: bool,
    how_to_fix: str,
    origin: str | None,
    describe: str,
    made: str = "fetched now via {}",
    dtype: np.dtype | type = np.uint8,
    fold_errors: bool = False,
) -> Dataset:
    """What every data set cached as IDX files does: verify the files, read them, build the Dataset.

    `expected` pins each file's SHA-256 and `sources` restore a missing or bad one (see
    base.ensure_files; `origin` names where the data root came from).  `splits` is
    ((train examples, train labels), (test examples, test labels)), read by read_split.
    `Dataset.source` is `describe`, then how the files were obtained (`made` formatted
    with the sources used, or "already cached").  With `fold_errors`, a DatasetError is
    raised as one line.
    """
    try:
        digests, used_sources = ensure_files(directory, expected, sources=sources, fetch=fetch, how_to_fix=how_to_fix,
                                             origin=origin)
        (train_examples, train_labels), (test_examples, test_labels) = (
            read_split(directory, examples_name, labels_name, info=info, dtype=dtype) for examples_name, labels_name in splits)
    except DatasetError as error:
        if fold_errors and "\n" in str(error):
            raise type(error)(one_line(error)) from None
        raise
    return Dataset(
        name=info.name,
        train_images=train_examples,
        train_labels=train_labels,
        test_images=test_examples,
        test_labels=test_labels,
        num_classes=info.num_classes,
        source=f"{describe}; {obtained(used_sources, made)}",
        files=digests,
    )
