"""Group normalization: channels reshaped to (groups, channels per group), each example's
moments per group, the per-channel scale and shift reshaped alike, as Keras' GroupNormalization."""

import tensorflow as tf


def normalize(z, params, state, method):
    channels = z.shape[-1]
    grouped_shape = [method.groups, channels // method.groups]
    grouped = tf.reshape(z, [*z.shape[:-1], *grouped_shape])
    axes = [*range(1, z.shape.rank - 1), z.shape.rank]  # positions and the channels of a group
    mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)
    y = tf.nn.batch_normalization(grouped, mean, variance, tf.reshape(params["shift"], grouped_shape),
                                  tf.reshape(params["scale"], grouped_shape), method.epsilon)
    return tf.reshape(y, z.shape), state
