"""Weight standardization (Qiao et al. 2019), followed by another method in the slot.

    w_hat = (w - mean(w)) / sqrt(var(w) + epsilon)    per output channel, over every
                                                      other kernel axis (kh, kw, in; or in)
    y     = then(conv(x, w_hat))                      `then` fills the normalization slot

with var the biased variance (the paper's equation: sigma = sqrt(mean(w^2) - mean(w)^2 +
epsilon)). The paper pairs it with an activation normalization, usually group norm:

    normalization = { name = "weight_standardization", then = { name = "group_norm", groups = 4 } }

and its authors' README warns to standardize only layers followed by one; `then`
defaults to `none` (the layer then keeps its bias), which is allowed but untested by the
paper. Everything about the slot (parameters, state, training and inference forms,
whether the layer keeps its bias, which layers and batches it accepts) is `then`'s; a
`then` that reparameterizes kernels too (weight_norm) applies to the standardized kernel.

`epsilon` defaults to 1e-5, the constant of the authors' code. Their code adds it to the
*standard deviation*, (w - mean) / (std + 1e-5), and PyTorch's std there is the unbiased
one; normbench follows the paper's formula (epsilon inside the square root, biased
variance), so it differs from that code by ~1e-5 relative plus a factor
sqrt(n / (n - 1)) per channel, which `then`'s normalization removes anyway. Dense layers
are standardized as well as convolutions (the paper treats only convolutions).
"""

from __future__ import annotations

import numpy as np

from normbench.normalizations import Normalization
from normbench.options import Option


class WeightStandardization(Normalization):
    name = "weight_standardization"
    label = "weight standardization"
    summary = "weight standardization: zero-mean, unit-variance kernel per output channel, then another method"
    literature = ("With group norm and 1-2 images per GPU, matches or beats batch norm trained with large batches "
                  "on ImageNet and COCO (Qiao et al. 2019).")
    options = (
        Option("then", "method", "none", "the normalization method applied to the layer's output "
               "(usually group_norm)"),
        Option("epsilon", "number", 1e-5, "added to each output channel's kernel variance before the square root "
               "(1e-5: the authors' code's constant)", low=0.0, low_open=True),
    )

    def __init__(self, **options):
        super().__init__(**options)
        if not isinstance(self.then, Normalization):  # built directly, not from a spec: a name
            from normbench import normalizations

            self.then = normalizations.get(self.then)()
            self.settings["then"] = self.then

    # ---- the kernel: standardized
    def kernel(self, ops, kernel, params):
        mean, var = ops.kernel_moments(kernel)
        return self.then.kernel(ops, (kernel - mean) * ops.rsqrt(var + self.epsilon), params)

    def standardized(self, kernel: np.ndarray) -> np.ndarray:
        """`kernel` on canonical float64 NumPy (HWIO or (in, out)) as `kernel` computes it."""
        axes = tuple(range(kernel.ndim - 1))
        mean = kernel.mean(axis=axes, keepdims=True)
        var = ((kernel - mean) ** 2).mean(axis=axes, keepdims=True)
        return (kernel - mean) / np.sqrt(var + self.epsilon)

    # ---- the slot: `then`'s
    def check_slot(self, slot):
        return self.then.check_slot(slot)

    def check_batch(self, batch_size, slot):
        return self.then.check_batch(batch_size, slot)

    @property
    def provides_offset(self):
        return self.then.provides_offset

    def parameters(self, slot):
        return self.then.parameters(slot)

    def kernel_parameter_names(self, slot):
        return self.then.kernel_parameter_names(slot)

    def kernel_parameters(self, slot, kernel):
        # A `then` that reparameterizes the kernel too (weight_norm) sees the standardized one.
        return self.then.kernel_parameters(slot, self.standardized(np.asarray(kernel, np.float64)))

    def state(self, slot):
        return self.then.state(slot)

    def train(self, ops, z, params, state, slot):
        return self.then.train(ops, z, params, state, slot)

    def infer(self, ops, z, params, state, slot):
        return self.then.infer(ops, z, params, state, slot)


METHOD = WeightStandardization
