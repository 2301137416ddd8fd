"""Weight normalization (Salimans & Kingma 2016): the kernel's direction and length, learned apart.

    w = g * v / ||v||        per output channel; ||v|| over every other kernel axis
                             (kh, kw, in for a convolution; in for a dense layer)
    y = conv(x, w) + b       the layer keeps its bias; nothing normalizes activations

`v` is the stored kernel `<layer>/kernel`, `g` the per-output-channel gain `<layer>/gain`.
The gain starts at ||v0||, the norm of the initial kernel, so the initial network computes
exactly what the un-normalized network (`none`) computes from the same kernels: a
data-independent initialisation. The paper also proposes a data-dependent one (g and b
set from a first batch's pre-activation statistics so that they start standardized);
normbench does not use it, so every variant of a seed starts from the same function.

Weight decay applies to `<layer>/kernel` (v) only, as to every kernel (the project's
rule); the gain, like biases and norm parameters, is not decayed. Since w does not
depend on ||v||, decaying v only shrinks ||v||, which raises the effective learning rate
of the direction.
"""

from __future__ import annotations

import numpy as np

from normbench.normalizations import Normalization


class WeightNorm(Normalization):
    name = "weight_norm"
    label = "weight norm"
    summary = "weight normalization: each output channel's kernel is g * v / ||v||; the layer keeps its bias"
    literature = ("A reparameterization that speeds up SGD like batch norm, without batch dependence and at a "
                  "fraction of its cost (Salimans & Kingma 2016).")

    def kernel_parameter_names(self, slot):
        return ("gain",)

    def kernel_parameters(self, slot, kernel):
        axes = tuple(range(kernel.ndim - 1))  # canonical kernel: output channel last
        return {"gain": np.sqrt(np.sum(np.asarray(kernel, np.float64) ** 2, axis=axes))}

    def kernel(self, ops, kernel, params):
        squared_norm = ops.kernel_mean(kernel * kernel) * ops.kernel_count(kernel)
        return kernel * (ops.output_channels(params["gain"], kernel) * ops.rsqrt(squared_norm))


METHOD = WeightNorm
