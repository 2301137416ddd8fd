"""JAX primitives. Activations are NHWC (the canonical layout) or (batch, features)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from normbench.backends import base

# XLA's default float32 precision on GPUs rounds matmul/conv inputs to TF32 (~1e-3
# relative); HIGHEST keeps full float32, as the PyTorch engine does by disabling TF32.
# On CPU it changes nothing.
_PRECISION = lax.Precision.HIGHEST


def _moments(x):
    # Two-pass: the variance is the mean of squared deviations from the mean, never
    # E[x^2] - E[x]^2 (which cancels catastrophically when |mean| >> std).
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    centered = x - mean
    return mean, jnp.mean(centered * centered, axis=axes)


class Ops(base.Ops):
    def ndim(self, x):
        return x.ndim

    def shape(self, x):
        return tuple(int(d) for d in x.shape)

    def reshape(self, x, shape):
        return jnp.reshape(x, shape)

    def mean(self, x, axes, keepdims=False):
        return jnp.mean(x, axis=tuple(axes), keepdims=keepdims)

    def moments(self, x, axes, keepdims=False):
        axes = tuple(axes)
        mean = jnp.mean(x, axis=axes, keepdims=True)
        centered = x - mean
        var = jnp.mean(centered * centered, axis=axes, keepdims=keepdims)
        return (mean if keepdims else jnp.squeeze(mean, axis=axes)), var

    def rsqrt(self, x):
        return lax.rsqrt(x)

    def conv2d(self, x, kernel, stride, pads, groups=1):
        return lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=tuple(pads),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                        precision=_PRECISION)

    def max_pool2d(self, x, window, stride, pads):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, stride, stride, 1),
                                 ((0, 0), *pads, (0, 0)))

    def avg_pool2d(self, x, window, stride, pads):
        sums = lax.reduce_window(x, 0.0, lax.add, (1, *window, 1), (1, stride, stride, 1),
                                 ((0, 0), *pads, (0, 0)))
        counts = base.valid_counts(tuple(x.shape[1:3]), window, stride, pads)
        return sums / jnp.asarray(counts[None, :, :, None], x.dtype)

    def max(self, x, axes, keepdims=False):
        return jnp.max(x, axis=tuple(axes), keepdims=keepdims)

    def concat_channels(self, xs):
        return jnp.concatenate(xs, axis=-1)

    def relu6(self, x):
        return jax.nn.relu6(x)

    def dense(self, x, kernel):
        return jnp.matmul(x, kernel, precision=_PRECISION)

    def flatten(self, x):
        return x.reshape(x.shape[0], -1)  # NHWC already flattens in canonical (h, w, c) order

    def add_channel_bias(self, x, bias):
        return x + bias

    def scale_channels(self, x, scale):
        return x * scale

    def normalize(self, x, mean, var, epsilon):
        return (x - mean) * lax.rsqrt(var + epsilon)

    def batch_norm_train(self, x, scale, shift, epsilon):
        # Written out (no framework batch-norm layer), so autodiff differentiates
        # exactly the contract's formula through both batch moments.
        mean, var = _moments(x)
        y = (x - mean) * lax.rsqrt(var + epsilon)
        if scale is not None:
            y = y * scale
        if shift is not None:
            y = y + shift
        return y, lax.stop_gradient(mean), lax.stop_gradient(var)

    def channel_moments(self, x):
        return _moments(x)

    def reduced_count(self, x):
        return x.size // x.shape[-1]

    def relu(self, x):
        # jax.nn.relu, not jnp.maximum(x, 0): the latter's gradient at exactly 0 is 0.5,
        # PyTorch's and TensorFlow's is 0, and MNIST's blank pixels give exact zeros.
        return jax.nn.relu(x)

    def log(self, x):
        return jnp.log(x)

    def sqrt(self, x):
        return jnp.sqrt(x)

    def sum(self, x):
        return jnp.sum(x)

    def zeros_like(self, x):
        return jnp.zeros_like(x)

    def stop_gradient(self, x):
        return lax.stop_gradient(x)

    def softmax_cross_entropy(self, logits, labels):
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

    def correct_count(self, logits, labels):
        return jnp.sum(jnp.argmax(logits, axis=-1) == labels)

    def clip(self, x, low, high):
        return jnp.minimum(jnp.maximum(x, low), high)

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return jnp.matmul(jnp.swapaxes(a, -1, -2) if transpose_a else a, jnp.swapaxes(b, -1, -2) if transpose_b else b,
                          precision=_PRECISION)

    def log_det_spd(self, matrix, diagonal_shift=0.0):
        if diagonal_shift:
            matrix = matrix + diagonal_shift * jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
        factor = jnp.linalg.cholesky(matrix)
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(factor, axis1=-2, axis2=-1)), axis=-1)
