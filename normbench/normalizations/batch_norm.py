"""Batch normalization (Ioffe & Szegedy 2015), optionally over independent sub-batches.

Training:   y = (z - mu_B) / sqrt(var_B + epsilon) * scale + shift
            with mu_B and the biased variance var_B per channel over the batch (and the
            spatial positions of a convolution); gradients flow through both.
            running <- running_decay * running + (1 - running_decay) * statistic
Inference:  y = (z - running_mean) / sqrt(running_var + epsilon) * scale + shift

`replica_batch_size = n` splits the batch into batch_size / n sub-batches of n examples,
each normalized with its own statistics, as the paper's TPU runs did (moments per core,
not shared across cores; Appendix A.6). The running statistics then follow the mean of
the sub-batches' statistics (what a cross-replica average of per-core moving averages
gives).
"""

from __future__ import annotations

import numpy as np

from normbench.normalizations import Normalization
from normbench.options import Option


class BatchNorm(Normalization):
    name = "batch_norm"
    label = "batch norm"
    color = "#0072B2"  # blue, as in the paper's figures
    summary = "batch normalization: per-channel batch statistics, running averages at inference"
    literature = ("Accelerates training and allows higher learning rates (Ioffe & Szegedy 2015); its accuracy "
                  "drops at small batch sizes (Wu & He 2018; the paper's Section 4.5).")
    options = (
        Option("scale", "boolean", True, "learned per-channel scale after normalizing"),
        Option("shift", "boolean", True, "learned per-channel shift after normalizing"),
        Option("running_decay", "number", 0.99, "running = decay * running + (1 - decay) * batch statistic "
               "(TensorFlow's momentum; PyTorch's momentum is 1 - this)", low=0.0, high=1.0, high_open=True),
        Option("epsilon", "number", 1e-3, "added to the variance before the square root", low=0.0, low_open=True),
        Option("running_variance", "string", "biased", "estimator stored in the running variance",
               choices=("biased", "unbiased")),
        Option("replica_batch_size", "integer", None, "normalize independent sub-batches of this many examples "
               "(per-core statistics); none: the whole batch", low=1, optional=True),
    )
    # Specs before plugins kept these options in a top-level [batch_norm] table, part of every run key.
    legacy_table = "batch_norm"
    legacy_table_fields = ("running_decay", "epsilon", "running_variance")
    # The paper's MNIST networks (Appendix A.1, A.2) use a shift and no scale.
    shorthands = {"batch_norm_shift": {"scale": False, "shift": True},
                  "batch_norm_scale_shift": {"scale": True, "shift": True}}

    @property
    def provides_offset(self) -> bool:
        return True  # the mean subtraction cancels any bias before it

    def check_batch(self, batch_size, slot):
        n = self.replica_batch_size or batch_size
        if batch_size % n:
            return f"batch_size {batch_size} is not a multiple of replica_batch_size {n}"
        if n * (int(np.prod(slot.shape[:-1])) if slot.spatial else 1) < 2:
            return f"batch statistics of {slot.layer} need at least 2 values per channel, a batch of {n} gives 1"
        return None

    def parameters(self, slot):
        out = {}
        if self.scale:
            out["scale"] = np.ones(slot.channels)
        if self.shift:
            out["shift"] = np.zeros(slot.channels)
        return out

    def state(self, slot):
        return {"running_mean": np.zeros(slot.channels), "running_var": np.ones(slot.channels)}

    def train(self, ops, z, params, state, slot):
        scale, shift = params.get("scale"), params.get("shift")
        if self.replica_batch_size is None:
            y, mean, var = ops.batch_norm_train(z, scale, shift, self.epsilon)
            count = ops.reduced_count(z)
        else:
            y, mean, var, count = _per_replica(ops, z, scale, shift, self.epsilon, self.replica_batch_size)
        if self.running_variance == "unbiased":
            var = var * (count / max(count - 1, 1))
        decay = self.running_decay
        return y, {"running_mean": ops.moving_average(state["running_mean"], mean, decay),
                   "running_var": ops.moving_average(state["running_var"], var, decay)}

    def infer(self, ops, z, params, state, slot):
        return ops.batch_norm_infer(z, state["running_mean"], state["running_var"], params.get("scale"),
                                    params.get("shift"), self.epsilon)

    def inference_affine(self, params, state, slot):
        return running_affine(params, state, self.epsilon)


def running_affine(params, state, epsilon):
    """Inference with the running statistics, (z - running_mean) / sqrt(running_var +
    epsilon) * scale + shift, as (multiplier, offset) per channel (no scale: 1; no shift: 0)."""
    as_float64 = lambda value: np.asarray(value, np.float64)
    multiplier = as_float64(params.get("scale", 1.0)) / np.sqrt(as_float64(state["running_var"]) + epsilon)
    return multiplier, as_float64(params.get("shift", 0.0)) - as_float64(state["running_mean"]) * multiplier


def _per_replica(ops, z, scale, shift, epsilon, replica_batch_size):
    """Batch norm of each sub-batch of `replica_batch_size` examples with its own moments.
    Returns (y, mean and biased var averaged over replicas, as constants, values per replica)."""
    shape = ops.shape(z)  # canonical (N, ..., C)
    replicas = shape[0] // replica_batch_size
    grouped = ops.reshape(z, (replicas, replica_batch_size, *shape[1:]))
    axes = tuple(range(1, len(shape)))  # per replica: its examples and positions
    mean, var = ops.moments(grouped, axes, keepdims=True)
    # The scale joins the per-replica inverse deviation (a few values a channel), not the
    # activation: one elementwise pass over the activation fewer, forward and backward
    # (mobilenet-v1-small's step with replicas of 4 in TensorFlow: 1.15x the hand-written
    # loop's, whose tf.nn.batch_normalization folds it the same way, before).
    multiplier = ops.rsqrt(var + epsilon)
    if scale is not None:
        multiplier = multiplier * scale
    y = ops.reshape((grouped - mean) * multiplier, shape)
    if shift is not None:
        y = ops.add_channel_bias(y, shift)
    per_channel = lambda v: ops.stop_gradient(ops.mean(ops.reshape(v, (replicas, shape[-1])), (0,)))
    count = ops.reduced_count(z) // replicas
    return y, per_channel(mean), per_channel(var), count


METHOD = BatchNorm
