"""The training objective: cross entropy + weighted standardization loss + L2 weight decay.

Written once against `ops`, so every backend differentiates exactly the same expression.
The L2 term reaches training through its closed-form gradient (`add_weight_decay_gradient`,
applied by `TrainingProgram.update`); its value (`weight_decay_penalty`) is only reported.
"""

from __future__ import annotations


def standardization_loss(ops, moments: dict, log_epsilon: float):
    """Equation (2) of the paper, summed over layers.

    For each layer, KL(N(mu, diag sigma^2) || N(0, I)) = 0.5 * sum_i (mu_i^2 + sigma_i^2
    - log sigma_i^2 - 1), where mu_i and sigma_i^2 are the per-channel mean and biased
    (maximum-likelihood) variance over the batch (and spatial) axes. `log_epsilon`
    keeps log() finite for a channel whose variance is exactly zero (a dead ReLU input).
    """
    total = 0.0
    for mean, var in moments.values():
        total = total + 0.5 * ops.sum(mean * mean + var - ops.log(var + log_epsilon) - 1.0)
    return total


def _decayed(name: str) -> bool:
    return name.endswith("/kernel")  # biases and norm parameters are not decayed


def weight_decay_penalty(ops, params: dict, weight_decay: float):
    """0.5 * weight_decay * sum of squared kernels (biases and norm parameters excluded)."""
    total = 0.0
    for name, value in params.items():
        if _decayed(name):
            total = total + ops.sum(value * value)
    return 0.5 * weight_decay * total


def add_weight_decay_gradient(ops, params: dict, grads: dict, weight_decay: float) -> dict:
    """grads + the gradient of `weight_decay_penalty`, weight_decay * kernel."""
    if not weight_decay:
        return grads
    return {k: g + weight_decay * params[k] if _decayed(k) else g for k, g in grads.items()}
