"""Random crop after zero padding: each image padded by `padding` pixels of zeros on every
side, then cropped back to its size at an offset drawn per example.

For an (N, H, W, C) batch, example n's offsets (dy, dx) are drawn together as
``rng.integers(0, 2 * padding + 1, size=(N, 2))``; its output pixel (i, j) is the padded
image's (dy + i, dx + j), i.e. the input's (i + dy - padding, j + dx - padding), zero
outside it.  Offset (padding, padding) returns the image unchanged, and so does
padding = 0.  The CIFAR recipe (He et al. 2016, Section 4.2) uses padding 4 on 32x32
images.
"""

from __future__ import annotations

import numpy as np

from normbench.options import Option

NAME = "random_crop"
INPUT = "images"  # what it augments (a data set's `kind`)
DESCRIPTION = "pad each image with zeros by `padding` pixels, crop back to its size at a random offset per example"
OPTIONS = (Option("padding", "integer", 4, "zero pixels added on each side before cropping (4: the CIFAR recipe)", low=0),)


def apply(batch: np.ndarray, rng: np.random.Generator, *, padding: int = 4) -> np.ndarray:
    """A new (N, H, W, C) batch of the same dtype, each example cropped at its own offset."""
    if batch.ndim != 4:
        raise ValueError(f"{NAME}: expected images (N, H, W, C), got shape {batch.shape}")
    count, height, width, _ = batch.shape
    offsets = rng.integers(0, 2 * padding + 1, size=(count, 2))
    padded = np.pad(batch, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, :1] + np.arange(height)  # (N, H)
    columns = offsets[:, 1:] + np.arange(width)  # (N, W)
    return padded[np.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]]
