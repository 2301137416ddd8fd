"""The decorrelation loss: KL(N(mu, S) || N(0, I)) = 0.5 * (tr S + mu^T mu - k - log det(S + epsilon I))
per layer, with S the biased channel covariance over the batch and positions, summed over layers.
log det from tf.linalg.logdet (a Cholesky factorization)."""

import tensorflow as tf


def value(taps, loss):
    total = []
    for z in taps:
        channels = z.shape[-1]
        values = tf.reshape(z, [-1, channels])
        count = values.shape[0]
        mean = tf.reduce_mean(values, axis=0)
        centered = values - mean
        covariance = tf.matmul(centered, centered, transpose_a=True) / count
        trace = tf.reduce_sum(tf.square(centered)) / count
        log_det = tf.linalg.logdet(covariance + loss.epsilon * tf.eye(channels, dtype=covariance.dtype))
        total.append(0.5 * (trace + tf.reduce_sum(tf.square(mean)) - channels - log_det))
    return tf.add_n(total)
