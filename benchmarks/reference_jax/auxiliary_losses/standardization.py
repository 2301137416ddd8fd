"""The standardization loss (the paper's equation 2): per layer, 0.5 * sum over channels of
mean^2 + var - log(var + log_epsilon) - 1, averaged over sub-batches with `replica_batch_size`."""

from __future__ import annotations

import jax.numpy as jnp


def value(taps, loss):
    total = 0.0
    for z in taps:
        if loss.replica_batch_size is None:
            batch, axes, replicas = z, tuple(range(z.ndim - 1)), 1
        else:  # (sub-batches, examples, ..., C): moments per sub-batch
            batch = z.reshape(-1, loss.replica_batch_size, *z.shape[1:])
            axes, replicas = tuple(range(1, batch.ndim - 1)), batch.shape[0]
        mean, var = jnp.mean(batch, axes), jnp.var(batch, axes)
        total = total + 0.5 * jnp.sum(jnp.square(mean) + var - jnp.log(var + loss.log_epsilon) - 1.0) / replicas
    return total
