"""Instance normalization: each example's and channel's moments over (H, W)."""

import tensorflow as tf


def normalize(z, params, state, method):
    mean, variance = tf.nn.moments(z, axes=[1, 2], keepdims=True)
    return tf.nn.batch_normalization(z, mean, variance, params["shift"], params["scale"], method.epsilon), state
