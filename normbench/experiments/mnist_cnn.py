"""Figure 1: the 3-layer CNN on MNIST, no normalization vs batch norm vs the standardization
loss (paper Section 4.1). Reported by the shared curves report."""

from __future__ import annotations

from normbench.experiments import MNIST_NOTES, Experiment, PaperValue

EXPERIMENT = Experiment(
    name="mnist-cnn", spec="mnist-cnn", figure="Figure 1",
    title="3-layer CNN on MNIST, 1000 SGD steps at learning rate 1e-3 (paper Section 4.1, Figure 1)",
    paper_test_accuracy={
        "none": PaperValue(24.6, 6.5, "Section 4.1"),
        "batch_norm": PaperValue(85.6, 1.1, "Section 4.1"),
        "standardization_loss": PaperValue(75.2, 2.6, "Section 4.1"),
    },
    notes=MNIST_NOTES,
    default_backends=("torch", "jax", "tensorflow"),
)
