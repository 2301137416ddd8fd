"""JAX primitives. Activations are NHWC (the canonical layout) or (batch, features)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.scipy.linalg import solve_triangular

from normbench.backends import base

# XLA's default float32 precision on GPUs rounds matmul/conv inputs to TF32 (~1e-3
# relative); HIGHEST keeps full float32, as the PyTorch engine does by disabling TF32.
# On CPU it changes nothing.
_PRECISION = lax.Precision.HIGHEST


def _moments(x):
    # Two-pass: the variance is the mean of squared deviations from the mean, never
    # E[x^2] - E[x]^2 (which cancels catastrophically when |mean| >> std).
    mean = _channel_mean(x)
    centered = x - mean
    return mean, _channel_mean(centered * centered)


def _channel_mean(x):
    # Each example's spatial positions first, then the batch: XLA:CPU reduces a (batch,
    # height, width) block of a few channels far slower than the two steps. cnn3's
    # evaluation of 10,000 images (every pre-activation's moments, 2-core machine, medians
    # of 8 alternating in one process): 316 / 310 / 371 ms against 394 / 387 / 412 (none /
    # standardization loss / batch norm); training steps the same or up to 2% faster.
    if x.ndim == 4:
        return jnp.mean(jnp.mean(x, axis=(1, 2)), axis=0)
    return jnp.mean(x, axis=tuple(range(x.ndim - 1)))


def _conv(x, kernel, stride, pads, groups=1):
    return lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                    precision=_PRECISION)


# XLA's CPU backend differentiates a strided convolution with respect to its input as a
# convolution over the output gradient dilated with zeros (stride - 1 between values), and
# pays for the zeros: cnn3's 5x5 stride-2 convolution of 128 x 14 x 14 x 32, forward 2.0 ms,
# input gradient 5.9 ms (jax 0.10, the 2-core machine). The same gradient from the stride x
# stride phases of the input (each input position is reached by one sub-grid of kernel
# taps, so the gradient of all the phases at once is one stride-1 convolution of the
# undilated output gradient with the kernel rearranged, `_phase_input_gradient`) took
# 2.2 ms, and 1.1 ms against 5.5 ms for a 7x7 stride-2 kernel. The kernel is first grown to
# a multiple of the stride with zero taps; where that costs more than this many times the
# multiply-adds (3x3 stride 2: 16 / 9) it measured slower or faster depending on the shape
# (3 ms against 9 ms at 28 x 28 x 16 -> 32, but 3.4 against 2.3 at 14 x 14 x 32 -> 64),
# and 1x1 stride-2 shortcuts lost 2.4x, so those keep XLA's own gradient. Same sums in
# another order: float64 gradients agreed to 1e-15 relative, float32 to 6e-7.
PHASE_GRADIENT_MAX_COST = 1.5


def _phase_gradient_pays(kernel, stride, groups):
    kh, kw = kernel.shape[:2]
    grown = lambda k: -(-k // stride) * stride
    return stride > 1 and groups == 1 and grown(kh) * grown(kw) <= PHASE_GRADIENT_MAX_COST * kh * kw


def _phase_input_gradient(upstream, kernel, input_shape, stride, pads):
    """d conv(x, kernel, stride, pads) / dx applied to `upstream`, without dilation.

    With the kernel grown by zero taps to (KH, KW), multiples of s = `stride`, and the
    padded input cut into s x s blocks, output (i, j) reads blocks (i + a, j + b) for a <
    KH / s, b < KW / s with kernel taps (s a + p, s b + q) on the block's phase (p, q):
    a stride-1 convolution of the blocks (s * s * C channels) with the kernel regrouped
    the same way. Its input gradient is the stride-1 transposed convolution of `upstream`
    (the regrouped kernel flipped, its channel axes swapped, padded to full), which is put
    back from blocks to rows and columns, and cropped to the unpadded input (rows past
    the last window get no gradient: zeros)."""
    (top, _), (left, _) = pads
    n, height, width, channels = input_shape
    kh, kw, _, out = kernel.shape
    out_h, out_w = upstream.shape[1:3]
    grown_h, grown_w = -(-kh // stride) * stride, -(-kw // stride) * stride
    padded_h, padded_w = stride * (out_h - 1) + grown_h, stride * (out_w - 1) + grown_w
    blocks_h, blocks_w = grown_h // stride, grown_w // stride
    grown = jnp.pad(kernel, ((0, grown_h - kh), (0, grown_w - kw), (0, 0), (0, 0)))
    regrouped = (grown.reshape(blocks_h, stride, blocks_w, stride, channels, out).transpose(0, 2, 1, 3, 4, 5)
                 .reshape(blocks_h, blocks_w, stride * stride * channels, out))
    transposed = jnp.flip(regrouped, (0, 1)).transpose(0, 1, 3, 2)
    block_gradient = _conv(upstream, transposed, 1, ((blocks_h - 1, blocks_h - 1), (blocks_w - 1, blocks_w - 1)))
    padded = (block_gradient.reshape(n, padded_h // stride, padded_w // stride, stride, stride, channels)
              .transpose(0, 1, 3, 2, 4, 5).reshape(n, padded_h, padded_w, channels))
    padded = jnp.pad(padded, ((0, 0), (0, max(0, top + height - padded_h)), (0, max(0, left + width - padded_w)), (0, 0)))
    return padded[:, top:top + height, left:left + width, :]


# Under jax.vmap with a kernel per member (a vectorized group's step and evaluation), XLA
# batches a convolution into one grouped convolution over every member's channels, which
# its CPU backend runs far slower than the members' own convolutions: mnist-cnn's step of 4
# members took 184-215 ms against 10.7-13.0 ms for one run alone (none, batch norm,
# standardization loss; 2-core machine, side by side in one process). So on CPU every
# convolution goes through `_member_convolution`, whose forward and gradients each run
# one member at a time where a vmap batches two of their operands (`_one_member_at_a_time`):
# the same step took 59-64 ms, 15-16 ms per run; 10 members 138-157 ms. That is with the
# phase-split input gradient, which vectorized groups had declined while XLA grouped their
# convolutions (5-8% slower then) and which now pays there too (standardization loss, 4
# members: 50 ms against 60-63). Alone (no vmap) it is `_conv` and its gradients, the
# same operations as before.
def _one_member_at_a_time(f, paired_only=False):
    """f, which jax.vmap batches as one unbatched call per member, unrolled (as a lax.map
    loop, cnn3's vectorized step took twice as long as XLA's grouped convolutions). With
    `paired_only`, only where two or more arguments have a member axis: a convolution
    with one batched operand is one larger convolution to XLA (the members lengthen its
    batch axis, or its output channels where only the kernel has them), never a grouped
    one."""
    batched = custom_vmap(f)

    @batched.def_vmap
    def _rule(axis_size, in_batched, *args):
        if paired_only and sum(map(bool, in_batched)) < 2:
            out = jax.vmap(f, in_axes=tuple(0 if b else None for b in in_batched))(*args)
        else:
            outs = [f(*(a[member] if b else a for a, b in zip(args, in_batched))) for member in range(axis_size)]
            out = jax.tree_util.tree_map(lambda *members: jnp.stack(members), *outs)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return batched


@functools.lru_cache(maxsize=None)
def _member_convolution(stride, pads, groups, phase_gradient):
    """`_conv` of this static configuration (custom_vmap takes arrays only), differentiated
    by JAX, or with `_phase_input_gradient` as its input gradient where `phase_gradient`;
    under a vmap, its forward and its gradients each `_one_member_at_a_time`."""
    def forward(x, kernel):
        return _conv(x, kernel, stride, pads, groups)

    def gradients(x, kernel, upstream):
        if phase_gradient:
            _, kernel_vjp = jax.vjp(lambda k: forward(x, k), kernel)
            return _phase_input_gradient(upstream, kernel, x.shape, stride, pads), kernel_vjp(upstream)[0]
        return jax.vjp(forward, x, kernel)[1](upstream)

    looped_forward = _one_member_at_a_time(forward, paired_only=True)
    looped_gradients = _one_member_at_a_time(gradients, paired_only=True)

    @jax.custom_vjp
    def convolution(x, kernel):
        return looped_forward(x, kernel)

    convolution.defvjp(lambda x, kernel: (looped_forward(x, kernel), (x, kernel)),
                       lambda residuals, upstream: looped_gradients(*residuals, upstream))
    return convolution


# log det(V^T V + shift I) from a QR factorization of [V; sqrt(shift) I] (base.Ops.log_det_gram).
# Under jax.vmap (a vectorized group's step) jnp.linalg.qr and its gradient become batched
# LAPACK calls, and XLA's CPU runtime (jax 0.10.2) never returned from cnn3's step with two
# or more of them: every thread idle, the result never ready; one batched factorization, or
# several unbatched, ran. So the factorization and the gradient's triangular solve each go
# through `_one_member_at_a_time`, which a vmap turns into a loop over the members, and the
# gradient is written out: d/dV = 2 Q_V R^-T, with Q_V the rows of Q that multiply V (what
# JAX's own QR gradient computes for this cotangent; they agreed to 2e-7).
@_one_member_at_a_time
def _reduced_qr(matrix):
    return jnp.linalg.qr(matrix, mode="reduced")


@_one_member_at_a_time
def _times_inverse_transpose(q, r):
    """q r^-T, from r q^T's triangular solve."""
    return solve_triangular(r, q.T, lower=False).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_det_gram(values, shift):
    return _log_det_gram_forward(values, shift)[0]


