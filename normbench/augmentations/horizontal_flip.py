"""Random horizontal flip: each image mirrored left to right with probability `probability`.

For an (N, H, W, C) batch the flips are ``rng.random(N) < probability``, one draw per
example; a flipped example's pixel (i, j) is the input's (i, W - 1 - j).  Flipping is
its own inverse: the same draws applied twice give the input back.
"""

from __future__ import annotations

import numpy as np

from normbench.options import Option

NAME = "horizontal_flip"
INPUT = "images"  # what it augments (a data set's `kind`)
DESCRIPTION = "mirror each image left to right with probability `probability` (0.5)"
OPTIONS = (Option("probability", "number", 0.5, "chance that an example is flipped", low=0.0, high=1.0),)


def apply(batch: np.ndarray, rng: np.random.Generator, *, probability: float = 0.5) -> np.ndarray:
    """A new (N, H, W, C) batch of the same dtype with the drawn examples mirrored."""
    if batch.ndim != 4:
        raise ValueError(f"{NAME}: expected images (N, H, W, C), got shape {batch.shape}")
    flips = rng.random(len(batch)) < probability
    return np.where(flips[:, None, None, None], batch[:, :, ::-1, :], batch)
