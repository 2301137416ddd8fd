"""The decorrelation loss: KL of each layer's full-covariance Gaussian to N(0, I), with
log det from a Cholesky factor."""

import torch


def value(taps, loss):
    total = 0.0
    for z in taps:
        x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) if z.dim() == 4 else z  # (values, channels)
        count, channels = x.shape
        mean = x.mean(dim=0)
        centered = x - mean
        covariance = centered.T @ centered / count
        factor = torch.linalg.cholesky(covariance + loss.epsilon * torch.eye(channels, dtype=x.dtype, device=x.device))
        log_det = 2.0 * torch.log(torch.diagonal(factor)).sum()
        total = total + 0.5 * (torch.trace(covariance) + mean @ mean - channels - log_det)
    return total
