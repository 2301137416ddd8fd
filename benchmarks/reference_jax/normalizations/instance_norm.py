"""Instance normalization: each example's channels over their spatial positions, then a per-channel scale and shift."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def normalize(z, params, state, method):
    mean = jnp.mean(z, (1, 2), keepdims=True)  # NHWC: over H and W
    var = jnp.var(z, (1, 2), keepdims=True)
    return (z - mean) * lax.rsqrt(var + method.epsilon) * params["scale"] + params["shift"], state
