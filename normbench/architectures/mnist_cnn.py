"""The paper's small CNN (Appendix A.1): 5x5 stride-2 convolutions with SAME padding,
each followed by a normalization slot and ReLU, then a dense layer to the classes."""

from __future__ import annotations

import functools

from normbench.architectures.layers import Architecture


def build(net, x, *, widths, kernel_size, classes):
    for k, channels in enumerate(widths, start=1):
        x = net.conv(f"conv{k}", x, channels, kernel_size=kernel_size[k - 1], stride=2)
    return net.dense("logits", x, classes, normalize=False, activation=None)


def cnn(name, widths, kernel_size, description, small=False, input_shape=(28, 28, 1), classes=10):
    return Architecture(name, input_shape, classes, functools.partial(build, widths=widths, kernel_size=kernel_size,
                                                                        classes=classes), description, small)


ARCHITECTURES = [
    cnn("cnn3", (32, 16, 8), (5, 5, 5), "the paper's MNIST CNN: 32, 16, 8 filters, 5x5, stride 2, ReLU (Appendix A.1)"),
    cnn("cnn-tiny", (4, 3), (5, 3), "a test-sized CNN: 4 and 3 filters (smoke tests, parity)", small=True),
]
