"""ResNet v1 (He et al. 2016a, "Deep residual learning for image recognition"), the
network of the paper's Appendix A.5 (ResNet-50 on ImageNet).

Reference configurations, 224 x 224 x 3, 1000 classes, matched layer by layer (names,
order, kernels, strides, shortcuts) to torchvision's `torchvision/models/resnet.py`
(pytorch/vision, torchvision 0.29.1 from PyPI; `ResNet`, `BasicBlock`, `Bottleneck`):

    conv1  7x7/2, 64 -> slot -> ReLU;  3x3/2 max pool
    layer1..layer4: blocks of 64, 128, 256, 512 (x4 outputs for bottlenecks);
                    stride 2 in the first block of layer2..layer4
    global average pool;  fc: dense 1000 (bias, no slot)

- resnet-18 / resnet-34: basic blocks (3x3 -> slot -> ReLU -> 3x3 -> slot), stages
  [2, 2, 2, 2] / [3, 4, 6, 3];
- resnet-50: bottleneck blocks (1x1 -> 3x3 -> 1x1 at 4x the width), stages [3, 4, 6, 3],
  with the stride of a downsampling block on its 3x3 convolution (`conv2`), as
  torchvision does ("ResNet v1.5"); He et al.'s original v1 (and Keras'
  `keras.applications.ResNet50`) put it on the first 1x1 convolution (`conv1`), which
  costs 3.86 instead of 4.09 GMACs with the same parameters. `stride_on="1x1"` builds v1.

Shortcuts are identities, except where the shape changes (the first block of a stage
with a stride or more channels): there a projection, a 1x1 convolution with the block's
stride and its own normalization slot (torchvision's `downsample`, He et al.'s option B).
Every slot whose output joins the shortcut (the last convolution of a block and the
projection) has `activation=None`; the ReLU follows the addition (`net.activation`).
Layer names are torchvision's module names: `conv1`, `layer2.0.conv1`,
`layer2.0.downsample`, `fc`. No dropout: neither torchvision nor He et al. have one.
The paper's ResNet-50 runs (Appendix A.5) used batch norm with a shift and no scale
(`batch_norm` with `scale = false`, 26,560 parameters fewer than the count below).

Counts, with `normbench.plan.architecture_counts` (per example), against torchvision's
published `num_params` and `_ops` (its docs' "GFLOPS", which are multiply-accumulates),
reproduced here by building torchvision's own `ResNet` classes (the file above, loaded
without the package's compiled ops) and summing `p.numel()` over `parameters()`, and
multiply-accumulates over forward hooks on every Conv2d (output elements x kh x kw x
in/groups) and Linear (in x out):

    network     batch_norm slots   torchvision      none in the slots   MACs (= torchvision, conv + fc)
    resnet-18   11,689,512         11,689,512       11,684,712          1,814,073,344 (1.81 G)
    resnet-34   21,797,672         21,797,672       21,789,160          3,663,761,408 (3.66 G)
    resnet-50   25,557,032         25,557,032       25,530,472          4,089,184,256 (4.09 G)

All exact. Batch norm: a scale and a shift per channel, no convolution bias; with `none`
every hidden convolution keeps a bias instead (half the batch-norm parameters). As a
second check, `keras.applications.ResNet50(weights=None)` (v1: biases on every
convolution) has 25,583,592 trainable parameters = 25,557,032 + 26,560 biases.

Not matched, with no effect on the counts: padding. The vocabulary has SAME and VALID
only; torchvision pads symmetrically (3 around the 7x7 stem, 1 around every 3x3 and the
max pool). Output sizes agree everywhere (112, 56, 28, 14, 7), but at stride 2 on an even
input SAME puts the odd padding pixel at the bottom/right (7x7 stem: (2, 3) instead of
(3, 3); 3x3: (0, 1) instead of (1, 1)), so windows are shifted by one pixel (what tf-slim's
`conv2d_same` pads explicitly to avoid). Initial weights are normbench's Glorot uniform,
not torchvision's Kaiming normal (fan_out) with unit BN scales.

Small configurations: the CIFAR ResNets of He et al. Section 4.2 (6n + 2 layers): a 3x3
stem of 16 filters, three stages of n basic blocks with 16, 32, 64 filters at strides 1,
2, 2, global average pool, dense. He et al. use identity shortcuts with zero-padded
channels there (option A), which the vocabulary cannot write (no zero channels); these
use the projection shortcut above (option B: two extra 1x1 convolutions with slots). On
28 x 28 x 1 inputs the stages run at 28, 14 and 7.

- resnet-small: n = 1 (8 layers) at half width (8, 16, 32 filters), Fashion-MNIST
  (28 x 28 x 1, 10 classes): 19,810 parameters with batch norm (19,642 with none),
  2.36 M multiply-accumulates per example. PyTorch eager, float32, batch 128, on the
  2-core CPU VM: about 35 ms per training step with no normalization and 45 ms with
  batch norm. Estimated, not clocked idle: the VM ran other jobs (load ~7 on 2 cores), so
  single-threaded steps were timed alternating with cnn3's in one process (best of 20:
  resnet-small 102 / 127 ms, cnn3 31 ms) and scaled by cnn3's idle 2-thread step,
  10 ms (results/benchmarks/cpu). At the paper's width 16 the same estimate gives
  ~80 / ~100 ms (9.3 M MACs), too close to 100 ms; hence width 8. `small`.
- resnet-20: n = 3 (20 layers), width 16, the same input (not small): 272,186 parameters
  with batch norm, 31.0 M multiply-accumulates. (He et al.'s option A at 32 x 32 x 3:
  269,722, their "0.27M".)

Group norm with its default 32 groups cannot fill the CIFAR configurations (conv1 has 8
channels in resnet-small, 16 in resnet-20); `architecture_counts` and spec validation
say so naming layer `conv1`. Every width of the reference configurations divides by 32.
"""

