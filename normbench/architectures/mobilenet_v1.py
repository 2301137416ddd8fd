"""MobileNet-v1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks
for Mobile Vision Applications", Table 1): a 3x3 stride-2 convolution to 32 channels,
then 13 depthwise-separable blocks -- a 3x3 depthwise convolution with its own
normalization slot and ReLU6, then a 1x1 pointwise convolution with its slot and ReLU6 --
global average pooling and a linear classifier. The paper trains it with ReLU6 and batch
norm (scale and shift) after every convolution (Appendix A.6), and for Figure 7 with group
norm of 32 groups in the same slots.

Matched layer by layer against Keras, `keras/src/applications/mobilenet.py`
(keras-team/keras, Keras 3.15; `tf.keras.applications.MobileNet(alpha=1.0,
weights=None)`), built in this repository's venv and compared layer by layer:

- `conv1` 3x3/2 conv, no bias, BN, ReLU6;
- `conv_dw_<k>` 3x3 depthwise conv (depth multiplier 1, no bias), BN, ReLU6, then
  `conv_pw_<k>` 1x1 conv (no bias), BN, ReLU6, for k = 1..13 with pointwise widths
  64, 128 (stride 2), 128, 256 (/2), 256, 512 (/2), 512 x 5, 1024 (/2), 1024; each
  width is int(width x alpha), as Keras computes it;
- global average pool, then `conv_preds`, a 1x1 conv with bias on the pooled 1 x 1 map:
  exactly a dense layer with bias, which is what `logits` is here.

Padding: Keras pads the stride-2 depthwise convolutions with ZeroPadding2D((0, 1),
(0, 1)) and runs them `valid`; the stem is `same`. For a 3x3 stride-2 window over an
even size n, TensorFlow's SAME pads (n/2 - 1) x 2 + 3 - n = 1 pixel, at the bottom/right:
the same (0, 1). Every stride-2 layer of the reference sees an even size (224, 112, 56,
28, 14), so `padding="same"` throughout reproduces Keras exactly; the test checks the
declared pads are ((0, 1), (0, 1)) on all five of them.

Counts of `mobilenet-v1` (224 x 224 x 3, 1000 classes, alpha = 1.0), checked by the tests:

- batch norm (scale and shift) in every slot: 4,231,976 parameters, equal to Keras'
  trainable parameters (`sum of model.trainable_weights`, 4,253,864 with the 21,888
  moving means and variances, which are state here); Howard et al. Table 4 and 8: 4.2
  million;
- no normalization: 4,221,032 (every hidden conv keeps a bias instead, 10,944 of them,
  half the 21,888 scales and shifts);
- 568,740,352 multiply-accumulates (conv and dense layers; the classifier's 1,024,000
  included). Howard et al. Table 4 and 8 give 569 million mult-adds: the same count,
  rounded (their Table 2 breaks it down as 95% in the 1x1 convolutions).

Without normalization, at the project's Glorot-uniform initialization (Keras' default for
these layers too), activations shrink ~20x per block: on MNIST the pre-activations of
block 13 are ~1e-17 and the kernels' gradients ~1e-18, so the network does not train --
as the paper found for MobileNet-v1 without batch norm (Section 4.5).

Dropout: Keras (and tf-slim's `mobilenet_v1.py`) applies dropout (Keras: rate 1e-3,
tf-slim: keep_prob 0.999) to the pooled features, between `global_avg_pool` and
`logits`. The vocabulary has no dropout yet, so the network here omits it; it goes there.

`mobilenet-v1-small` (28 x 28 x 1, 10 classes; Fashion-MNIST) is the reference network,
all 13 blocks, at alpha = 0.25 with a minimum width of 32 channels (tf-slim's
`min_depth` rule, max(int(d x alpha), min_depth); tf-slim's default is 8), and block 12
at stride 1:

- widths: 32 (stem), pointwise 32, 32, 32, 64, 64, 128 x 6, 256 x 2 (alpha = 0.25 alone
  gives 8 for the stem and block 1's depthwise, 16 for block 1's pointwise and block 2's
  depthwise; the minimum raises them to 32). So every slot's channel count is a multiple
  of 32 and group norm with its default 32 groups (Figure 7's setting) fills every slot;
- maps: 28 -> 14 (stem) -> 7 (block 2) -> 4 (block 4) -> 2 (block 6), and blocks 12-13
  stay at 2 x 2. The reference's six strides take 224 to 7 x 7; on 28 x 28 they would
  take blocks 12-13 to 1 x 1, where batch norm has only the batch to normalize over
  (at Figure 7's 2 images per core it outputs about +-1 whatever its input) and a 3x3
  depthwise kernel sees only its centre tap. With that last stride (1,044,416
  multiply-accumulates) the loss after 2-3 training steps at batch 8 was 40-100x more
  sensitive to a 1e-12 change of the weights, and float64 backends parted beyond 1e-9
  within 3 steps (7e-11 with it dropped). Larger maps earlier cost more than a
  100 ms step allows: dropping block 2's stride as well (final map 4 x 4) takes 4.3 M
  multiply-accumulates, the stem's instead 5.3 M, both (7 x 7, like the reference) 14.4 M
  (block 2's alone, keeping block 12's, 3.1 M: ~90 ms estimated). Pass `blocks=` and `stem_stride=` to `mobilenet_v1` for other
  choices;
- block 4 halves an odd 7 x 7 map: SAME pads it (1, 1) to 4 x 4, where Keras'
  ZeroPadding2D((0, 1), (0, 1)) + valid would give 3 x 3 (the two agree on even sizes
  only, which is all the reference has);
- 1,349,696 multiply-accumulates and 217,642 parameters (batch norm; 214,826 with none)
  per example.

One training step at batch 128 in PyTorch eager (float32, CPU, 2 threads, SGD with
momentum, the project's torch trainer), on the 2-core VM nearly idle (load ~1.7; cnn3
timed alongside at 12-15 ms against its recorded idle 10-14 ms, results/benchmarks/cpu):
about 62 ms with batch norm and 55 ms with none (medians of 25 steps after 5 warm-up,
two runs). The cost is mostly the per-layer overhead of 27 slots, not arithmetic: with
block 12's stride kept the step was only ~10-15% cheaper.
"""

