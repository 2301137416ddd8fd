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

log det never forms S: with V = centred values / sqrt(n), S = V^T V, and log det(S +
epsilon I) comes from a QR factorization of V stacked over sqrt(epsilon) I
(`Ops.log_det_gram`), which every backend differentiates. A layer with more channels than
values per output (cnn3's conv1: 32 channels from 5 x 5 x 1 = 25 inputs) or than examples
has a singular S whose null directions reach log det only through epsilon; float32 S,
rounded at ~6e-8 ||S||, does not resolve them once ||S|| is large (after batch norm, ||S||
~ 10 against epsilon = 1e-5): a Cholesky of the float32 product put float32 runs 6e-5 to
5e-4 of the loss and 1e-2 to 2.5e-2 of conv1's kernel gradient from float64 and from each
other, beyond `normbench parity`'s float32 bounds; the QR, 4e-7 and 2e-5. The price is
time: per step, cnn3 at batch 128 took 1.5x (PyTorch) and 2.2x (TensorFlow) as long as
with the Cholesky, JAX the same, measured side by side. Evaluation still sums S per chunk
(`chunk_statistics`, combined in float64), which is cheaper over 20,000 images and needs
no gradient; in the batch-norm case above the evaluated value keeps that product's
float32 rounding.
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
            mean, centered = _centered(ops, z)
            count, channels = ops.shape(centered)
            # S = V^T V with V = centered / sqrt(n): tr S is V's sum of squares, and log det
            # comes from a QR of V (see Ops.log_det_gram), never from S itself.
            scaled = centered * (1.0 / count ** 0.5)
            total = total + 0.5 * (ops.sum(scaled * scaled) + ops.sum(mean * mean) - channels
                                   - ops.log_det_gram(scaled, self.epsilon))
        return total

    # ---- evaluation: (mean, covariance) per chunk, each an average over the chunk's values
    def chunk_statistics(self, ops, tap):
        mean, centered = _centered(ops, tap)
        return mean, ops.matmul(centered, centered, transpose_a=True) / ops.shape(centered)[0]

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


def _centered(ops, z):
    """A slot output's channel mean (k,) and its values less that mean (n, k)."""
    shape = ops.shape(z)
    values = ops.reshape(z, (int(np.prod(shape[:-1])), shape[-1]))  # canonical (N*H*W, C)
    mean = ops.mean(values, (0,))
    return mean, values - mean


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
