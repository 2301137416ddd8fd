"""Weight normalization: the kernel is gain * v / ||v|| per output channel, ||v|| over every
other kernel axis; activations pass unchanged and the layer keeps its bias."""

import tensorflow as tf


def kernel(kernel, params, method):
    squared_norm = tf.reduce_sum(tf.square(kernel), axis=list(range(kernel.shape.rank - 1)))
    return kernel * (params["gain"] * tf.math.rsqrt(squared_norm))


def normalize(z, params, state, method):
    return z, state
