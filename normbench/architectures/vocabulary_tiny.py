"""A test-sized network that uses every word of the layer vocabulary once or more, so that
the parity tests hold every primitive of `backends.base.Ops` to the same trajectory in
every backend: a strided stem, a depthwise convolution with ReLU6, a grouped 1x3
convolution on a residual branch, max and average pooling with SAME's asymmetric pads
(14 -> 7 at stride 2) and with symmetric ones (stride 1), channel concatenation, and
global average and max pooling. Not a network from a paper; `small`."""

from __future__ import annotations

from normbench.architectures.layers import Architecture


def build(net, x):
    x = net.conv("stem", x, 8, kernel_size=3, stride=2)  # 14 x 14 x 8
    x = net.depthwise_conv("depthwise", x, kernel_size=3, activation="relu6")
    branch = net.conv("grouped", x, 8, kernel_size=(1, 3), groups=2, activation=None)
    x = net.activation(net.add(x, branch), "relu")
    x = net.concat([net.max_pool(x, 3, stride=2), net.avg_pool(x, 3, stride=2)])  # 7 x 7 x 16, pads (0, 1)
    x = net.conv("mix", x, 8, kernel_size=1)
    x = net.concat([net.max_pool(x, 3, stride=1), net.avg_pool(x, 3, stride=1)])  # pads (1, 1)
    features = net.concat([net.global_avg_pool(x), net.global_max_pool(x)])  # 32
    return net.dense("logits", features, 10, normalize=False, activation=None)


ARCHITECTURES = [
    Architecture("vocab-tiny", (28, 28, 1), 10, build,
                 "a test-sized network using every layer of the vocabulary (grouped and depthwise convolution, "
                 "pooling, residual add, concatenation, ReLU6)", small=True),
]
