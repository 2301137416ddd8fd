"""Group normalization: each example's channels in `groups` groups of consecutive
channels, each normalized over its positions and channels, then a per-channel scale and shift."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def normalize(z, params, state, method):
    grouped = z.reshape(*z.shape[:-1], method.groups, z.shape[-1] // method.groups)
    axes = (*range(1, z.ndim - 1), z.ndim)  # the positions (none after a dense layer) and the group's channels
    mean = jnp.mean(grouped, axes, keepdims=True)
    var = jnp.var(grouped, axes, keepdims=True)
    y = ((grouped - mean) * lax.rsqrt(var + method.epsilon)).reshape(z.shape)
    return y * params["scale"] + params["shift"], state
