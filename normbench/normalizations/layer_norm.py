"""Layer normalization (Ba, Kiros & Hinton 2016): each example normalized over all of a
layer's units.

    y = (z - mu) / sqrt(var + epsilon) * scale + shift

with mu and the biased variance var per example over every unit of the layer: (H, W, C)
after a convolution (as in Ba et al. and in Wu & He 2018, where layer norm is group norm
with one group), C after a dense layer; `scale` (initially ones) and `shift` (zeros) are
learned per channel. Training and inference compute the same thing; there is no state.

`epsilon` defaults to 1e-3, the project's batch-norm default, so that the two differ
only in the axes they normalize over (PyTorch's and Ba et al.'s implementations use 1e-5).
"""

from __future__ import annotations

import numpy as np

from normbench.normalizations import PerExampleNormalization
from normbench.options import Option


class LayerNorm(PerExampleNormalization):
    name = "layer_norm"
    label = "layer norm"
    color = "#009E73"  # Okabe-Ito bluish green
    summary = "layer normalization: per-example statistics over all of a layer's units, per-channel scale and shift"
    literature = ("Independent of the batch; introduced for recurrent networks, where it speeds up training, with "
                  "batch norm still better in convolutional networks (Ba, Kiros & Hinton 2016, ConvNet experiments); "
                  "ResNet-50 on ImageNet: 25.3% error vs batch norm's 23.6% (Wu & He 2018, Table 1).")
    options = (
        Option("epsilon", "number", 1e-3, "added to the variance before the square root (1e-3: the project's "
               "batch-norm default; Ba et al. and PyTorch use 1e-5)", low=0.0, low_open=True),
    )

    def check_slot(self, slot):
        if int(np.prod(slot.shape)) < 2:
            return "the layer has a single unit, which normalizes to 0 whatever its input"
        return None

    def infer(self, ops, z, params, state, slot):
        return ops.group_normalize(z, 1, self.epsilon, params["scale"], params["shift"])  # one group: every unit


METHOD = LayerNorm
