"""Inception-v2 as TF-slim defines it: BN-Inception (Ioffe & Szegedy 2015, "Batch
Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
Figure 5), the network the paper trains on ImageNet (Appendix A.4: RMSProp, ReLU, "the
BN architecture adds a shift parameter after every normalization operation").

Matched layer by layer against TF-slim's `inception_v2` in `tf_slim/nets/inception_v2.py`
(google-research/tf-slim, PyPI wheel tf-slim 1.1.0; the same network as tensorflow/models
`research/slim/nets/inception_v2.py` with its default `use_separable_conv=True`), called
as `inception_v2(images, num_classes=1000)` (depth_multiplier 1.0, min_depth 16) under
`inception_v2_arg_scope()`, built in TensorFlow 2.21 (graph mode, 224 x 224 x 3). Its 71
Conv2D / DepthwiseConv2dNative ops and 13 pooling ops were compared with `declare`'s
layers in order (kernel, output shape, stride, padding; tests/test_arch_inception_v2.py
keeps that table):

- `conv2d_1a_7x7`: slim's `separable_conv2d(64, [7, 7], depth_multiplier=8, stride=2)`,
  here `conv2d_1a_7x7.depthwise` (7x7/2 depthwise, multiplier min(int(depth(64) / 3), 8)
  = 8: 3 -> 24 channels, no slot, no activation), then `conv2d_1a_7x7.pointwise` (1x1 to
  64) with the pair's one slot and ReLU;
- 3x3/2 max pool (slim's MaxPool_2a), `conv2d_2b_1x1` (64), `conv2d_2c_3x3` (192), 3x3/2
  max pool (MaxPool_3a): 224 -> 112 -> 56 -> 28;
- ten mixed blocks under slim's names (the BN paper's 3a, 3b, 3c, 4a .. 4e, 5a, 5b are
  slim's mixed_3b, 3c, 4a, 4b .. 4e, 5a, 5b, 5c): four branches (1x1; 1x1 -> 3x3; 1x1 ->
  3x3 -> 3x3; 3x3/1 average pool -> 1x1, a max pool in mixed_5c) concatenated, and the
  two reductions mixed_4a and mixed_5a (1x1 -> 3x3/2; 1x1 -> 3x3 -> 3x3/2; 3x3/2 max
  pool): 28 -> 14 -> 7. Widths in `BLOCKS`, each depth(d) = max(int(d x depth_multiplier),
  min_depth) as slim computes it; layer `mixed_3b.branch_1.conv2d_0b_3x3` is slim's
  `Mixed_3b/Branch_1/Conv2d_0b_3x3`;
- every padding SAME (slim's arg_scope; average pools do not count the padding, as
  `avg_pool2d` here); the stride-2 layers see even sizes: pads (2, 3) for the 7x7 stem,
  (0, 1) for the 3x3s;
- slim's `AvgPool_1a_7x7` (VALID, on the 7 x 7 map: the global average; slim shrinks the
  window to a smaller map, again the global average), then `logits`: slim's
  `Conv2d_1c_1x1`, a 1x1 convolution with bias on a 1 x 1 map, i.e. a dense layer.

Dropout: slim applies `dropout(keep_prob=0.8)` (`Dropout_1b`) to the pooled 1 x 1 x 1024
features, between `global_avg_pool` and `logits`. The vocabulary has no dropout yet, so
it is left out here; it goes there.

Counts of `inception-v2` (224 x 224 x 3, 1000 classes; slim's ImageNet checkpoints use
1001 with a background class, 1,025 parameters more), checked by the tests:

- TF-slim's trainable variables, `sum(prod(v.shape) for v in trainable_variables())`:
  11,178,336. Under the arg_scope every `conv2d` has batch norm with slim's default
  `scale=False` (beta only); the separable stem, outside the scope (it names `conv2d`
  only), has 64 biases, ReLU and no batch norm. Without the arg_scope (biases instead of
  beta): again 11,178,336.
- here, batch norm with a shift only (`batch_norm` with scale = false, the paper's
  setting) in all 69 slots: 11,178,336; no normalization: 11,178,336 (slot layers keep a
  bias). Both equal slim's count: the depthwise half of the stem is declared `bias=False`,
  as slim's separable convolution has no bias between its two halves, and the stem slot's
  64 shifts stand where slim has 64 stem biases.
- batch norm with scale and shift (`batch_norm`'s default): 11,188,288, a scale for each
  of the 9,952 slot channels more. Group norm (32 groups) fills every slot: all are
  multiples of 32 channels.
- 1,934,857,216 multiply-accumulates (conv and dense layers; the stem's depthwise half
  counted as 7 x 7 per output value, the classifier's 1,024,000 included), equal to slim's
  graph counted the same way. Published figure: 2.0 billion multiply-adds for
  BN-Inception (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
  Vision", Table 3; GoogLeNet 1.5). The difference is the stem: the BN paper's stem is a
  full 7x7 convolution (3 -> 64: 118,013,952), slim's separable pair costs 34,019,328;
  with the full convolution the count would be 2,018,851,840, the published 2.0 G.

`inception-v2-small` (28 x 28 x 1, 10 classes; Fashion-MNIST): the same layers at
depth_multiplier 1/8 with min_depth 8 (widths 8 .. 44; slim's min_depth 16 would make
most layers 16 wide and the step ~15% slower), and the first stem max pool (MaxPool_2a)
left out: 28 -> 14 (the 7x7/2 separable convolution, depthwise multiplier int(8 / 3) = 2)
-> 7 (MaxPool_3a) -> 4 (mixed_4a) -> 2 (mixed_5a), so the mixed blocks see 7 x 7, 4 x 4
and 2 x 2, a quarter of the reference's 28, 14 and 7 on each side, and the final average
is over 2 x 2. Keeping all five reductions would leave mixed_5b/5c at 1 x 1 (their 3x3
convolutions reduced to the centre tap); leaving out both stem pools (mixed_3b at 14 x 14)
triples the multiply-accumulates (6.7 M). Per example: 2,211,112 multiply-accumulates; 162,572 parameters with
batch norm (scale and shift), 161,324 without normalization. Group norm with its default
32 groups does not fit (the first slot, `conv2d_1a_7x7.pointwise`, has 8 channels, and
the error names it); every slot is a multiple of 4 channels, so 4 groups fit.

Step time of `inception-v2-small`, batch 128, PyTorch eager, float32, SGD (the project's
torch trainer): measured on this 2-core VM under load from other work (load average ~4),
so roughly: 110-125 ms of CPU time per step single-threaded with batch norm, 95-105 ms
without (time.process_time, torch.set_num_threads(1), 20 steps after 5 warm-up); cnn3
measured the same way takes 23-28 ms against the 9.8 ms recorded for it on the idle VM
(results/benchmarks/cpu), mobilenet-v1-small 97-105 ms (with batch norm). Scaled by
those, about 45-70 ms per step with batch norm and 40-60 ms without on the idle 2-core
VM. About 40 ms of CPU time (same conditions) is the dispatch cost of the 71 layers: the
same network at depth multiplier 0.03 (min_depth 4) takes that long.
"""

