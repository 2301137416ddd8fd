"""PyTorch primitives. Activations are NCHW (PyTorch's native layout) with both spatial
axes stored in reverse, or (batch, features); convolution kernels are OIHW, reversed alike.

Why reversed: PyTorch pads a convolution symmetrically, and TensorFlow's SAME rule, the
architectures' contract, puts the odd padding pixel at the bottom/right. Read backwards,
the odd pixel is at the top/left, where a symmetric pad by the larger amount puts it too:
the extra row it adds at the end is one no window reaches (a stride of 2 or more steps
over it). So a stride-2 SAME convolution is PyTorch's plain `padding=p` call on reversed
activations and kernels, with the same windows and sums, where canonical order needs
the input padded beforehand or the kernel grown by a row of zeros. Canonical order comes
back where an activation leaves the layout: `reshape` and `flatten` (the (h, w, c)
feature order), the engine's `activation_to_numpy` and `export_tree`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from normbench.backends import base


def _channel_view(v, x):
    return v.view(1, -1, 1, 1) if x.dim() == 4 else v


# Rank-4 activations are NCHW inside this backend (PyTorch's native layout), height and
# width reversed (the module docstring says why); every other rank is stored in canonical
# order. Canonical axis k of a rank-4 tensor is torch axis _NCHW[k].
_NCHW = (0, 2, 3, 1)
_SPATIAL = (2, 3)


def to_canonical(x):
    """A rank-4 activation of this layout -> canonical (N, H, W, C) order, a new tensor."""
    return x.flip(_SPATIAL).permute(0, 2, 3, 1)


def from_canonical(x):
    """A canonical (N, H, W, C) tensor -> this backend's rank-4 layout."""
    return x.permute(0, 3, 1, 2).flip(_SPATIAL)


def _dims(x, axes):
    return tuple(_NCHW[a] for a in axes) if x.dim() == 4 else tuple(axes)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel (mean, biased variance), two-pass, with the gradient written out.

    The forward is `_channel_mean` of the input and of the squared centred input
    (torch.var_mean over the (0, 2, 3) axes of an NCHW tensor is 2-5x slower on CPU), the
    values `_inference_moments` gives bit for bit. The backward is one reduction and a
    multiply-add (`_moments_input_gradient`) instead of autograd's chain of five:
    d mean / dx = 1 / n and d var / dx = 2 (c - mean(c)) / n, with c = x - mean the
    centred input the forward already made, so dx = g_mean / n + (2 g_var / n) (c - mean(c)).
    mean(c) is 0 but for rounding, and it is the centring mean's own term (`Ops.channel_moments`
    says why it stays). On a (128, 32, 28, 28) float32 input, forward and backward took
    about a third of autograd's time on the 2-core machine."""

    generate_vmap_rule = True  # torch.func.vmap can batch it (vectorized runs)

    @staticmethod
    def forward(x):
        mean = _channel_mean(x)
        centred = x - _channel_view(mean, x)
        return mean, _channel_mean(centred * centred), centred

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[2])
        ctx.mark_non_differentiable(output[2])
        # No gradient flows into the centred output; materialized, autograd fills a zero
        # tensor of the input's size for it at every backward (cnn3 with the loss: 13 fills
        # per step, 0.08 ms of its 9 ms on the 2-core machine).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _):
        (centred,) = ctx.saved_tensors
        return _moments_input_gradient(centred, grad_mean, grad_var)


