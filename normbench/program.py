"""A training program: one spec variant turned into neutral functions a backend executes.

Backends differentiate `loss`, compile `train_step`-shaped code around it and run
`evaluation` on chunks; they never see the spec's model or normalization logic.
"""

from __future__ import annotations

import numpy as np

from normbench import models, objectives, optimizers
from normbench.data_order import seed_streams
from normbench.spec import ExperimentSpec, VariantSpec


class TrainingProgram:
    def __init__(self, spec: ExperimentSpec, variant: VariantSpec):
        self.spec, self.variant = spec, variant
        self.arch = models.ARCHITECTURES[spec.model]
        self.normalization = variant.normalization
        self.std_loss_weight = variant.standardization_loss_weight
        self.optimizer = optimizers.build(spec.optimizer)

    def initial_parameters(self, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        init_seed, _ = seed_streams(seed)
        return models.init_params(self.arch, self.normalization, init_seed)

    def learning_rate(self, step: int) -> float:
        base = self.spec.optimizer.learning_rate * optimizers.schedule_multiplier(self.spec.schedule, step)
        return self.optimizer.effective_learning_rate(base, step)

    def _forward(self, ops, params, state, images, training: bool, need_moments: bool):
        return models.forward(ops, self.arch, params, state, images, normalization=self.normalization,
                              batch_norm=self.spec.batch_norm, training=training, need_moments=need_moments)

    def loss(self, ops, params: dict, state: dict, images, labels):
        """The differentiated objective: cross entropy + weight x standardization loss.
        Returns (total, aux); aux holds the components and the new BN state.

        The L2 term is not in this graph: `update` adds its gradient, weight_decay x
        kernel, directly. The mathematics is the same; in eager frameworks (PyTorch,
        TensorFlow graphs of small ops) differentiating a sum of squares per kernel
        cost ~10% of an MLP step, which a hand-written loop does not pay."""
        use_std = self.std_loss_weight > 0
        out = self._forward(ops, params, state, images, training=True, need_moments=use_std)
        cross_entropy = ops.softmax_cross_entropy(out.logits, labels)
        total = cross_entropy
        if use_std:
            std_loss = objectives.standardization_loss(ops, out.moments, self.spec.standardization_loss.log_epsilon)
            total = total + self.std_loss_weight * std_loss
        else:
            std_loss = ops.zeros_like(cross_entropy)
        return total, {"cross_entropy": cross_entropy, "standardization_loss": std_loss, "state": out.state}

    def objective_gradients(self, ops, params: dict, loss_grads: dict) -> dict:
        """Gradients of the full objective (`loss` + L2) from the gradients of `loss`."""
        return objectives.add_weight_decay_gradient(ops, params, loss_grads, self.spec.optimizer.weight_decay)

    def update(self, ops, params: dict, loss_grads: dict, opt_state: dict, learning_rate):
        """One optimizer step from the gradients of `loss`: (new params, new optimizer state)."""
        grads = self.objective_gradients(ops, params, loss_grads)
        return self.optimizer.update(ops, params, grads, opt_state, learning_rate)

    def inspect(self, ops, params: dict, state: dict, images, labels) -> dict:
        """Training-mode forward exposing every intermediate quantity (for parity tests),
        including the full objective's value `total_loss` (with the L2 penalty)."""
        out = self._forward(ops, params, state, images, training=True, need_moments=True)
        std_loss = objectives.standardization_loss(ops, out.moments, self.spec.standardization_loss.log_epsilon)
        cross_entropy = ops.softmax_cross_entropy(out.logits, labels)
        total = cross_entropy + objectives.weight_decay_penalty(ops, params, self.spec.optimizer.weight_decay)
        if self.std_loss_weight > 0:
            total = total + self.std_loss_weight * std_loss
        return {
            "logits": out.logits,
            "preactivations": out.preactivations,
            "moments": out.moments,
            "cross_entropy": cross_entropy,
            "standardization_loss": std_loss,
            "total_loss": total,
            "state": out.state,
        }

    def evaluation(self, ops, params: dict, state: dict, images, labels, track: tuple[str, ...] = ()):
        """Inference-mode statistics of one chunk: sums, per-channel moments and tracked pre-activations."""
        out = self._forward(ops, params, state, images, training=False, need_moments=True)
        return {
            "cross_entropy_mean": ops.softmax_cross_entropy(out.logits, labels),
            "correct": ops.correct_count(out.logits, labels),
            "moments": {name: (mean, var, ops.reduced_count(out.preactivations[name])) for name, (mean, var) in out.moments.items()},
            "tracked": {name: out.preactivations[name] for name in track},
        }


def combine_moments(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and biased variance of a union of chunks from per-chunk (mean, var, count)."""
    counts = np.array([n for _, _, n in parts], dtype=np.float64)
    means = np.stack([np.asarray(m, np.float64) for m, _, _ in parts])
    variances = np.stack([np.asarray(v, np.float64) for _, v, _ in parts])
    total = counts.sum()
    mean = (counts[:, None] * means).sum(0) / total
    second = (counts[:, None] * (variances + means**2)).sum(0) / total
    return mean, np.maximum(second - mean**2, 0.0)


def standardization_loss_numpy(moments: dict[str, tuple[np.ndarray, np.ndarray]], log_epsilon: float) -> float:
    """Equation (2) in float64 NumPy, for evaluation metrics and as the tests' reference."""
    return float(sum(0.5 * np.sum(m * m + v - np.log(v + log_epsilon) - 1.0) for m, v in moments.values()))
