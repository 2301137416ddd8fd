"""TensorFlow primitives. Activations are NHWC (TensorFlow's native and the canonical
layout) or (batch, features); the channel axis is always the last one."""

from __future__ import annotations

import tensorflow as tf

from normbench.architectures.layers import conv_padding
from normbench.backends import base


@tf.custom_gradient
def _channel_moments(x):
    """Per-channel (mean, biased variance), two-pass, with the gradient written out.

    The values are the two reductions the composed formula takes. The gradient is one
    expression instead of the graph autograd builds through two reductions and a squared
    difference: d mean / dx = 1 / n and d var / dx = 2 (c - mean(c)) / n, with c = x - mean
    the centred input the forward made, so dx = g_mean / n + (2 g_var / n) (c - mean(c)).
    mean(c) is 0 but for rounding, and it is the centring mean's own term
    (`Ops.channel_moments` says why it stays)."""
    mean = _channel_mean(x)
    centred = x - mean
    var = _channel_mean(tf.square(centred))
    count = tf.cast(x.shape[:-1].num_elements(), x.dtype)

    def gradient(grad_mean, grad_var):
        grad_mean = tf.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = tf.zeros_like(var) if grad_var is None else grad_var
        spread = 2.0 * grad_var / count
        return (grad_mean / count - spread * _channel_mean(centred)) + centred * spread

    return (mean, var), gradient


def _channel_mean(x):
    """Per-channel mean over every axis but the last, keeping float32 accurate.

    One TensorFlow reduction over (batch, height, width) of cnn3's first layer (25,088
    values a channel) is off by ~1e-6 relative in float32, ten times PyTorch's error, and
    batch-norm gradients amplify an error in the variance: float32 gradients of cnn3 with
    batch norm were off by up to 1e-2 relative (1e-6 with this). Reducing each example's
    spatial positions first, then the batch, is as accurate as PyTorch and measured no slower.
    """
    if x.shape.rank > 2:
        x = tf.reduce_mean(x, axis=list(range(1, x.shape.rank - 1)))
    return tf.reduce_mean(x, axis=0)


def _mean(x, axes, keepdims):
    """Mean over `axes` in two reductions (the later axes first, then the first one): as
    accurate in float32 as PyTorch's reductions, for the reason `_channel_mean` gives."""
    axes = sorted(axes)
    if len(axes) < 2:
        return tf.reduce_mean(x, axis=axes, keepdims=keepdims)
    out = tf.reduce_mean(tf.reduce_mean(x, axis=axes[1:], keepdims=True), axis=axes[:1], keepdims=True)
    return out if keepdims else tf.squeeze(out, axis=axes)


def _channel_sum(x):
    """Per-channel sum over every axis but the last, in the same two stages as `_channel_mean`."""
    if x.shape.rank > 2:
        x = tf.reduce_sum(x, axis=list(range(1, x.shape.rank - 1)))
    return tf.reduce_sum(x, axis=0)


# A per-channel vector broadcast against an activation, its gradient summed by
# `_channel_sum`. TensorFlow's own gradient of a broadcasting add or multiply (and
# BiasAddGrad) sums over (batch, height, width) in one reduction, with the float32 error
# `_channel_mean` describes. On cnn3 at batch 32 that left batch-norm shift gradients
# 1.3e-6 off float64 and biases under the standardization loss 1.5e-5 (3-100x PyTorch's
# and JAX's errors); the batch-norm mean's gradient, one such sum, spread its error over
# the whole input gradient and so into the kernel gradient of the layer (1.1e-6 instead
# of 3e-7). SGD at lr 1e-3 hardly notices. RMSProp does: its step is up to
# lr / sqrt(epsilon) times the gradient (1x at lr 1e-3, epsilon 1e-6, not SGD's 1e-3x),
# and the larger parameter errors flipped a ReLU at step 3 and moved the loss by 3.6e-2
# by step 44 (cnn3, batch_norm_shift, batch 32; tests/test_parity_optimizers.py).
# The forward values are unchanged. Only the training path uses them: inference-mode
# scale and normalize are never differentiated.

