"""Weight normalization: each output channel's kernel is gain * v / ||v||; the layer keeps its bias."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def kernel(kernel, params, method):
    axes = tuple(range(kernel.ndim - 1))  # HWIO or (in, out): every axis but the output channel
    return kernel * (params["gain"] * lax.rsqrt(jnp.sum(jnp.square(kernel), axes)))


def normalize(z, params, state, method):
    return z, state
