"""Batch renormalization (Ioffe 2017): batch norm corrected towards the running
statistics, so that training and inference outputs agree.

Training:   y = ((z - mu_B) / sigma_B * r + d) * scale + shift
            r = stop_gradient(clip(sigma_B / sigma, 1 / r_max_t, r_max_t))
            d = stop_gradient(clip((mu_B - mu) / sigma, -d_max_t, d_max_t))
            with mu_B and the biased variance var_B per channel over the batch (and the
            positions of a convolution), sigma_B = sqrt(var_B + epsilon), and the running
            statistics *before* this step's update, sigma = sqrt(running_var + epsilon).
            Gradients flow through mu_B and sigma_B, not through r and d.
            running <- running_decay * running + (1 - running_decay) * statistic  (as batch norm)
            step <- step + 1
Inference:  y = (z - running_mean) / sqrt(running_var + epsilon) * scale + shift  (as batch norm)

Warm-up. The paper trains with r_max = 1, d_max = 0 (plain batch norm) for the first
~5k steps, then relaxes the limits gradually to r_max = 3, d_max = 5 over ~40k steps of
a ~130k-step run. Here, with t the number of training steps taken before this one (the
state entry `step`, a float count of shape (1,) kept in the running state so compiled steps see it):

    progress = clip((t - warmup_start) / warmup_steps, 0, 1)    (warmup_steps = 0: 1 from t = warmup_start)
    r_max_t = 1 + (r_max - 1) * progress,    d_max_t = d_max * progress

The defaults, warmup_start 0 and warmup_steps 500, scale the paper's schedule to the
project's ~1000-step runs: full limits from the middle of a run on. (The paper's plain
batch-norm phase let the running averages settle first; with running_decay 0.99 they
settle within a few hundred steps, during the ramp.)

The paper keeps moving averages of mu and sigma; like batch norm here this keeps the
running mean and the running *biased variance*, so inference is exactly batch norm's.

`replica_batch_size = n`, as for batch norm: each sub-batch of n examples (a simulated
core) is renormalized with its own mu_B, sigma_B, r and d against the shared running
statistics, which follow the mean of the sub-batches' statistics.
"""

from __future__ import annotations

import numpy as np

from normbench.normalizations import Normalization
from normbench.normalizations.batch_norm import running_affine
from normbench.options import Option