@tf.custom_gradient
def _add_channels(x, vector):
    def gradient(upstream):
        return upstream, _channel_sum(upstream)
    return x + vector, gradient


@tf.custom_gradient
def _multiply_channels(x, vector):
    def gradient(upstream):
        return upstream * vector, _channel_sum(upstream * x)
    return x * vector, gradient


# TensorFlow's CPU kernel gradient of a convolution over one input channel (MNIST's first
# layer) is slow the way oneDNN's is in PyTorch (backends/torch/ops.py,
# ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS, which has the measurements and the threshold):
# cnn3's 5 x 5 stride-2 first layer at batch 128, Conv2DBackpropFilter 2.5 ms, the same
# gradient as a convolution of the padded input with the output gradient as the kernel
# (batch and channel axes swapped, dilated by the stride) 1.7 ms; cnn3's training steps
# 9% faster (none, batch norm, standardization loss; side by side in one process). That
# was against Eigen's kernels (TF_ENABLE_ONEDNN_OPTS: the package's __init__); against
# oneDNN's it loses: cnn3 steps, none 9.07 ms with it, 7.53 without, standardization loss
# 10.78 / 9.48 (side by side in one process). So `Ops` takes it with Eigen's only.
ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS = 25


def _one_channel_convolution(x, kernel, stride, pads, padding):
    """tf.nn.conv2d of a one-channel input (`padding`: the named or explicit form of
    `pads`) whose kernel gradient is that convolution; the same sums in another order."""

    @tf.custom_gradient
    def convolve(x, kernel):
        def gradient(upstream):
            (top, bottom), (left, right) = pads
            grad_x = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=kernel, out_backprop=upstream, strides=[1, stride, stride, 1],
                padding="EXPLICIT", explicit_paddings=[0, 0, top, bottom, left, right, 0, 0])
            # Exactly the rows and columns a window reads: padded, or cropped where the
            # padding leaves some unread.
            (height, width), (kernel_h, kernel_w), (out_h, out_w) = x.shape[1:3], kernel.shape[:2], upstream.shape[1:3]
            span_h, span_w = kernel_h + stride * (out_h - 1), kernel_w + stride * (out_w - 1)
            read = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])[:, :span_h, :span_w, :]
            grad_kernel = tf.nn.conv2d(tf.transpose(read, [3, 1, 2, 0]), tf.transpose(upstream, [1, 2, 0, 3]),
                                       strides=1, padding="VALID", dilations=stride)  # (1, kh, kw, out)
            return grad_x, tf.transpose(grad_kernel, [1, 2, 0, 3])

        return tf.nn.conv2d(x, kernel, strides=stride, padding=padding), gradient

    return convolve(x, kernel)


