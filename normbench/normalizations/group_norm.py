"""Group normalization (Wu & He 2018): each example's channels split into `groups`
groups of C / G consecutive channels, each group normalized on its own.

    y = (z - mu_g) / sqrt(var_g + epsilon) * scale + shift

with mu_g and the biased variance var_g per example and group over (H, W, C / G) after a
convolution, over the group's C / G units after a dense layer; `scale` (ones) and
`shift` (zeros) are learned per channel. Training and inference compute the same thing.
groups = 1 is layer norm; groups = C is instance norm.

`groups` defaults to 32, the paper's default (Section 3.1, Figure 7); the channel count
of every normalized layer must be a multiple of it. `epsilon` defaults to 1e-3, the
project's batch-norm default (the paper's code uses 1e-5).
"""

from __future__ import annotations

import numpy as np

from normbench.normalizations import PerExampleNormalization
from normbench.options import Option


class GroupNorm(PerExampleNormalization):
    name = "group_norm"
    label = "group norm"
    color = "#CC79A7"  # Okabe-Ito reddish purple
    summary = "group normalization: per-example statistics over groups of channels, per-channel scale and shift"
    literature = ("Independent of the batch size: ResNet-50 on ImageNet with 32 images per GPU is 0.5% worse than "
                  "batch norm, with 2 images per GPU 10.6% better (Wu & He 2018, Table 1 and Figure 1).")
    options = (
        Option("groups", "integer", 32, "number of channel groups; every normalized layer's channel count must be "
               "a multiple of it (32: the paper's default)", low=1),
        Option("epsilon", "number", 1e-3, "added to the variance before the square root (1e-3: the project's "
               "batch-norm default; the paper's code uses 1e-5)", low=0.0, low_open=True),
    )

    def check_slot(self, slot):
        if slot.channels % self.groups:
            return f"its {slot.channels} channels are not divisible by groups = {self.groups}"
        if int(np.prod(slot.shape)) // self.groups < 2:
            return (f"each of its {self.groups} groups holds a single unit per example, which normalizes to 0 "
                    f"whatever its input")
        return None

    def infer(self, ops, z, params, state, slot):
        return ops.group_normalize(z, self.groups, self.epsilon, params["scale"], params["shift"])


METHOD = GroupNorm
