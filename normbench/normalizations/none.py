"""No normalization: the layer's output plus its bias, y = z + b."""

from __future__ import annotations

import numpy as np

from normbench.normalizations import Normalization


class NoNormalization(Normalization):
    """y = z (the layer keeps its bias: y = W * x + b)."""

    name = "none"
    label = "no normalization"
    color = "#000000"  # black, as in the paper's figures
    summary = "no normalization: convolution or dense layer plus bias"
    shorthands = {"none": {}}
    literature = ("Without normalization, deep networks train more slowly at the same learning rate "
                  "(Ioffe & Szegedy 2015; the paper's Section 4.1 baseline).")

    def inference_affine(self, params, state, slot):
        return np.ones(slot.channels), np.zeros(slot.channels)


METHOD = NoNormalization
