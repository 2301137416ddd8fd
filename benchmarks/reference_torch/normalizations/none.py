"""No normalization: the layer's output (its bias included) goes on unchanged."""


def normalize(z, params, state, method):
    return z, state