from __future__ import annotations

import functools
import math

from normbench.architectures.layers import Architecture

# slim's mixed blocks in order. Four-branch blocks: (branch 0 1x1, branch 1 1x1 -> 3x3,
# branch 2 1x1 -> 3x3 -> 3x3, branch 3 pool kind and its 1x1). Reductions: (branch 0
# 1x1 -> 3x3/2, branch 1 1x1 -> 3x3 -> 3x3/2), with a 3x3/2 max pool as branch 2.
BLOCKS = (
    ("mixed_3b", "inception", (64, (64, 64), (64, 96, 96), ("avg", 32))),
    ("mixed_3c", "inception", (64, (64, 96), (64, 96, 96), ("avg", 64))),
    ("mixed_4a", "reduction", ((128, 160), (64, 96, 96))),
    ("mixed_4b", "inception", (224, (64, 96), (96, 128, 128), ("avg", 128))),
    ("mixed_4c", "inception", (192, (96, 128), (96, 128, 128), ("avg", 128))),
    ("mixed_4d", "inception", (160, (128, 160), (128, 160, 160), ("avg", 96))),
    ("mixed_4e", "inception", (96, (128, 192), (160, 192, 192), ("avg", 96))),
    ("mixed_5a", "reduction", ((128, 192), (192, 256, 256))),
    ("mixed_5b", "inception", (352, (192, 320), (160, 224, 224), ("avg", 128))),
    ("mixed_5c", "inception", (352, (192, 320), (192, 224, 224), ("max", 128))),
)