def _log_det_gram_forward(values, shift):
    k = values.shape[-1]
    q, r = _reduced_qr(jnp.concatenate([values, shift ** 0.5 * jnp.eye(k, dtype=values.dtype)]))
    return 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(r)))), (q[: values.shape[0]], r)


def _log_det_gram_backward(shift, residuals, upstream):
    q_values, r = residuals
    return (2.0 * upstream * _times_inverse_transpose(q_values, r),)


_log_det_gram.defvjp(_log_det_gram_forward, _log_det_gram_backward)


class Ops(base.Ops):
    def __init__(self, platform: str = "cpu"):
        # The phase-split input gradient answers XLA's CPU convolutions; GPUs keep their
        # own strided gradients (cuDNN's), unmeasured against it.
        self.phase_gradients = platform == "cpu"
        self.platform = platform

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
        pads = tuple(tuple(int(p) for p in pair) for pair in pads)  # hashable: a static argument
        if self.platform != "cpu":
            return _conv(x, kernel, stride, pads, groups)
        phase_gradient = self.phase_gradients and _phase_gradient_pays(kernel, stride, groups)
        return _member_convolution(stride, pads, groups, phase_gradient)(x, kernel)

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
        return jnp.matmul(self.matrix_transpose(a) if transpose_a else a, self.matrix_transpose(b) if transpose_b else b,
                          precision=_PRECISION)

    def matrix_transpose(self, matrix):
        return jnp.swapaxes(matrix, -1, -2)

    def add_to_diagonal(self, matrix, value):
        return matrix + value * jnp.eye(matrix.shape[-1], dtype=matrix.dtype)

    def log_det_gram(self, values, diagonal_shift=0.0):
        log_det = functools.partial(_log_det_gram, shift=float(diagonal_shift))
        for _ in range(values.ndim - 2):  # leading axes: one factorization per matrix
            log_det = jax.vmap(log_det)
        return log_det(values)
