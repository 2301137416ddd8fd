"""The decorrelation loss: the standardization loss with a full covariance, summed over layers.

For each slot, with its output's channel mean mu (k values), biased covariance S (k x k)
over the batch and spatial positions, and k channels:

    KL(N(mu, S) || N(0, I)) = 0.5 * (tr S + mu^T mu - k - log det(S + epsilon I))

It pushes each layer's pre-activations towards zero mean, unit variance *and* zero
correlation between channels: the extension the paper's Discussion proposes (Collins,
Ballé & Shlens 2019, Discussion: penalizing the full covariance, as decorrelated batch
norm (Huang et al. 2018) normalizes with it). With S diagonal it is the standardization
loss (equation 2) with log_epsilon = epsilon.

`epsilon` keeps log det finite: a dead channel (a ReLU input that is 0 for every example
in the batch, or a constant one) has zero variance, which makes S singular, and any batch
with fewer values per channel than channels (n <= k) does too. It is added only inside
log det, as the standardization loss adds its log_epsilon only inside the log.
log det comes from a Cholesky factorization (`Ops.log_det_spd`), which every backend
differentiates. The cost is O(n k^2) for S and O(k^3) for the factorization per layer.

Precision. A layer with more channels than values per output (cnn3's conv1: 32 channels
from 5 x 5 x 1 = 25 inputs) has a covariance of lower rank, whose null directions reach
log det only through epsilon. After batch norm, ||S|| ~ 10 and float32 does not resolve S
at epsilon's scale: on cnn3, batch 20, rounding the exact S to float32 moved log det by
1.5e-3 and a float32 Cholesky of it by 6.3e-3, and float32 runs differed from float64
(and from each other) by 3e-4 to 9e-4 of the loss and up to 3e-2 of conv1's kernel
gradient, beyond `normbench parity`'s float32 bounds. Such specs are reproducible in
float64 (`dtype = "float64"`; the same spec agrees there to parity's 1e-9).
"""

from __future__ import annotations

import numpy as np

from normbench.auxiliary_losses import WEIGHT, AuxiliaryLoss
from normbench.options import Option


class Decorrelation(AuxiliaryLoss):
    name = "decorrelation"
    label = "decorrelation loss"
    summary = "KL divergence of each layer's full-covariance Gaussian (mean, channel covariance) to N(0, I)"
    metric_column = "decorrelation_loss"
    options = (
        WEIGHT,
        Option("epsilon", "number", 1e-5, "log det(S + epsilon I): keeps a dead channel's zero variance from "
               "making the log determinant -inf", low=0.0, low_open=True),
    )
    literature = ("Proposed in the paper's Discussion as the full-covariance extension of the standardization "
                  "loss (Collins, Ballé & Shlens 2019); untested there.")

    def value(self, ops, taps):
        total = 0.0
        for z in taps.values():
            mean, covariance, centered = _moments(ops, z)
            channels = ops.shape(mean)[0]
            trace = ops.sum(centered * centered) / ops.shape(centered)[0]
            total = total + 0.5 * (trace + ops.sum(mean * mean) - channels
                                   - ops.log_det_spd(covariance, self.epsilon))
        return total

    # ---- evaluation: (mean, covariance) per chunk, each an average over the chunk's values
    def chunk_statistics(self, ops, tap):
        mean, covariance, _ = _moments(ops, tap)
        return mean, covariance

    def combine(self, parts):
        """The union's mean and biased covariance, exactly: sum_i n_i (S_i + d_i d_i^T) / n
        with d_i = mu_i - mu (no E[xx^T] - mu mu^T cancellation)."""
        counts = np.array([n for _, n in parts], dtype=np.float64)
        means = np.stack([np.asarray(m, np.float64) for (m, _), _ in parts])
        covariances = np.stack([np.asarray(s, np.float64) for (_, s), _ in parts])
        total = counts.sum()
        mean = (counts[:, None] * means).sum(0) / total
        deviations = means - mean
        covariance = (counts[:, None, None] * (covariances + deviations[:, :, None] * deviations[:, None, :])).sum(0) / total
        return mean, covariance

    def value_from_statistics(self, statistics):
        return loss_numpy(statistics, self.epsilon)


def _moments(ops, z):
    """A slot output's channel mean (k,), biased covariance (k, k) and the centred values (n, k)."""
    shape = ops.shape(z)
    values = ops.reshape(z, (int(np.prod(shape[:-1])), shape[-1]))  # canonical (N*H*W, C)
    mean = ops.mean(values, (0,))
    centered = values - mean
    return mean, ops.matmul(centered, centered, transpose_a=True) / ops.shape(values)[0], centered


def loss_numpy(statistics: dict[str, tuple[np.ndarray, np.ndarray]], epsilon: float) -> float:
    """The loss in float64 NumPy from every layer's (mean, covariance), summed over layers."""
    total = 0.0
    for mean, covariance in statistics.values():
        mean, covariance = np.asarray(mean, np.float64), np.asarray(covariance, np.float64)
        k = mean.shape[0]
        sign, log_det = np.linalg.slogdet(covariance + epsilon * np.eye(k))
        total += 0.5 * (np.trace(covariance) + mean @ mean - k - (log_det if sign > 0 else -np.inf))
    return float(total)


LOSS = Decorrelation