def _moments_input_gradient(centred, grad_mean, grad_var):
    """The input gradient of per-channel (mean, biased variance) from theirs (`_ChannelMoments`
    says how), given the centred input; None where neither was used."""
    count = centred.numel() // centred.shape[1]
    if grad_var is None:  # only the mean was used (or nothing)
        if grad_mean is None:
            return None
        return _channel_view(grad_mean / count, centred).expand_as(centred).clone(memory_format=torch.contiguous_format)
    spread = grad_var * (2.0 / count)
    offset = -spread * _channel_mean(centred)  # the centring mean's term
    if grad_mean is not None:
        offset = offset + grad_mean / count
    if centred.dim() == 4:
        # Multiply, then add in place: ATen's addcmul with two broadcast (1, C, 1, 1)
        # operands measured 2.5x slower than both together. On cnn3's first tap (128 x 32 x
        # 14 x 14, float32, 2-core AVX-512 machine): addcmul 290 us, this 119 us; cnn3
        # steps with the loss, side by side in one process, 12.72 / 13.02 / 14.29 ms before
        # and 12.43 / 12.82 / 14.14 after. The two round differently from addcmul (not bit
        # for bit equal on that tap). torch.func.vmap takes the in-place add, also where
        # only the offset is batched (tests/test_backend_torch.py).
        return torch.mul(centred, _channel_view(spread, centred)).add_(_channel_view(offset, centred))
    # A (batch, features) tap broadcasts along its rows, where addcmul is the faster one
    # (mlp3's 128 x 100: 5.8 against 8.3 us).
    return torch.addcmul(offset, centred, spread)