class BatchRenorm(Normalization):
    name = "batch_renorm"
    label = "batch renorm"
    color = "#56B4E9"  # Okabe-Ito sky blue
    summary = "batch renormalization: batch norm corrected towards the running statistics (clipped r, d)"
    literature = ("Matches batch norm on ordinary mini-batches and improves on it for small or non-i.i.d. "
                  "mini-batches, since training and inference use the same per-example function "
                  "(Ioffe 2017; Inception-v3 on ImageNet).")
    options = (
        Option("r_max", "number", 3.0, "final bound on r = sigma_B / sigma: r in [1 / r_max, r_max] (the paper's 3)",
               low=1.0),
        Option("d_max", "number", 5.0, "final bound on d = (mu_B - mu) / sigma: d in [-d_max, d_max] (the paper's 5)",
               low=0.0),
        Option("warmup_start", "integer", 0, "training steps of plain batch norm (r_max 1, d_max 0) before the "
               "limits start to relax", low=0),
        Option("warmup_steps", "integer", 500, "steps over which r_max rises linearly from 1 and d_max from 0 to "
               "their final values (0: at once)", low=0),
        Option("running_decay", "number", 0.99, "running = decay * running + (1 - decay) * batch statistic "
               "(as batch norm's)", low=0.0, high=1.0, high_open=True),
        Option("epsilon", "number", 1e-3, "added to the variances before the square root (the project's "
               "batch-norm default)", low=0.0, low_open=True),
        Option("replica_batch_size", "integer", None, "renormalize independent sub-batches of this many examples "
               "(per-core statistics, as batch norm's); none: the whole batch", low=1, optional=True,
               keyed_only_when_set=True),
    )

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
        return {"scale": np.ones(slot.channels), "shift": np.zeros(slot.channels)}

    def state(self, slot):
        return {"running_mean": np.zeros(slot.channels), "running_var": np.ones(slot.channels),
                # Shape (1,), not (): PyTorch's import (np.ascontiguousarray) makes a 0-d array 1-d.
                "step": np.zeros(1)}

    def limits(self, ops, step):
        """(r_max_t, d_max_t) after `step` training steps (a one-element array or a number)."""
        if self.warmup_steps:
            progress = ops.clip((step - float(self.warmup_start)) / float(self.warmup_steps), 0.0, 1.0)
        else:  # t >= warmup_start; t counts whole steps, so this is 0 before it and 1 from it on
            progress = ops.clip(step - float(self.warmup_start) + 1.0, 0.0, 1.0)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def train(self, ops, z, params, state, slot):
        if self.replica_batch_size is not None:
            return self._train_per_replica(ops, z, params, state)
        axes = tuple(range(ops.ndim(z) - 1))
        mean, var = ops.moments(z, axes)  # per channel, gradients through both
        batch_std = ops.sqrt(var + self.epsilon)
        inverse_std = ops.rsqrt(state["running_var"] + self.epsilon)
        r_max, d_max = self.limits(ops, state["step"])
        r = ops.stop_gradient(ops.clip(batch_std * inverse_std, 1.0 / r_max, r_max))
        d = ops.stop_gradient(ops.clip((mean - state["running_mean"]) * inverse_std, -d_max, d_max))
        # ((z - mu_B) / sigma_B * r + d) * scale + shift, with the per-channel factors
        # combined first: two whole-activation operations after normalizing instead of four.
        y = ops.normalize(z, mean, var, self.epsilon)
        y = ops.add_channel_bias(ops.scale_channels(y, r * params["scale"]), d * params["scale"] + params["shift"])
        decay = self.running_decay
        return y, {"running_mean": ops.moving_average(state["running_mean"], ops.stop_gradient(mean), decay),
                   "running_var": ops.moving_average(state["running_var"], ops.stop_gradient(var), decay),
                   "step": state["step"] + 1.0}

    def _train_per_replica(self, ops, z, params, state):
        """`train` with every sub-batch of `replica_batch_size` examples on its own moments."""
        shape = ops.shape(z)  # canonical (N, ..., C)
        replicas = shape[0] // self.replica_batch_size
        grouped = ops.reshape(z, (replicas, self.replica_batch_size, *shape[1:]))
        mean, var = ops.moments(grouped, tuple(range(1, len(shape))), keepdims=True)  # (replicas, 1, ..., C)
        inverse_std = ops.rsqrt(state["running_var"] + self.epsilon)
        r_max, d_max = self.limits(ops, state["step"])
        r = ops.stop_gradient(ops.clip(ops.sqrt(var + self.epsilon) * inverse_std, 1.0 / r_max, r_max))
        d = ops.stop_gradient(ops.clip((mean - state["running_mean"]) * inverse_std, -d_max, d_max))
        y = ops.reshape((grouped - mean) * ops.rsqrt(var + self.epsilon) * r + d, shape)
        y = ops.add_channel_bias(ops.scale_channels(y, params["scale"]), params["shift"])
        per_channel = lambda v: ops.stop_gradient(ops.mean(ops.reshape(v, (replicas, shape[-1])), (0,)))
        decay = self.running_decay
        return y, {"running_mean": ops.moving_average(state["running_mean"], per_channel(mean), decay),
                   "running_var": ops.moving_average(state["running_var"], per_channel(var), decay),
                   "step": state["step"] + 1.0}

    def infer(self, ops, z, params, state, slot):
        return ops.batch_norm_infer(z, state["running_mean"], state["running_var"], params["scale"], params["shift"],
                                    self.epsilon)

    def inference_affine(self, params, state, slot):
        return running_affine(params, state, self.epsilon)  # inference is batch norm's


METHOD = BatchRenorm