def depth(channels: int, depth_multiplier: float, min_depth: int) -> int:
    """A layer's channels at `depth_multiplier`, as slim computes them: max(int(channels x
    depth_multiplier), min_depth)."""
    return max(int(channels * depth_multiplier), min_depth)


def stem_multiplier(depth_multiplier: float, min_depth: int) -> int:
    """The stem's depthwise multiplier, slim's min(int(depth(64) / 3), 8) (3 whatever the
    input channels)."""
    multiplier = min(int(depth(64, depth_multiplier, min_depth) / 3), 8)
    if multiplier < 1:
        raise ValueError(f"depth(64) = {depth(64, depth_multiplier, min_depth)} < 3 gives the stem's depthwise "
                         "convolution no channels (slim's formula); raise depth_multiplier or min_depth")
    return multiplier


def _inception(net, name, x, width, widths):
    b0, (b1a, b1b), (b2a, b2b, b2c), (pool, b3) = widths
    branch_0 = net.conv(f"{name}.branch_0.conv2d_0a_1x1", x, width(b0), kernel_size=1)
    branch_1 = net.conv(f"{name}.branch_1.conv2d_0a_1x1", x, width(b1a), kernel_size=1)
    branch_1 = net.conv(f"{name}.branch_1.conv2d_0b_3x3", branch_1, width(b1b), kernel_size=3)
    branch_2 = net.conv(f"{name}.branch_2.conv2d_0a_1x1", x, width(b2a), kernel_size=1)
    branch_2 = net.conv(f"{name}.branch_2.conv2d_0b_3x3", branch_2, width(b2b), kernel_size=3)
    branch_2 = net.conv(f"{name}.branch_2.conv2d_0c_3x3", branch_2, width(b2c), kernel_size=3)
    pooled = (net.avg_pool if pool == "avg" else net.max_pool)(x, 3, stride=1)
    branch_3 = net.conv(f"{name}.branch_3.conv2d_0b_1x1", pooled, width(b3), kernel_size=1)
    return net.concat([branch_0, branch_1, branch_2, branch_3])


def _reduction(net, name, x, width, widths, stride):
    (b0a, b0b), (b1a, b1b, b1c) = widths
    branch_0 = net.conv(f"{name}.branch_0.conv2d_0a_1x1", x, width(b0a), kernel_size=1)
    branch_0 = net.conv(f"{name}.branch_0.conv2d_1a_3x3", branch_0, width(b0b), kernel_size=3, stride=stride)
    branch_1 = net.conv(f"{name}.branch_1.conv2d_0a_1x1", x, width(b1a), kernel_size=1)
    branch_1 = net.conv(f"{name}.branch_1.conv2d_0b_3x3", branch_1, width(b1b), kernel_size=3)
    branch_1 = net.conv(f"{name}.branch_1.conv2d_1a_3x3", branch_1, width(b1c), kernel_size=3, stride=stride)
    branch_2 = net.max_pool(x, 3, stride=stride)
    return net.concat([branch_0, branch_1, branch_2])


