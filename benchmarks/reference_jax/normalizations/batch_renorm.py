"""Batch renormalization (Ioffe 2017): batch norm corrected towards the running statistics
by r and d, clipped to limits that relax linearly over a warm-up (the `step` state counts
the steps taken)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def normalize(z, params, state, method):
    axes = tuple(range(z.ndim - 1))
    mean = jnp.mean(z, axes)
    var = jnp.mean(jnp.square(z - mean), axes)
    batch_std = jnp.sqrt(var + method.epsilon)
    running_inverse_std = lax.rsqrt(state["running_var"] + method.epsilon)  # the statistics before this step
    if method.warmup_steps:
        progress = jnp.clip((state["step"] - method.warmup_start) / method.warmup_steps, 0.0, 1.0)
    else:  # full limits from step warmup_start on
        progress = jnp.clip(state["step"] - method.warmup_start + 1.0, 0.0, 1.0)
    r_max = 1.0 + (method.r_max - 1.0) * progress
    d_max = method.d_max * progress
    r = lax.stop_gradient(jnp.clip(batch_std * running_inverse_std, 1.0 / r_max, r_max))
    d = lax.stop_gradient(jnp.clip((mean - state["running_mean"]) * running_inverse_std, -d_max, d_max))
    y = ((z - mean) / batch_std * r + d) * params["scale"] + params["shift"]
    decay = method.running_decay
    return y, {"running_mean": state["running_mean"] * decay + lax.stop_gradient(mean) * (1.0 - decay),
               "running_var": state["running_var"] * decay + lax.stop_gradient(var) * (1.0 - decay),
               "step": state["step"] + 1.0}
