"""The standardization loss (the paper's equation 2), summed over layers.

For each slot, KL(N(mu, diag sigma^2) || N(0, I)) = 0.5 * sum_i (mu_i^2 + sigma_i^2
- log(sigma_i^2 + log_epsilon) - 1), with mu_i and the biased (maximum-likelihood)
variance sigma_i^2 per channel over the batch and spatial positions, computed the way
batch norm computes them (Section 3). `log_epsilon` keeps the log finite for a channel
whose variance is exactly zero (a dead input).

`replica_batch_size = n` computes the loss over each sub-batch of n examples separately
and averages it over the sub-batches, as per-core moments on the paper's TPUs did
(Appendix A.6: gradients averaged across cores are the gradients of the mean loss).
"""

from __future__ import annotations

import numpy as np

from normbench.auxiliary_losses import WEIGHT, AuxiliaryLoss, combine_moments
from normbench.options import Option


class Standardization(AuxiliaryLoss):
    name = "standardization"
    label = "standardization loss"
    color = "#D55E00"  # vermillion, the paper's red
    summary = "KL divergence of each layer's per-channel statistics to N(0, 1) (the paper's equation 2)"
    metric_column = "std_loss"
    options = (
        WEIGHT,
        Option("log_epsilon", "number", 1e-8, "log(var + log_epsilon) in equation (2)", low=0.0, low_open=True),
        Option("replica_batch_size", "integer", None, "average the loss over independent sub-batches of this "
               "many examples (per-core statistics); none: the whole batch", low=1, optional=True),
    )
    normalization_shorthands = {"standardization_loss": "standardization_loss_weight"}
    # Specs before plugins kept log_epsilon in a top-level [standardization_loss] table, part of every run key.
    legacy_table = "standardization_loss"
    legacy_table_fields = ("log_epsilon",)
    # The paper's subject: its value is a metrics.csv column of every run, trained with it or not.
    always_reported = True
    literature = ("Accelerates training over no normalization, less than batch norm, and needs no normalization at "
                  "inference (Collins, Ballé & Shlens 2019).")
    # Measured 8.0e-8 between backends and 3.4e-8 against float64 (cnn3 and mlp3, every
    # normalization, seeds 0-2), relative to `parity_magnitude`.
    parity_float32_tolerance = 1e-6

    def check_batch(self, batch_size, slot):
        n = self.replica_batch_size or batch_size
        if batch_size % n:
            return f"batch_size {batch_size} is not a multiple of replica_batch_size {n}"
        return None

    def value(self, ops, taps):
        if self.replica_batch_size is None:
            return ops.standardization_loss(list(taps.values()), self.log_epsilon)
        total = 0.0
        for z in taps.values():
            shape = ops.shape(z)
            replicas = shape[0] // self.replica_batch_size
            grouped = ops.reshape(z, (replicas, self.replica_batch_size, *shape[1:]))
            mean, var = ops.moments(grouped, tuple(range(1, len(shape))))  # (replicas, channels)
            total = total + ops.standard_normal_kl(mean, var, self.log_epsilon) / replicas
        return total

    def chunk_statistics(self, ops, tap):
        return ops.channel_moments(tap)

    def combine(self, parts):
        return combine_moments([(m, v, n) for (m, v), n in parts])

    def value_from_statistics(self, statistics):
        return loss_numpy(statistics, self.log_epsilon)

    @classmethod
    def parity_magnitude(cls, moments, log_epsilon):
        # Every channel's var - log var - 1 cancels to ~0 when var ~ 1 (any batch-normalized
        # layer), so the value understates the numbers rounded to compute it: the summed
        # magnitudes of equation (2)'s terms, 0.5 * sum(mean^2 + var + |log(var + eps)| + 1).
        return float(sum(0.5 * np.sum(m * m + v + np.abs(np.log(v + log_epsilon)) + 1.0) for m, v in moments.values()))


def loss_numpy(moments: dict[str, tuple[np.ndarray, np.ndarray]], log_epsilon: float) -> float:
    """Equation (2) in float64 NumPy, summed over layers (evaluation metrics, tests' reference)."""
    return float(sum(0.5 * np.sum(m * m + v - np.log(v + log_epsilon) - 1.0) for m, v in moments.values()))


LOSS = Standardization
