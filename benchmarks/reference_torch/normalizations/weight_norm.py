"""Weight normalization as torch.nn.utils.parametrizations.weight_norm computes it
(torch._weight_norm: g * v / ||v|| over every axis but the output channel); the layer
keeps its bias."""

import torch


def kernel(kernel, params, method):
    return torch._weight_norm(kernel, params["gain"].view(-1, *([1] * (kernel.dim() - 1))), 0)


def normalize(z, params, state, method):
    return z, state
