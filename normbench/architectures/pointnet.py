"""PointNet classification (Qi et al. 2017a, "PointNet: Deep learning on point sets for 3D
classification and segmentation"), the network of the paper's Appendix A.3.

Written after the authors' TensorFlow code (charlesq34/pointnet, `models/pointnet_cls.py`
and `models/transform_nets.py`). Points are an (P, 1, 3) image, so a shared per-point
layer is a 1 x 1 convolution:

    input transform:   T-Net(3)  -> 3 x 3 matrix;   points <- points @ matrix
    shared MLP:        conv1 64, conv2 64
    feature transform: T-Net(64) -> 64 x 64 matrix; features <- features @ matrix
                       + 0.001 x 0.5 ||A A^T - I||^2 (the orthogonality loss, summed over the batch)
    shared MLP:        conv3 64, conv4 128, conv5 1024
    global max pool over the points
    fc1 512 -> dropout 0.3 -> fc2 256 -> dropout 0.3 -> logits (no slot)

    T-Net(K): conv 64, 128, 1024 per point, max pool, fc 512, fc 256 (each with a slot),
              then a dense K * K regressor without a slot whose kernel starts at zero and
              bias at the flattened identity, so every transform starts as the identity.

Every hidden layer (the T-Nets' included) has a normalization slot, as the authors' code
puts batch norm on each. Their loss weights the orthogonality term by 0.001 and takes
`tf.nn.l2_loss`, half the squared Frobenius norm summed over the batch; their dropout keeps
70% (rate 0.3) after fc1 and fc2.

Counts (`normbench models`; per example, 1024 points, 40 classes): 443,822,336
multiply-accumulates (the paper's Table 6 quotes 440 M FLOPs, which are multiply-
accumulates, and 3.5 M parameters); 3,473,969 parameters with batch_norm (a scale and a
shift per channel, no bias before it), 3,467,889 with none. The authors' code keeps a bias
before every batch norm: 3,473,969 + 6,080 such biases = 3,480,049 trainable parameters.
That last number is summed from their layer list (their TF1 code does not run here), and
`tests/test_arch_pointnet.py` holds all three.

Small configuration for MNIST point clouds (512 points, 10 classes; PointNet++'s
supplementary B.3): every width divided by 4 (conv 16, 16 | 16, 32, 256; fc 128, 64;
T-Nets 16, 32, 256 | 128, 64), the transforms and losses unchanged.
"""

from __future__ import annotations

import functools

from normbench.architectures.layers import Architecture

FEATURE_TRANSFORM_WEIGHT = 0.001  # the authors' reg_weight
DROPOUT_RATE = 0.3  # the authors' keep_prob 0.7


def _scaled(channels: int, width: float) -> int:
    return max(int(channels * width), 1)


def _transform_net(net, name: str, x, size: int, width: float):
    """A T-Net: a K x K matrix per example, regressed from the points (or features) x."""
    for k, channels in enumerate((64, 128, 1024), start=1):
        x = net.conv(f"{name}.conv{k}", x, _scaled(channels, width), kernel_size=1)
    x = net.global_max_pool(x)
    x = net.dense(f"{name}.fc1", x, _scaled(512, width))
    x = net.dense(f"{name}.fc2", x, _scaled(256, width))
    x = net.dense(f"{name}.transform", x, size * size, normalize=False, activation=None, kernel_init="zeros",
                  bias_init="identity")
    return net.matrix(x, size)


def build(net, x, *, classes, coordinates=3, width=1.0, dropout=DROPOUT_RATE,
          feature_transform_weight=FEATURE_TRANSFORM_WEIGHT):
    x = net.point_transform(x, _transform_net(net, "input_transform", x, coordinates, width))
    x = net.conv("conv1", x, _scaled(64, width), kernel_size=1)
    x = net.conv("conv2", x, _scaled(64, width), kernel_size=1)
    features = _scaled(64, width)
    matrix = _transform_net(net, "feature_transform", x, features, width)
    net.orthogonality_loss("feature_transform", matrix, feature_transform_weight)
    x = net.point_transform(x, matrix)
    x = net.conv("conv3", x, _scaled(64, width), kernel_size=1)
    x = net.conv("conv4", x, _scaled(128, width), kernel_size=1)
    x = net.conv("conv5", x, _scaled(1024, width), kernel_size=1)
    x = net.global_max_pool(x)
    x = net.dense("fc1", x, _scaled(512, width))
    x = net.dropout("dropout1", x, dropout)
    x = net.dense("fc2", x, _scaled(256, width))
    x = net.dropout("dropout2", x, dropout)
    return net.dense("logits", x, classes, normalize=False, activation=None)


def pointnet(name, description, *, points=1024, classes=40, width=1.0, small=False) -> Architecture:
    """A PointNet configuration: `points` x 3 inputs (stored (points, 1, 3)), `classes`, and a
    width multiplier on every layer."""
    return Architecture(name, (points, 1, 3), classes,
                        functools.partial(build, classes=classes, coordinates=3, width=width), description, small)


ARCHITECTURES = [
    pointnet("pointnet", "PointNet classification (Qi et al. 2017a; the authors' pointnet_cls): input and feature "
             "T-Nets, shared MLPs 64, 64 | 64, 128, 1024, max pool, fc 512, 256 with dropout 0.3, 1024 points, "
             "40 classes (ModelNet40)"),
    pointnet("pointnet-small", "PointNet at width 1/4 for MNIST point clouds: 512 points, 10 classes",
             points=512, classes=10, width=0.25, small=True),
]
