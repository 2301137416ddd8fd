"""PyTorch primitives. Activations are NCHW (PyTorch's native layout) or (batch, features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normbench.backends import base


def _channel_view(v, x):
    return v.view(1, -1, 1, 1) if x.dim() == 4 else v


# Rank-4 activations are NCHW inside this backend (PyTorch's native layout); every other
# rank is stored in canonical order. Canonical axis k of a rank-4 tensor is torch axis _NCHW[k].
_NCHW = (0, 2, 3, 1)


def _dims(x, axes):
    return tuple(_NCHW[a] for a in axes) if x.dim() == 4 else tuple(axes)


class Ops(base.Ops):
    def ndim(self, x):
        return x.dim()

    def shape(self, x):
        if x.dim() == 4:
            n, c, h, w = x.shape
            return (n, h, w, c)
        return tuple(x.shape)

    def reshape(self, x, shape):
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        out = x.reshape(shape)
        return out.permute(0, 3, 1, 2) if len(shape) == 4 else out

    def _canonical_result(self, kept, x, axes, keepdims):
        """A reduction computed with keepdim=True -> the contract's result."""
        if keepdims:
            return kept  # broadcasts against x in its own layout
        if x.dim() != 4:
            return kept.squeeze(axes) if axes else kept
        # The remaining axes in canonical order (NCHW's order differs when C and H/W remain).
        return self.reshape(kept, tuple(d for k, d in enumerate(self.shape(x)) if k not in axes))

    def mean(self, x, axes, keepdims=False):
        return self._canonical_result(x.mean(dim=_dims(x, axes), keepdim=True), x, tuple(axes), keepdims)

    def moments(self, x, axes, keepdims=False):
        dims = _dims(x, axes)
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square().mean(dim=dims, keepdim=True)
        axes = tuple(axes)
        return self._canonical_result(mean, x, axes, keepdims), self._canonical_result(var, x, axes, keepdims)

    def rsqrt(self, x):
        return torch.rsqrt(x)

    def conv2d(self, x, kernel, stride, pads, groups=1):
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:
            return F.conv2d(x, kernel, stride=stride, padding=(top, left), groups=groups)
        # PyTorch's conv padding is symmetric; TensorFlow's SAME puts the odd pixel at
        # the bottom/right, so pad explicitly to keep the canonical alignment.
        return F.conv2d(F.pad(x, (left, right, top, bottom)), kernel, stride=stride, groups=groups)

    def max_pool2d(self, x, window, stride, pads):
        (top, bottom), (left, right) = pads
        if top == bottom and left == right and 2 * top <= window[0] and 2 * left <= window[1]:
            return F.max_pool2d(x, window, stride, padding=(top, left))  # its padding is -inf
        return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), window, stride)

    def avg_pool2d(self, x, window, stride, pads):
        (top, bottom), (left, right) = pads
        if top == bottom and left == right and 2 * top <= window[0] and 2 * left <= window[1]:
            return F.avg_pool2d(x, window, stride, padding=(top, left), count_include_pad=False)
        # Asymmetric (SAME's odd pixel): window sums over zero padding / positions inside.
        sums = F.avg_pool2d(F.pad(x, (left, right, top, bottom)), window, stride, divisor_override=1)
        counts = base.valid_counts(tuple(x.shape[2:]), window, stride, pads)
        return sums / torch.from_numpy(counts).to(sums.device, sums.dtype)

    def max(self, x, axes, keepdims=False):
        # amax, not max(dim): its gradient splits between ties, as the contract asks.
        return self._canonical_result(x.amax(dim=_dims(x, axes), keepdim=True), x, tuple(axes), keepdims)

    def concat_channels(self, xs):
        return torch.cat(xs, dim=1 if xs[0].dim() == 4 else -1)

    def relu6(self, x):
        return F.relu6(x)

    def dense(self, x, kernel):
        return x @ kernel

    def flatten(self, x):
        if x.dim() == 4:  # NCHW -> canonical (h, w, c) feature order
            x = x.permute(0, 2, 3, 1)
        return x.reshape(x.shape[0], -1)

    def add_channel_bias(self, x, bias):
        return x + _channel_view(bias, x)

    def scale_channels(self, x, scale):
        return x * _channel_view(scale, x)

    def normalize(self, x, mean, var, epsilon):
        return (x - _channel_view(mean, x)) * _channel_view(torch.rsqrt(var + epsilon), x)

    def batch_norm_train(self, x, scale, shift, epsilon):
        # Fused kernel (the one F.batch_norm calls on CPU): normalizes with the biased
        # batch variance, as the contract asks, and hands back the mean and 1/sqrt(var +
        # eps) it used. No running buffers are passed, so it updates nothing behind our
        # back (its own running variance would be the unbiased one). Recovering var from
        # invstd is exact to rounding relative to var + eps; the clamp keeps a dead
        # channel's var from rounding below zero.
        #
        # In float64, the dtype parity verifies formulas in, the composed formula instead:
        # the fused kernel's rounding there is ~6x the two-pass formula's (2e-12 against
        # 3.5e-13 absolute on channels whose mean is 1e4 times their spread), and a deep
        # network amplifies that: smoke-inception-v2 with batch norm drifted 1.3e-8 from
        # JAX and TensorFlow over 50 float64 steps, past the 1e-9 bound.
        if x.dtype == torch.float64:
            return super().batch_norm_train(x, scale, shift, epsilon)
        y, mean, invstd = torch.native_batch_norm(x, scale, shift, None, None, True, 0.0, epsilon)
        return y, mean, (invstd.square().reciprocal() - epsilon).clamp_min(0.0)

    def moving_average(self, running, value, decay):
        # value + decay * (running - value): one fused op instead of three.
        return torch.lerp(value, running, decay)

    def channel_moments(self, x):
        # Two-pass, written out: torch.var_mean over the (0, 2, 3) axes of an NCHW tensor
        # is 2-5x slower on CPU than these two reductions.
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        mean = x.mean(dim=dims)
        var = (x - _channel_view(mean, x)).square().mean(dim=dims)
        return mean, var

    def reduced_count(self, x):
        return x.numel() // x.shape[1]

    def relu(self, x):
        return torch.relu(x)

    def log(self, x):
        return torch.log(x)

    def sqrt(self, x):
        return torch.sqrt(x)

    def sum(self, x):
        return x.sum()

    def zeros_like(self, x):
        return torch.zeros_like(x)

    def stop_gradient(self, x):
        return x.detach()

    def softmax_cross_entropy(self, logits, labels):
        return F.cross_entropy(logits, labels)

    def correct_count(self, logits, labels):
        return (logits.argmax(dim=1) == labels).sum()

    def clip(self, x, low, high):
        # torch.clamp takes both bounds as numbers or both as tensors, not one of each.
        bound = lambda v: v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=x.dtype, device=x.device)
        return torch.clamp(x, bound(low), bound(high))

    def kernel_mean(self, kernel):
        # Conv kernels are OIHW here: the output channel is the first axis.
        dims = (1, 2, 3) if kernel.dim() == 4 else tuple(range(kernel.dim() - 1))
        return kernel.mean(dim=dims, keepdim=True)

    def kernel_count(self, kernel):
        return kernel.numel() // kernel.shape[0 if kernel.dim() == 4 else -1]

    def output_channels(self, vector, kernel):
        return vector.view(-1, 1, 1, 1) if kernel.dim() == 4 else vector

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return torch.matmul(a.transpose(-2, -1) if transpose_a else a, b.transpose(-2, -1) if transpose_b else b)

    def log_det_spd(self, matrix, diagonal_shift=0.0):
        if diagonal_shift:
            matrix = matrix + diagonal_shift * torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        factor = torch.linalg.cholesky(matrix)
        return 2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)
