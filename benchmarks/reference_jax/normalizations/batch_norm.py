"""Batch normalization in jax.numpy (JAX itself has no batch-norm function; a JAX user
writes these lines or takes a library's): per-channel batch moments, or each sub-batch's
with `replica_batch_size`, and TensorFlow-style running averages."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def normalize(z, params, state, method):
    channels = z.shape[-1]
    if method.replica_batch_size is None:
        batch, axes = z, tuple(range(z.ndim - 1))
    else:  # (sub-batches, examples, ..., C): each sub-batch normalized with its own moments
        batch = z.reshape(-1, method.replica_batch_size, *z.shape[1:])
        axes = tuple(range(1, batch.ndim - 1))
    mean = jnp.mean(batch, axes, keepdims=True)
    var = jnp.mean(jnp.square(batch - mean), axes, keepdims=True)
    y = ((batch - mean) * lax.rsqrt(var + method.epsilon)).reshape(z.shape)
    if "scale" in params:
        y = y * params["scale"]
    if "shift" in params:
        y = y + params["shift"]
    # The running statistics follow the mean of the sub-batches' moments.
    batch_mean = lax.stop_gradient(jnp.mean(mean.reshape(-1, channels), 0))
    batch_var = lax.stop_gradient(jnp.mean(var.reshape(-1, channels), 0))
    if method.running_variance == "unbiased":  # state only: the loss never sees it
        count = z.size // mean.size  # values behind each sub-batch's moment
        batch_var = batch_var * (count / max(count - 1, 1))
    decay = method.running_decay
    return y, {"running_mean": state["running_mean"] * decay + batch_mean * (1.0 - decay),
               "running_var": state["running_var"] * decay + batch_var * (1.0 - decay)}
