"""Weight standardization: each output channel's kernel standardized (tf.nn.moments over every
other kernel axis), then the method `then` fills the slot with its own hand-written file."""

import tensorflow as tf

from ... import _reference

_PACKAGE = __name__.rpartition(".normalizations.")[0]


def _then(method):
    return _reference.plugin_module(_PACKAGE, "normalizations", method.then.name)


def kernel(kernel, params, method):
    mean, variance = tf.nn.moments(kernel, axes=list(range(kernel.shape.rank - 1)), keepdims=True)
    standardized = (kernel - mean) * tf.math.rsqrt(variance + method.epsilon)
    then_kernel = getattr(_then(method), "kernel", None)
    return standardized if then_kernel is None else then_kernel(standardized, params, method.then)


def normalize(z, params, state, method):
    return _then(method).normalize(z, params, state, method.then)
