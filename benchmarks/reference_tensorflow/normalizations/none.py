"""No normalization: the layer's output as it is (the layer keeps its bias)."""


def normalize(z, params, state, method):
    return z, state
