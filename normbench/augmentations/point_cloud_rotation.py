"""Random rotation of point clouds about one axis, as PointNet augments ModelNet40.

PointNet (Qi et al. 2017, ``provider.rotate_point_cloud``) rotates each cloud by an angle
drawn uniformly from [0, 2 pi) about the up axis, which in its HDF5 files is y (the
second coordinate): with c = cos(angle), s = sin(angle),

    x' = c x - s z,    y' = y,    z' = s x + c z

(its ``points @ [[c, 0, s], [0, 1, 0], [-s, 0, c]]``).  `axis` = "y" is that and the
default.  "z" rotates in the x-y plane instead (x' = c x - s y, y' = s x + c y), which
keeps the MNIST point clouds' z = 0; "x" rotates y and z (y' = c y - s z, z' = s y + c z).

The angles are ``rng.uniform(0, 2 pi, N)``, one per example.  Batches are (N, P, 1, 3),
as the point-cloud data sets store them, or (N, P, 3); the result has the input's shape
and dtype (computed in float64, then rounded once).  Distances from the origin and the
coordinate along `axis` are preserved.
"""

from __future__ import annotations

import numpy as np

from normbench.options import Option

NAME = "point_cloud_rotation"
INPUT = "point_clouds"  # what it augments (a data set's `kind`)
DESCRIPTION = "rotate each point cloud by a uniform random angle about the up axis (y, as PointNet)"
OPTIONS = (Option("axis", "string", "y", "the rotation axis: y, PointNet's up axis in ModelNet40; z keeps a planar "
                  "cloud (MNIST point clouds) in its plane", choices=("x", "y", "z")),)

# The two coordinates that rotate, (first, second): first' = c first - s second, second' = s first + c second.
_PLANES = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}


def apply(batch: np.ndarray, rng: np.random.Generator, *, axis: str = "y") -> np.ndarray:
    """A new batch of the same shape and dtype, each cloud rotated by its own angle."""
    if batch.ndim not in (3, 4) or batch.shape[-1] != 3 or (batch.ndim == 4 and batch.shape[2] != 1):
        raise ValueError(f"{NAME}: expected point clouds (N, P, 1, 3) or (N, P, 3), got shape {batch.shape}")
    if batch.dtype.kind != "f":
        raise ValueError(f"{NAME}: expected float coordinates, got {batch.dtype}")
    angles = rng.uniform(0.0, 2.0 * np.pi, len(batch))
    shape = (len(batch),) + (1,) * (batch.ndim - 2)
    cos, sin = np.cos(angles).reshape(shape), np.sin(angles).reshape(shape)
    first, second = _PLANES[axis]
    points = batch.astype(np.float64)
    rotated = points.copy()
    rotated[..., first] = cos * points[..., first] - sin * points[..., second]
    rotated[..., second] = sin * points[..., first] + cos * points[..., second]
    return rotated.astype(batch.dtype)