def build(net, x, *, classes, depth_multiplier=1.0, min_depth=16, stem_strides=(2, 2, 2), reduction_strides=(2, 2)):
    """slim's `inception_v2`: `stem_strides` are those of conv2d_1a, max_pool_2a and
    max_pool_3a (a pool of stride 1 is left out), `reduction_strides` those of mixed_4a
    and mixed_5a."""
    def width(channels):
        return depth(channels, depth_multiplier, min_depth)

    conv_1a, pool_2a, pool_3a = stem_strides
    x = net.depthwise_conv("conv2d_1a_7x7.depthwise", x, kernel_size=7, stride=conv_1a,
                           multiplier=stem_multiplier(depth_multiplier, min_depth), normalize=False, activation=None,
                           bias=False)
    x = net.conv("conv2d_1a_7x7.pointwise", x, width(64), kernel_size=1)
    if pool_2a > 1:
        x = net.max_pool(x, 3, stride=pool_2a)
    x = net.conv("conv2d_2b_1x1", x, width(64), kernel_size=1)
    x = net.conv("conv2d_2c_3x3", x, width(192), kernel_size=3)
    if pool_3a > 1:
        x = net.max_pool(x, 3, stride=pool_3a)
    reductions = iter(reduction_strides)
    for name, kind, widths in BLOCKS:
        if kind == "inception":
            x = _inception(net, name, x, width, widths)
        else:
            x = _reduction(net, name, x, width, widths, next(reductions))
    # slim: AvgPool_1a (VALID, window min(map, 7)) on a map of at most 7 x 7: the global average.
    x = net.global_avg_pool(x)  # slim's Dropout_1b (keep_prob 0.8) goes here; not in the vocabulary yet
    return net.dense("logits", x, classes, normalize=False, activation=None)


def final_map(input_shape, stem_strides, reduction_strides) -> tuple[int, int]:
    """Spatial size before the final average pool (SAME padding: ceil(size / stride))."""
    size = tuple(input_shape[:2])
    for stride in (*stem_strides, *reduction_strides):
        size = tuple(math.ceil(n / stride) for n in size)
    return size


def inception_v2(name, description, *, input_shape=(224, 224, 3), classes=1000, depth_multiplier=1.0, min_depth=16,
                 stem_strides=(2, 2, 2), reduction_strides=(2, 2), small=False) -> Architecture:
    """An Inception-v2 configuration (slim's `depth_multiplier` and `min_depth`, and the
    strides of the stem's three and the two reductions' stride-2 steps)."""
    stem_multiplier(depth_multiplier, min_depth)
    final = final_map(input_shape, stem_strides, reduction_strides)
    if max(final) > 7:
        # slim's 7x7 VALID average pool would leave a map larger than 1 x 1 (spatial logits).
        raise ValueError(f"{name}: the final map is {final[0]} x {final[1]}; slim's 7x7 average pool needs "
                         "at most 7 x 7")
    return Architecture(name, tuple(input_shape), classes,
                        functools.partial(build, classes=classes, depth_multiplier=depth_multiplier,
                                          min_depth=min_depth, stem_strides=tuple(stem_strides),
                                          reduction_strides=tuple(reduction_strides)),
                        description, small)


ARCHITECTURES = [
    inception_v2("inception-v2", "Inception-v2 / BN-Inception (Ioffe & Szegedy 2015; TF-slim inception_v2, separable "
                 "7x7 stem, depth multiplier 1.0): 10 mixed blocks, 224 x 224 x 3, 1000 classes"),
    inception_v2("inception-v2-small", "Inception-v2 at depth multiplier 0.125 (at least 8 channels) for 28 x 28 x 1, "
                 "10 classes; the stem's first max pool left out (mixed blocks at 7, 4 and 2)",
                 input_shape=(28, 28, 1), classes=10, depth_multiplier=0.125, min_depth=8, stem_strides=(2, 1, 2),
                 small=True),
]
