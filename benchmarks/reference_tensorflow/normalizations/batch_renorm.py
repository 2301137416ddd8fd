"""Batch renormalization (Ioffe 2017): batch norm whose output is corrected by the clipped,
non-differentiated r = sigma_B / sigma and d = (mu_B - mu) / sigma towards the running
statistics, with limits relaxed from r_max 1, d_max 0 over the warm-up. The step count is
state, so the one traced step sees it."""

import tensorflow as tf


def normalize(z, params, state, method):
    mean, variance = tf.nn.moments(z, axes=list(range(z.shape.rank - 1)))
    step = state["step"]
    if method.warmup_steps:
        progress = tf.clip_by_value((step - float(method.warmup_start)) / float(method.warmup_steps), 0.0, 1.0)
    else:
        progress = tf.clip_by_value(step - float(method.warmup_start) + 1.0, 0.0, 1.0)
    r_max, d_max = 1.0 + (method.r_max - 1.0) * progress, method.d_max * progress
    running_inverse_std = tf.math.rsqrt(state["running_var"] + method.epsilon)
    r = tf.stop_gradient(tf.clip_by_value(tf.sqrt(variance + method.epsilon) * running_inverse_std, 1.0 / r_max, r_max))
    d = tf.stop_gradient(tf.clip_by_value((mean - state["running_mean"]) * running_inverse_std, -d_max, d_max))
    # ((z - mu_B) / sigma_B * r + d) * scale + shift: batch normalization with scale r * scale, offset d * scale + shift.
    scale = params["scale"]
    y = tf.nn.batch_normalization(z, mean, variance, d * scale + params["shift"], r * scale, method.epsilon)
    decay = method.running_decay
    mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
    return y, {"running_mean": decay * state["running_mean"] + (1.0 - decay) * mean,
               "running_var": decay * state["running_var"] + (1.0 - decay) * variance,
               "step": step + 1.0}
