"""Batch normalization: tf.nn.moments over the batch (and positions), tf.nn.batch_normalization;
with `replica_batch_size`, each sub-batch normalized with its own moments."""

import tensorflow as tf


def normalize(z, params, state, method):
    scale, shift = params.get("scale"), params.get("shift")
    rank = z.shape.rank
    if method.replica_batch_size is None:
        mean, variance = tf.nn.moments(z, axes=list(range(rank - 1)))
        y = tf.nn.batch_normalization(z, mean, variance, shift, scale, method.epsilon)
        count = z.shape.num_elements() // z.shape[-1]
    else:
        replicas = z.shape[0] // method.replica_batch_size
        grouped = tf.reshape(z, [replicas, method.replica_batch_size, *z.shape[1:]])
        mean, variance = tf.nn.moments(grouped, axes=list(range(1, rank)), keepdims=True)
        y = tf.reshape(tf.nn.batch_normalization(grouped, mean, variance, shift, scale, method.epsilon), z.shape)
        # The running statistics follow the replicas' average moments.
        mean = tf.reduce_mean(tf.reshape(mean, [replicas, -1]), axis=0)
        variance = tf.reduce_mean(tf.reshape(variance, [replicas, -1]), axis=0)
        count = z.shape.num_elements() // z.shape[-1] // replicas
    if method.running_variance == "unbiased":
        variance = variance * (count / max(count - 1, 1))
    decay = method.running_decay
    mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
    return y, {"running_mean": decay * state["running_mean"] + (1.0 - decay) * mean,
               "running_var": decay * state["running_var"] + (1.0 - decay) * variance}
