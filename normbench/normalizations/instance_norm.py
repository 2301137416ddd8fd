"""Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016): each example's channels
normalized over their spatial positions.

    y = (z - mu_nc) / sqrt(var_nc + epsilon) * scale + shift

with mu_nc and the biased variance var_nc per example and channel over (H, W); `scale`
(ones) and `shift` (zeros) are learned per channel. Training and inference compute the
same thing (the paper's point: statistics of the instance at test time too). Only
convolutional layers can be normalized this way: a dense layer's channel has one value
per example.

`epsilon` defaults to 1e-3, the project's batch-norm default (PyTorch uses 1e-5).
"""

from __future__ import annotations

import numpy as np

from normbench.normalizations import PerExampleNormalization
from normbench.options import Option


class InstanceNorm(PerExampleNormalization):
    name = "instance_norm"
    label = "instance norm"
    color = "#E69F00"  # Okabe-Ito orange
    summary = "instance normalization: per-example, per-channel statistics over spatial positions (convolutions only)"
    literature = ("Introduced for fast image stylization, where it improves the generated images (Ulyanov, Vedaldi & "
                  "Lempitsky 2016); for classification it trails batch norm: ResNet-50 on ImageNet 28.4% error vs "
                  "23.6% (Wu & He 2018, Table 1).")
    options = (
        Option("epsilon", "number", 1e-3, "added to the variance before the square root (1e-3: the project's "
               "batch-norm default; PyTorch uses 1e-5)", low=0.0, low_open=True),
    )

    def check_slot(self, slot):
        if not slot.spatial:
            return ("instance norm normalizes each channel over its spatial positions and a dense layer has none "
                    "(layer_norm or group_norm normalize dense layers)")
        if int(np.prod(slot.shape[:-1])) < 2:
            return "its output has a single spatial position, which normalizes to 0 whatever its input"
        return None

    def infer(self, ops, z, params, state, slot):
        channels = ops.shape(z)[-1]  # a group per channel: its spatial positions
        return ops.group_normalize(z, channels, self.epsilon, params["scale"], params["shift"])


METHOD = InstanceNorm
