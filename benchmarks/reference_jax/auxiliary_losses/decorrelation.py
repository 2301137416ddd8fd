"""The decorrelation loss: per layer, KL(N(mean, S) || N(0, I)) with S the channels' full
biased covariance, 0.5 * (tr S + mean^T mean - k - log det(S + epsilon I))."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def value(taps, loss):
    total = 0.0
    for z in taps:
        values = z.reshape(-1, z.shape[-1])  # (examples x positions, channels)
        count, channels = values.shape
        mean = jnp.mean(values, 0)
        centered = values - mean
        covariance = jnp.dot(centered.T, centered, precision=lax.Precision.HIGHEST) / count
        # S + epsilon I is symmetric positive definite: log det from its Cholesky factor.
        factor = jnp.linalg.cholesky(covariance + loss.epsilon * jnp.eye(channels, dtype=covariance.dtype))
        log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(factor)))
        total = total + 0.5 * (jnp.trace(covariance) + jnp.sum(jnp.square(mean)) - channels - log_det)
    return total