from __future__ import annotations

import functools

from normbench.architectures.layers import Architecture

# (pointwise channels, stride of the depthwise convolution) of the 13 blocks (Table 1).
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))
STEM_CHANNELS = 32


def width(channels: int, alpha: float, min_depth: int) -> int:
    """A layer's channels at width multiplier `alpha`: int(channels x alpha) as Keras
    computes it, at least `min_depth` (tf-slim's rule)."""
    return max(int(channels * alpha), min_depth)


def build(net, x, *, classes, alpha=1.0, min_depth=1, stem_stride=2, blocks=BLOCKS):
    x = net.conv("conv1", x, width(STEM_CHANNELS, alpha, min_depth), kernel_size=3, stride=stem_stride,
                 activation="relu6")
    for k, (channels, stride) in enumerate(blocks, start=1):
        x = net.depthwise_conv(f"conv_dw_{k}", x, kernel_size=3, stride=stride, activation="relu6")
        x = net.conv(f"conv_pw_{k}", x, width(channels, alpha, min_depth), kernel_size=1, activation="relu6")
    x = net.global_avg_pool(x)  # Keras and tf-slim apply dropout here (rate 1e-3); not in the vocabulary yet
    return net.dense("logits", x, classes, normalize=False, activation=None)


def mobilenet_v1(name, description, *, input_shape=(224, 224, 3), classes=1000, alpha=1.0, min_depth=1,
                 stem_stride=2, blocks=BLOCKS, small=False) -> Architecture:
    """A MobileNet-v1 configuration: width multiplier `alpha` (with a floor of `min_depth`
    channels), the stem's stride and the 13 blocks' (pointwise channels, stride)."""
    return Architecture(name, tuple(input_shape), classes,
                        functools.partial(build, classes=classes, alpha=alpha, min_depth=min_depth,
                                          stem_stride=stem_stride, blocks=tuple(blocks)),
                        description, small)


# The reference blocks with block 12 at stride 1: 28 x 28 inputs end at 2 x 2, not 1 x 1.
SMALL_BLOCKS = tuple((channels, 1 if k == 12 else stride) for k, (channels, stride) in enumerate(BLOCKS, start=1))

ARCHITECTURES = [
    mobilenet_v1("mobilenet-v1", "MobileNet-v1 1.0-224 (Howard et al. 2017; Keras applications.MobileNet): "
                 "3x3/2 conv 32, 13 depthwise-separable blocks, ReLU6, global average pool, 1000 classes"),
    mobilenet_v1("mobilenet-v1-small", "MobileNet-v1 at alpha 0.25 (at least 32 channels) for 28 x 28 x 1, "
                 "10 classes (Fashion-MNIST); block 12 at stride 1 (final map 2 x 2)", input_shape=(28, 28, 1),
                 classes=10, alpha=0.25, min_depth=32, blocks=SMALL_BLOCKS, small=True),
]