from __future__ import annotations

import functools

from normbench.architectures.layers import Architecture


def basic_block(net, name, x, channels, stride, project):
    out = net.conv(f"{name}.conv1", x, channels, kernel_size=3, stride=stride)
    out = net.conv(f"{name}.conv2", out, channels, kernel_size=3, activation=None)
    shortcut = net.conv(f"{name}.downsample", x, channels, kernel_size=1, stride=stride, activation=None) if project else x
    return net.activation(net.add(out, shortcut), "relu")


def bottleneck_block(net, name, x, channels, stride, project, stride_on="3x3"):
    """1x1 (channels) -> 3x3 (channels) -> 1x1 (4 x channels); the stride on the 3x3
    (torchvision, v1.5) or on the first 1x1 (He et al., v1)."""
    out = net.conv(f"{name}.conv1", x, channels, kernel_size=1, stride=stride if stride_on == "1x1" else 1)
    out = net.conv(f"{name}.conv2", out, channels, kernel_size=3, stride=stride if stride_on == "3x3" else 1)
    out = net.conv(f"{name}.conv3", out, 4 * channels, kernel_size=1, activation=None)
    shortcut = net.conv(f"{name}.downsample", x, 4 * channels, kernel_size=1, stride=stride,
                        activation=None) if project else x
    return net.activation(net.add(out, shortcut), "relu")


BLOCKS = {"basic": (basic_block, 1), "bottleneck": (bottleneck_block, 4)}


def _stages(net, x, in_channels, *, block, stages, widths, strides, stride_on):
    """Stages `layer1`, `layer2`, ... of `blocks` blocks each; the first block of a stage
    carries its stride and, where the shape changes, the projection shortcut."""
    fn, expansion = BLOCKS[block]
    if block == "bottleneck":
        fn = functools.partial(fn, stride_on=stride_on)
    channels_in = in_channels
    for k, (blocks, width, stride) in enumerate(zip(stages, widths, strides), start=1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            project = s != 1 or channels_in != width * expansion
            x = fn(net, f"layer{k}.{b}", x, width, s, project)
            channels_in = width * expansion
    return x


def build_imagenet(net, x, *, block, stages, classes, width=64, stride_on="3x3"):
    """torchvision's ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, average pool, fc."""
    x = net.conv("conv1", x, width, kernel_size=7, stride=2)
    x = net.max_pool(x, 3, stride=2)
    widths = tuple(width * 2 ** k for k in range(len(stages)))
    strides = (1,) + (2,) * (len(stages) - 1)
    x = _stages(net, x, width, block=block, stages=stages, widths=widths, strides=strides, stride_on=stride_on)
    return net.dense("fc", net.global_avg_pool(x), classes, normalize=False, activation=None)


def build_cifar(net, x, *, blocks, classes, width=16):
    """He et al. Section 4.2: 3x3 stem, three stages of `blocks` basic blocks at width,
    2 x width, 4 x width (strides 1, 2, 2), average pool, fc."""
    x = net.conv("conv1", x, width, kernel_size=3)
    x = _stages(net, x, width, block="basic", stages=(blocks,) * 3, widths=(width, 2 * width, 4 * width),
                strides=(1, 2, 2), stride_on="3x3")
    return net.dense("fc", net.global_avg_pool(x), classes, normalize=False, activation=None)


def imagenet_resnet(name, block, stages, description, *, input_shape=(224, 224, 3), classes=1000, width=64,
                    stride_on="3x3", small=False):
    build = functools.partial(build_imagenet, block=block, stages=tuple(stages), classes=classes, width=width,
                              stride_on=stride_on)
    return Architecture(name, tuple(input_shape), classes, build, description, small)


def cifar_resnet(name, blocks, description, *, input_shape=(28, 28, 1), classes=10, width=16, small=False):
    build = functools.partial(build_cifar, blocks=blocks, classes=classes, width=width)
    return Architecture(name, tuple(input_shape), classes, build, description, small)


ARCHITECTURES = [
    imagenet_resnet("resnet-18", "basic", (2, 2, 2, 2),
                    "ResNet-18 (He et al. 2016a), torchvision's resnet18: basic blocks [2, 2, 2, 2], 224 x 224 x 3, "
                    "1000 classes"),
    imagenet_resnet("resnet-34", "basic", (3, 4, 6, 3),
                    "ResNet-34 (He et al. 2016a), torchvision's resnet34: basic blocks [3, 4, 6, 3], 224 x 224 x 3, "
                    "1000 classes"),
    imagenet_resnet("resnet-50", "bottleneck", (3, 4, 6, 3),
                    "ResNet-50 (He et al. 2016a; the paper's Appendix A.5), torchvision's resnet50: bottleneck blocks "
                    "[3, 4, 6, 3], stride on the 3x3 (v1.5), 224 x 224 x 3, 1000 classes"),
    cifar_resnet("resnet-20", 3,
                 "CIFAR-style ResNet-20 (He et al. 2016a Section 4.2): 3 stages of 3 basic blocks, 16/32/64 filters, "
                 "projection shortcuts, 28 x 28 x 1"),
    cifar_resnet("resnet-small", 1,
                 "a small CIFAR-style ResNet-8 (He et al. 2016a Section 4.2, n = 1) at half width: 8/16/32 filters, "
                 "projection shortcuts, 28 x 28 x 1 (Fashion-MNIST)", width=8, small=True),
]
