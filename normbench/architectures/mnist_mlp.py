"""The paper's small MLP (Appendix A.2): dense layers, each followed by a normalization
slot and ReLU, then a dense layer to the classes."""

from __future__ import annotations

import functools

from normbench.architectures.layers import Architecture


def build(net, x, *, widths, classes):
    x = net.flatten(x)
    for k, units in enumerate(widths, start=1):
        x = net.dense(f"dense{k}", x, units)
    return net.dense("logits", x, classes, normalize=False, activation=None)


def mlp(name, widths, description, small=False, input_shape=(28, 28, 1), classes=10):
    return Architecture(name, input_shape, classes, functools.partial(build, widths=widths, classes=classes),
                        description, small)


ARCHITECTURES = [
    mlp("mlp3", (100, 100, 100), "the paper's MNIST MLP: 3 layers of 100 units, ReLU (Appendix A.2)"),
    mlp("mlp-tiny", (8, 6), "a test-sized MLP: 8 and 6 units (smoke tests, parity)", small=True),
]
