"""Random jitter of point clouds: independent Gaussian noise on every coordinate, clipped, as PointNet does.

PointNet (Qi et al. 2017, ``provider.jitter_point_cloud``) adds
``clip(sigma * N(0, 1), -clip, clip)`` to every coordinate of every point, with
sigma = 0.01 and clip = 0.05, the defaults here.  The noise is
``rng.standard_normal(batch.shape)`` (in C order), scaled and clipped in float64 and
added, then rounded once to the batch's dtype.  Batches are (N, P, 1, 3) or (N, P, 3)
float; every coordinate moves by at most `clip` (plus the dtype's rounding).
"""

from __future__ import annotations

import numpy as np

from normbench.options import Option

NAME = "point_cloud_jitter"
INPUT = "point_clouds"  # what it augments (a data set's `kind`)
DESCRIPTION = "add Gaussian noise N(0, sigma = 0.01), clipped at 0.05, to every coordinate (PointNet's values)"
OPTIONS = (
    Option("sigma", "number", 0.01, "standard deviation of the noise (0.01: PointNet)", low=0.0),
    Option("clip", "number", 0.05, "largest change of a coordinate (0.05: PointNet)", low=0.0),
)


def apply(batch: np.ndarray, rng: np.random.Generator, *, sigma: float = 0.01, clip: float = 0.05) -> np.ndarray:
    """A new batch of the same shape and dtype with every coordinate jittered."""
    if batch.ndim not in (3, 4) or batch.shape[-1] != 3 or (batch.ndim == 4 and batch.shape[2] != 1):
        raise ValueError(f"{NAME}: expected point clouds (N, P, 1, 3) or (N, P, 3), got shape {batch.shape}")
    if batch.dtype.kind != "f":
        raise ValueError(f"{NAME}: expected float coordinates, got {batch.dtype}")
    noise = np.clip(sigma * rng.standard_normal(batch.shape), -clip, clip)
    return (batch.astype(np.float64) + noise).astype(batch.dtype)
