"""Weight standardization (each output channel's kernel to zero mean and unit variance, as
in the authors' PyTorch code, with epsilon inside the square root as in the paper), then
the hand-written code of the method it is paired with."""

import torch

from ... import _reference


def _then(method):
    return _reference.plugin_module(__package__.rsplit(".", 1)[0], "normalizations", method.then.name)


def kernel(kernel, params, method):
    dims = tuple(range(1, kernel.dim()))  # all but the output channel (OIHW or (out, in))
    mean = kernel.mean(dim=dims, keepdim=True)
    var = (kernel - mean).square().mean(dim=dims, keepdim=True)
    standardized = (kernel - mean) * torch.rsqrt(var + method.epsilon)
    then = _then(method)
    return then.kernel(standardized, params, method.then) if hasattr(then, "kernel") else standardized


def normalize(z, params, state, method):
    return _then(method).normalize(z, params, state, method.then)
