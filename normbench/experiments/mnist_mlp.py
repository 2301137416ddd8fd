"""Figure 3: the 3-layer MLP (100 units) on MNIST (paper Section 4.1). Reported by the
shared curves report; the paper states no numbers for it."""

from __future__ import annotations

from normbench.experiments import MNIST_NOTES, Experiment

EXPERIMENT = Experiment(
    name="mnist-mlp", spec="mnist-mlp", figure="Figure 3",
    title="3-layer MLP (100 units) on MNIST, 1000 SGD steps at learning rate 1e-3 (paper Section 4.1, Figure 3)",
    notes=MNIST_NOTES + (
        "The paper states no MLP numbers in its text (Figure 3 only), so there is no paper column. Its claims: "
        "the standardization loss reaches lower cross entropy and higher accuracy than no normalization, "
        "but does not accelerate training as much as batch norm.",
    ),
    default_backends=("torch", "jax", "tensorflow"),
)
