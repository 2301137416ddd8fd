"""The standardization loss (equation 2): 0.5 * sum(mu^2 + var - log(var + log_epsilon) - 1)
per layer over the channel moments (tf.nn.moments), summed over layers; with
`replica_batch_size`, averaged over the sub-batches' own losses."""

import tensorflow as tf


def _layer_loss(mean, variance, log_epsilon):
    return 0.5 * tf.reduce_sum(tf.square(mean) + variance - tf.math.log(variance + log_epsilon) - 1.0)


def value(taps, loss):
    total = []
    for z in taps:
        rank = z.shape.rank
        if loss.replica_batch_size is None:
            mean, variance = tf.nn.moments(z, axes=list(range(rank - 1)))
            total.append(_layer_loss(mean, variance, loss.log_epsilon))
        else:
            replicas = z.shape[0] // loss.replica_batch_size
            grouped = tf.reshape(z, [replicas, loss.replica_batch_size, *z.shape[1:]])
            mean, variance = tf.nn.moments(grouped, axes=list(range(1, rank)))
            total.append(_layer_loss(mean, variance, loss.log_epsilon) / replicas)
    return tf.add_n(total)