class _StandardizationLoss(torch.autograd.Function):
    """`Ops.standardization_loss` of all taps in one Function: the forward is the
    composition's (`_ChannelMoments`' forward and `standard_normal_kl` per tap, the same
    ops in the same order, so the same bits), the backward is written out: equation (2)'s
    d / d mean = mean and d / d var = 0.5 (1 - 1 / (var + eps)), through
    `_moments_input_gradient`, each in the rounding autograd gives the composition (0.5 g
    times each factor, summed), so the gradients are its bits too (a test checks both).
    Why: eager autograd records ~30 ops per tap for the composition, each costing more
    than its arithmetic on vectors of a layer's channels. Steps on the 2-core machine,
    side by side (none / this / the composition, ms): cnn3 10.13 / 12.05 / 12.53, mlp3
    1.16 / 1.68 / 1.89; vectorized groups of 4 (this / the composition): cnn3 70.8 / 76.4,
    mlp3 7.07 / 8.77."""

    generate_vmap_rule = True  # torch.func.vmap can batch it (vectorized runs)

    @staticmethod
    def forward(ops, log_epsilon, *taps):
        total, moments = 0.0, []
        for x in taps:
            mean, var, centred = _ChannelMoments.forward(x)
            total = total + ops.standard_normal_kl(mean, var, log_epsilon)
            moments += [centred, mean, var]
        return (total, *moments)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.log_epsilon = inputs[1]
        ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no gradient flows into the moments (see _ChannelMoments)

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:
            return (None,) * (2 + len(ctx.saved_tensors) // 3)
        saved, half = ctx.saved_tensors, 0.5 * grad
        gradients = []
        for k in range(0, len(saved), 3):
            centred, mean, var = saved[k:k + 3]
            # autograd's rounding of the composition: mean * mean gives half * mean twice,
            # var and -log(var + eps) give half and -(half / (var + eps)).
            grad_mean = half * mean + half * mean
            grad_var = half - half / (var + ctx.log_epsilon)
            gradients.append(_moments_input_gradient(centred, grad_mean, grad_var))
        return (None, None, *gradients)


# Where the zero-rowed kernel beats the padded input, for the windows a symmetric pad
# cannot give (a stride-1 SAME convolution with an even kernel, or a VALID one whose
# windows leave rows unread). oneDNN convolves an input with its own symmetric padding
# much faster than the same input padded to an odd size beforehand: cnn3's stride-2 5x5
# convolution of 128 x 32 x 14 x 14 with pads (1, 2), forward and backward on the 2-core
# machine: F.pad 9.0 ms, a 6 x 6 kernel with padding 2 4.9 ms, the symmetric pad (what
# the reversed layout computes) 4.6 ms. The bigger kernel costs (6 / 5)^2 = 1.44x the
# multiply-adds; a 3 x 3 kernel grown to 4 x 4 costs 1.78x and lost to F.pad at 32-64
# channels, plain and depthwise; and one input channel is cheap to pad (F.pad 4.8 ms, the
# 6 x 6 kernel 7.4 ms).
KERNEL_PADDING_MAX_COST = 1.5


def _kernel_padding_pays(x, kernel, extra_h, extra_w, groups):
    kh, kw = kernel.shape[2:]
    return groups == 1 and x.shape[1] > 1 and (kh + extra_h) * (kw + extra_w) <= KERNEL_PADDING_MAX_COST * kh * kw


def _reversed_pads(size, window, stride, pads):
    """Canonical ((top, bottom), (left, right)) pads of a window operation (convolution,
    pooling) over an input of canonical spatial `size`, read in this layout's reversed
    order: per axis (crop, front, back), the input rows to drop in front and the zero rows
    to add in front and behind, for the same windows with the last one ending on the
    last row. Canonically the windows leave `slack` padded rows unread at the end
    (stride - 1 at most); reversed, those rows come first, so the front pad loses them,
    and where the bottom pad is shorter than the slack, unread input rows go too."""
    axes = []
    for n, k, (top, bottom) in zip(size, window, pads):
        slack = (n + top + bottom - k) % stride
        front = bottom - slack
        axes.append((max(-front, 0), max(front, 0), top))
    return axes


def _symmetric(front, back, stride):
    """(pad, zero kernel rows ahead, zero kernel rows behind): a symmetric pad with the
    windows of (front, back) on an input they fit exactly. With front >= back, the pad is
    front: the rows it adds behind start no window while they are fewer than a stride (the
    reversed SAME case: front = back + 1, stride 2), and zero kernel rows behind absorb
    the rest. With front < back, the pad is back and front's windows start back - front
    rows later: as many zero kernel rows ahead move every window there."""
    if front >= back:
        return front, 0, max(front - back - stride + 1, 0)
    return back, back - front, 0


def _reversed_window(x, window, stride, pads):
    """A window operation's canonical pads applied in this layout: (x with the rows no
    window reads cropped from the front, the per-axis (front, back) zero pads after the
    crop, the per-axis `_symmetric` (pad, zero kernel rows ahead, behind) for them)."""
    axes = _reversed_pads(tuple(x.shape[2:]), window, stride, pads)
    (crop_h, *_), (crop_w, *_) = axes
    if crop_h or crop_w:
        x = x[:, :, crop_h:, crop_w:]
    return x, [(front, back) for _, front, back in axes], [_symmetric(front, back, stride) for _, front, back in axes]


# oneDNN computes the kernel gradient of a convolution over one input channel (MNIST's
# first layer) at a fraction of its speed elsewhere: cnn3's 5 x 5 stride-2 first layer at
# batch 128 spent 3.9-4.6 ms in that backward, against 1.0 ms forward. The kernel gradient
# is itself a convolution, of the padded input with the output gradient as the kernel
# (batch and channel axes swapped, dilated by the stride), which oneDNN runs as a
# 128-channel convolution: 1.5-2.7 ms. At one input channel, batch 128, 28 x 28 (ms,
# oneDNN's backward / this): 5 x 5 stride 2 4.6 / 2.7, 5 x 5 stride 1 6.9 / 3.8, 7 x 7
# stride 2 12.7 / 4.3, but 3 x 3 stride 2 2.8 / 2.3 and 3 x 3 stride 1 12.8 / 14.3, and
# more input channels lost (32 -> 16 at 5 x 5 stride 2: 4.6 / 10.0 with the input
# gradient); so kernels of at least this many taps over one input channel take it.
ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS = 25
# Those timings come from the session whose throughput records (27e3ffb, f5d760b) name a CPU
# with AVX2 and no AVX-512. On a 2-core EPYC with AVX-512 (AVX512_VNNI and BF16 too),
# oneDNN's own backward of the first layer is the faster one: cnn3 steps with
# this Function / with F.conv2d's backward / the hand-written loop, side by side in one
# process, two rounds each (ms): none 9.79 / 9.00 / 9.16 and 9.71 / 8.88 / 9.19, batch
# norm 16.67 / 15.34 / 15.01 and 16.11 / 14.52 / 14.29, standardization loss 15.63 / 14.38 /
# 16.58 and 14.53 / 13.22 / 15.48. Its float32 gradients there, against float64 on 128
# MNIST images: kernel 1.5e-6 and bias 1.7e-6 of their largest value (this Function's
# 4e-7 and 1.7e-7; the parity tests pass with either). So where PyTorch reports AVX-512
# (torch.backends.cpu.get_cpu_capability()), F.conv2d keeps its own backward; every other
# CPU keeps this Function, as first measured.
ONE_CHANNEL_KERNEL_GRADIENT_SKIPPED_ON = ("AVX512",)
# Read once, at import: torch.compile cannot trace the query, and inside `_convolve` it broke
# every compiled step's graph at the first layer.
ONE_CHANNEL_FUNCTION_ON_THIS_CPU = torch.backends.cpu.get_cpu_capability() not in ONE_CHANNEL_KERNEL_GRADIENT_SKIPPED_ON


class _OneChannelConvolution(torch.autograd.Function):
    """F.conv2d (groups 1, symmetric padding) whose kernel gradient is the convolution
    `ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS` describes and whose bias gradient is the output
    gradient's per-channel sum, outside oneDNN's backward (whose fused bias sum was 1.9e-4
    off float64 on cnn3's first layer, PyTorch's sum 2e-7). The same sums in another order."""

    generate_vmap_rule = True  # torch.func.vmap can batch it (vectorized runs)

    @staticmethod
    def forward(x, kernel, bias, stride, padding):
        return F.conv2d(x, kernel, bias, stride=stride, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, bias, ctx.stride, ctx.padding = inputs
        ctx.save_for_backward(x, kernel)

    @staticmethod
    def backward(ctx, grad):
        x, kernel = ctx.saved_tensors
        stride, (pad_h, pad_w) = ctx.stride, ctx.padding
        grad_x = grad_kernel = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, kernel, grad, stride=stride, padding=(pad_h, pad_w))
        if ctx.needs_input_grad[1]:
            # Pad (or crop: a negative pad) the input to exactly the rows and columns a window reads.
            (height, width), (kernel_h, kernel_w), (out_h, out_w) = x.shape[2:], kernel.shape[2:], grad.shape[2:]
            back_h = kernel_h + stride * (out_h - 1) - height - pad_h
            back_w = kernel_w + stride * (out_w - 1) - width - pad_w
            read = F.pad(x, (pad_w, back_w, pad_h, back_h))
            grad_kernel = F.conv2d(read.transpose(0, 1), grad.transpose(0, 1), dilation=stride).transpose(0, 1)
        if ctx.needs_input_grad[2]:
            grad_bias = _channel_sum(grad)
        return grad_x, grad_kernel, grad_bias, None, None


def _convolve(x, kernel, bias, stride, padding=(0, 0), groups=1):
    """F.conv2d, through `_OneChannelConvolution` where a kernel gradient over one input
    channel will be taken on a CPU without AVX-512 (where it was measured to pay)."""
    if (groups == 1 and x.shape[1] == 1 and kernel.requires_grad and torch.is_grad_enabled() and x.is_cpu
            and kernel.shape[2] * kernel.shape[3] >= ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS
            and ONE_CHANNEL_FUNCTION_ON_THIS_CPU):
        return _OneChannelConvolution.apply(x, kernel, bias, stride, tuple(padding))
    return F.conv2d(x, kernel, bias, stride=stride, padding=tuple(padding), groups=groups)


def _channel_sum(x):
    """Per-channel sum of an NCHW or (batch, features) tensor: each example's spatial sum
    first, then the batch's. On cnn3's first pre-activations (500 x 32 x 14 x 14, float32)
    this is 3-4x faster than one reduction over (0, 2, 3), whose strided walk measured
    0.60 ms against 0.13-0.19 ms, and closer to float64 (1.8e-7 relative against 1.2e-6)."""
    return (x.sum(dim=_SPATIAL) if x.dim() == 4 else x).sum(dim=0)


def _channel_mean(x):
    return _channel_sum(x) / (x.numel() // x.shape[1]) if x.dim() == 4 else x.mean(dim=0)


def _inference_moments(x):
    """`_ChannelMoments`' values where no gradient is recorded (evaluation, prediction):
    the centred input is squared in place, so one fewer tensor of the input's size is
    written. cnn3's evaluation of 10,000 images (chunks of 500, 2-core machine, medians of
    10 alternating in one process), against the Function with one (0, 2, 3) reduction:
    none 287 / 322 ms, standardization loss 303 / 344, batch norm 335 / 410. Training
    steps measured the same either way (the Function's reductions are `_channel_mean` too);
    compiled evaluation is unchanged (inductor fuses both forms)."""
    mean = _channel_mean(x)
    centred = x - _channel_view(mean, x)
    return mean, _channel_mean(centred.mul_(centred))


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
            x = to_canonical(x)
        out = x.reshape(shape)
        return from_canonical(out) if len(shape) == 4 else out

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
        return self.conv2d_bias(x, kernel, None, stride, pads, groups)

    def conv2d_bias(self, x, kernel, bias, stride, pads, groups=1):
        x, ((front_h, back_h), (front_w, back_w)), ((pad_h, ahead_h, behind_h), (pad_w, ahead_w, behind_w)) = (
            _reversed_window(x, tuple(kernel.shape[2:]), stride, pads))
        if tuple(kernel.shape[2:]) == (1, 1) and stride > 1 and not (front_h or back_h or front_w or back_w):
            # A strided 1 x 1 convolution (ResNet's shortcuts) reads every stride-th pixel:
            # taking them first costs a copy of those only, where the cropped view would be
            # copied whole (128 x 64 x 32 x 32, forward and backward: 44 ms, against 59-99
            # ms for the canonical strided call and 71-92 ms for the cropped view).
            return F.conv2d(x[:, :, ::stride, ::stride], kernel, bias, groups=groups)
        if ahead_h or behind_h or ahead_w or behind_w:
            if not _kernel_padding_pays(x, kernel, ahead_h + behind_h, ahead_w + behind_w, groups):
                return _convolve(F.pad(x, (front_w, back_w, front_h, back_h)), kernel, bias, stride, groups=groups)
            kernel = F.pad(kernel, (ahead_w, behind_w, ahead_h, behind_h))
        return _convolve(x, kernel, bias, stride, (pad_h, pad_w), groups)

    def dense_bias(self, x, kernel, bias):
        return x @ kernel if bias is None else torch.addmm(bias, x, kernel)

    def max_pool2d(self, x, window, stride, pads):
        # In canonical order: a window's ties send the gradient to their first position in
        # canonical row-major order (the contract), which reversed would be the last.
        # (Ties are common: a constant background gives equal activations.)
        x = x.flip(_SPATIAL)
        (top, bottom), (left, right) = pads
        if top == bottom and left == right and 2 * top <= window[0] and 2 * left <= window[1]:
            out = F.max_pool2d(x, window, stride, padding=(top, left))  # its padding is -inf
        else:
            out = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), window, stride)
        return out.flip(_SPATIAL)

    def avg_pool2d(self, x, window, stride, pads):
        size = self.shape(x)[1:3]
        x, ((front_h, back_h), (front_w, back_w)), ((pad_h, ahead_h, behind_h), (pad_w, ahead_w, behind_w)) = (
            _reversed_window(x, window, stride, pads))
        if not (ahead_h or behind_h or ahead_w or behind_w) and 2 * pad_h <= window[0] and 2 * pad_w <= window[1]:
            return F.avg_pool2d(x, window, stride, padding=(pad_h, pad_w), count_include_pad=False)
        # Otherwise: window sums over zero padding / positions inside (reversed, as the sums are).
        sums = F.avg_pool2d(F.pad(x, (front_w, back_w, front_h, back_h)), window, stride, divisor_override=1)
        counts = np.ascontiguousarray(base.valid_counts(size, window, stride, pads)[::-1, ::-1])
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
        if x.dim() == 4:  # -> canonical (h, w, c) feature order
            x = to_canonical(x)
        return x.reshape(x.shape[0], -1)

    def add_channel_bias(self, x, bias):
        return x + _channel_view(bias, x)

    def scale_channels(self, x, scale):
        return x * _channel_view(scale, x)

    def normalize(self, x, mean, var, epsilon):
        return (x - _channel_view(mean, x)) * _channel_view(torch.rsqrt(var + epsilon), x)

    def batch_norm_infer(self, x, mean, var, scale, shift, epsilon):
        # One fused pass (F.batch_norm in inference mode: x * a + b per channel, a = scale /
        # sqrt(var + eps)) instead of three elementwise passes: the largest single cost of
        # a batch-norm network's evaluation besides its convolutions. Float64 composes the
        # formula, for the reason batch_norm_train gives below.
        if x.dtype == torch.float64:
            return super().batch_norm_infer(x, mean, var, scale, shift, epsilon)
        return F.batch_norm(x, mean, var, scale, shift, False, 0.0, epsilon)

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
        #
        # Off the CPU, the composed formula too: on CUDA (PyTorch 2.11, an H200) the
        # backward of native_batch_norm without running buffers failed with "tensor does
        # not have a device", and the fused kernel was only ever measured on the CPU.
        if x.dtype == torch.float64 or not x.is_cpu:
            return super().batch_norm_train(x, scale, shift, epsilon)
        y, mean, invstd = torch.native_batch_norm(x, scale, shift, None, None, True, 0.0, epsilon)
        return y, mean, (invstd.square().reciprocal() - epsilon).clamp_min(0.0)

    def group_normalize(self, x, groups, epsilon, scale=None, shift=None):
        # F.group_norm takes NCHW and (N, C) as they are, groups of consecutive channels,
        # biased variance, per-channel weight and bias: the contract's formula in one fused
        # kernel each way instead of a permute, a reshape and seven elementwise passes.
        return F.group_norm(x, groups, scale, shift, epsilon)

    def moving_average(self, running, value, decay):
        # value + decay * (running - value): one fused op instead of three.
        return torch.lerp(value, running, decay)

    def channel_moments(self, x):
        if not torch.is_grad_enabled():  # no graph is recorded, so nothing saved can be overwritten
            return _inference_moments(x)
        mean, var, _ = _ChannelMoments.apply(x)
        return mean, var

    def standardization_loss(self, taps, log_epsilon):
        # Compiled (dynamo traces this) or with no graph recorded, the composition: inductor
        # fuses it anyway, and evaluation needs no gradient.
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not taps:
            return super().standardization_loss(taps, log_epsilon)
        return _StandardizationLoss.apply(self, log_epsilon, *taps)[0]

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
        return torch.matmul(self.matrix_transpose(a) if transpose_a else a, self.matrix_transpose(b) if transpose_b else b)

    def matrix_transpose(self, matrix):
        return matrix.transpose(-1, -2)

    def add_to_diagonal(self, matrix, value):
        return matrix + value * torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)

    def log_det_gram(self, values, diagonal_shift=0.0):
        k = values.shape[-1]
        root_shift = diagonal_shift ** 0.5 * torch.eye(k, dtype=values.dtype, device=values.device)
        stacked = torch.cat([values, root_shift.expand(*values.shape[:-2], k, k)], dim=-2)
        # "reduced", not "r": torch differentiates QR only where it also returns Q.
        factor = torch.linalg.qr(stacked, mode="reduced")[1]
        return 2.0 * torch.log(torch.abs(torch.diagonal(factor, dim1=-2, dim2=-1))).sum(-1)
