"""Layer normalization: each example's moments over all its units (tf.nn.moments), then
tf.nn.batch_normalization with the per-channel scale and shift, as Keras' LayerNormalization."""

import tensorflow as tf


def normalize(z, params, state, method):
    mean, variance = tf.nn.moments(z, axes=list(range(1, z.shape.rank)), keepdims=True)
    return tf.nn.batch_normalization(z, mean, variance, params["shift"], params["scale"], method.epsilon), state
