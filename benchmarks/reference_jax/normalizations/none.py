"""No normalization: the layer's output (with its bias) passes through."""


def normalize(z, params, state, method):
    return z, state