class Ops(base.Ops):
    def __init__(self, device_type: str = "cpu", onednn: bool | None = False):
        # The one-channel kernel gradient pays against Eigen's CPU kernels only (measured
        # on CPU; against oneDNN's, ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS says, it loses).
        self.one_channel_kernel_gradients = device_type == "cpu" and not onednn

    def ndim(self, x):
        return x.shape.rank

    def shape(self, x):
        return tuple(int(d) for d in x.shape)

    def reshape(self, x, shape):
        return tf.reshape(x, shape)

    def mean(self, x, axes, keepdims=False):
        return _mean(x, tuple(axes), keepdims)

    def moments(self, x, axes, keepdims=False):
        axes = tuple(axes)
        mean = _mean(x, axes, keepdims=True)
        var = _mean(tf.math.squared_difference(x, mean), axes, keepdims)
        return (mean if keepdims else tf.squeeze(mean, axis=axes)), var

    def rsqrt(self, x):
        return tf.math.rsqrt(x)

    def conv2d(self, x, kernel, stride, pads, groups=1):
        (top, bottom), (left, right) = pads
        padding = [[0, 0], [top, bottom], [left, right], [0, 0]]
        if groups == 1:
            named = _named_padding(x, kernel, stride, pads) or padding
            if (self.one_channel_kernel_gradients and x.shape[-1] == 1
                    and kernel.shape[0] * kernel.shape[1] >= ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS):
                return _one_channel_convolution(x, kernel, stride, pads, named)
            return tf.nn.conv2d(x, kernel, strides=stride, padding=named)
        # tf.nn.conv2d computes grouped convolutions forward, but has no gradient for them
        # on CPU ("Gradients for grouped convolutions are not supported on CPU").
        channels = x.shape[-1]
        if groups == channels:  # depthwise: HWIO (kh, kw, 1, C * m) is depthwise's (kh, kw, C, m)
            kh, kw, _, out = kernel.shape
            named = _named_padding(x, kernel, stride, pads)
            # Otherwise padded first, then VALID: with explicit padding, grappler's float32
            # fusion of depthwise convolution + bias + ReLU6 aborts the process (TF 2.21,
            # CPU: "Check failed: ... Invalid index from the dimension: 1, 0, H").
            if named is None:
                x, named = tf.pad(x, padding), "VALID"
            return tf.nn.depthwise_conv2d(x, tf.reshape(kernel, [kh, kw, channels, out // channels]),
                                          strides=[1, stride, stride, 1], padding=named)
        return tf.concat([tf.nn.conv2d(block, block_kernel, strides=stride, padding=padding)
                          for block, block_kernel in zip(tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1))],
                         axis=-1)

    def max_pool2d(self, x, window, stride, pads):
        named = _named_padding(x, window, stride, pads)
        if named is not None:  # SAME's max pool never picks its padding, as -inf padding would not
            return tf.nn.max_pool2d(x, list(window), stride, named)
        # Pooling takes no explicit pads: pad with -inf (never the maximum), then VALID.
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]], constant_values=float("-inf"))
        return tf.nn.max_pool2d(x, list(window), stride, "VALID")

    def avg_pool2d(self, x, window, stride, pads):
        named = _named_padding(x, window, stride, pads)
        if named is not None:  # SAME's averages leave the padding out of the count, as below
            return tf.nn.avg_pool2d(x, list(window), stride, named)
        (top, bottom), (left, right) = pads
        # Window means over zero padding, times the window's size over the positions inside.
        padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        counts = base.valid_counts(tuple(x.shape[1:3]), window, stride, pads)
        ratio = tf.constant((window[0] * window[1] / counts)[None, :, :, None], x.dtype)
        return tf.nn.avg_pool2d(padded, list(window), stride, "VALID") * ratio

    def max(self, x, axes, keepdims=False):
        return tf.reduce_max(x, axis=list(axes), keepdims=keepdims)

    def concat_channels(self, xs):
        return tf.concat(xs, axis=-1)

    def relu6(self, x):
        return tf.nn.relu6(x)

    def dense(self, x, kernel):
        return tf.matmul(x, kernel)

    def flatten(self, x):
        # NHWC flattens in the canonical (h, w, c) order as is; the static feature count
        # keeps shapes fully known inside compiled functions.
        return tf.reshape(x, [-1, x.shape[1:].num_elements()])

    def add_channel_bias(self, x, bias):
        return _add_channels(x, bias)

    def scale_channels(self, x, scale):
        return x * scale

    def normalize(self, x, mean, var, epsilon):
        return (x - mean) * tf.math.rsqrt(var + epsilon)

    def batch_norm_train(self, x, scale, shift, epsilon):
        # Written out: tf.nn.fused_batch_norm is 4-D only and rejects float64 (and returns
        # the Bessel-corrected variance), and tf.nn.moments stops the gradient through the
        # mean inside the variance. This is the contract's two-pass formula, with gradients
        # through mean and variance, in every rank and dtype.
        mean = _channel_mean(x)
        centered = _add_channels(x, -mean)
        var = _channel_mean(tf.square(centered))
        inverse_std = tf.math.rsqrt(var + epsilon)
        if scale is not None:
            inverse_std = inverse_std * scale
        y = _multiply_channels(centered, inverse_std)
        if shift is not None:
            y = _add_channels(y, shift)
        return y, tf.stop_gradient(mean), tf.stop_gradient(var)

    def channel_moments(self, x):
        return _channel_moments(x)

    def reduced_count(self, x):
        # Needs static shapes: compiled functions are traced per input shape (see engine).
        return x.shape[:-1].num_elements()

    def relu(self, x):
        return tf.nn.relu(x)

    def log(self, x):
        return tf.math.log(x)

    def sqrt(self, x):
        return tf.sqrt(x)

    def sum(self, x):
        return tf.reduce_sum(x)

    def zeros_like(self, x):
        return tf.zeros_like(x)

    def stop_gradient(self, x):
        return tf.stop_gradient(x)

    def softmax_cross_entropy(self, logits, labels):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))

    def correct_count(self, logits, labels):
        predicted = tf.argmax(logits, axis=1, output_type=labels.dtype)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int32))

    def clip(self, x, low, high):
        return tf.minimum(tf.maximum(x, low), high)

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)

    def matrix_transpose(self, matrix):
        return tf.linalg.matrix_transpose(matrix)

    def add_to_diagonal(self, matrix, value):
        return matrix + value * tf.eye(matrix.shape[-1], dtype=matrix.dtype)

    def log_det_gram(self, values, diagonal_shift=0.0):
        factor = _gram_factor(values, diagonal_shift)
        return 2.0 * tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(factor))), axis=-1)


def _gram_factor(values, shift):
    """The triangular R with R^T R = V^T V + shift * I for V = `values` (..., n, k), from QR
    factorizations (R's rows' signs are the factorization's).

    TensorFlow's CPU QR is Eigen's Householder, slow on tall matrices: [V; sqrt(shift) I]
    for cnn3's conv1 at batch 128 (100,384 x 32) took 200 ms, 280 ms with its gradient. So
    V is cut into blocks of 16 x k rows (zero rows pad the last), all blocks are factored at
    once and their stacked R's again (a tall-skinny QR, 100 ms with the gradient). Each
    block carries shift / blocks of the shift, as rows sqrt(shift / blocks) * I: the R's
    sum to the same R^T R, and every block's R is invertible, as the factorization's
    gradient needs (a dead channel, a zero column of V, made it NaN when the shift was only
    in the last block)."""
    rows, k = values.shape[-2], values.shape[-1]
    lead = tuple(values.shape[:-2])
    block = 16 * k
    root_shift = lambda share, count=None: tf.broadcast_to(
        share ** 0.5 * tf.eye(k, dtype=values.dtype), (*lead, *(() if count is None else (count,)), k, k))
    matrix = values
    while rows is not None and rows > 2 * block:
        count = -(-rows // block)
        if count * block > rows:
            matrix = tf.concat([matrix, tf.zeros((*lead, count * block - rows, k), matrix.dtype)], axis=-2)
        blocks = tf.reshape(matrix, (*lead, count, block, k))
        if shift:
            blocks = tf.concat([blocks, root_shift(shift / count, count)], axis=-2)
        matrix, rows, shift = tf.reshape(tf.linalg.qr(blocks)[1], (*lead, count * k, k)), count * k, 0.0
    if shift:
        matrix = tf.concat([matrix, root_shift(shift)], axis=-2)
    return tf.linalg.qr(matrix)[1]

def _named_padding(x, window, stride, pads) -> str | None:
    """"VALID" or "SAME" where TensorFlow's named padding is exactly `pads` for a window of
    `window` (a kernel, or a pool's (h, w)), else None. The pads come from the neutral model
    (TensorFlow's SAME rule, made explicit), so the named modes compute the same windows;
    TensorFlow's CPU convolutions run them faster than the same pads given as a list
    (resnet-small's step: 1.16x the hand-written loop's with lists, 1.00x named)."""
    (top, bottom), (left, right) = pads
    if not (top or bottom or left or right):
        return "VALID"
    window = tuple(window.shape[:2]) if hasattr(window, "shape") else tuple(window)
    if None in (*x.shape[1:3], *window):
        return None
    same = [conv_padding(int(size), int(extent), stride, "same")[0] for size, extent in zip(x.shape[1:3], window)]
    return "SAME" if same == [(top, bottom), (left, right)] else None
