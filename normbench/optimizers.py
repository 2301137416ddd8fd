"""Optimizers and learning-rate schedules, written once as explicit update formulas.

`update` is pure: (params, grads, state, lr) -> (new params, new state), using only
Python arithmetic and a few `ops` primitives, so every backend applies bit-for-bit the
same rule (frameworks' built-in optimizers differ in where epsilon sits, how Nesterov is
formulated and how Adam's bias correction is applied). Scalars that depend on the step
number (schedule, Adam's bias correction) are computed on the host by
`effective_learning_rate`, so compiled steps take a single scalar and never retrace.
"""

from __future__ import annotations

import math

from normbench.spec import OptimizerSpec, ScheduleSpec


class SGD:
    """Plain SGD, or heavy-ball / Nesterov momentum in the TensorFlow (v1) form:
    v <- momentum * v + g;  p <- p - lr * v   (Nesterov: p <- p - lr * (g + momentum * v))."""

    def __init__(self, spec: OptimizerSpec):
        self.momentum, self.nesterov = spec.momentum, spec.nesterov

    def init(self, ops, params: dict) -> dict:
        return {k: ops.zeros_like(v) for k, v in params.items()} if self.momentum else {}

    def effective_learning_rate(self, learning_rate: float, step: int) -> float:
        return learning_rate

    def update(self, ops, params: dict, grads: dict, state: dict, lr):
        if not self.momentum:
            return {k: p - lr * grads[k] for k, p in params.items()}, state
        velocity = {k: self.momentum * state[k] + grads[k] for k in params}
        if self.nesterov:
            step = {k: grads[k] + self.momentum * velocity[k] for k in params}
        else:
            step = velocity
        return {k: p - lr * step[k] for k, p in params.items()}, velocity


class RMSProp:
    """ms <- decay * ms + (1 - decay) * g^2;  mom <- momentum * mom + lr * g / sqrt(ms + eps);  p <- p - mom.
    (TensorFlow's formulation: epsilon inside the square root, accumulator starting at zero.)"""

    def __init__(self, spec: OptimizerSpec):
        self.decay, self.momentum, self.epsilon = spec.decay, spec.momentum, spec.epsilon

    def init(self, ops, params: dict) -> dict:
        state = {f"ms/{k}": ops.zeros_like(v) for k, v in params.items()}
        state.update({f"mom/{k}": ops.zeros_like(v) for k, v in params.items()})
        return state

    def effective_learning_rate(self, learning_rate: float, step: int) -> float:
        return learning_rate

    def update(self, ops, params: dict, grads: dict, state: dict, lr):
        new_params, new_state = {}, {}
        for k, p in params.items():
            g = grads[k]
            ms = self.decay * state[f"ms/{k}"] + (1.0 - self.decay) * g * g
            mom = self.momentum * state[f"mom/{k}"] + lr * g / ops.sqrt(ms + self.epsilon)
            new_params[k], new_state[f"ms/{k}"], new_state[f"mom/{k}"] = p - mom, ms, mom
        return new_params, new_state


class Adam:
    """Adam with the bias correction folded into the step size (Kingma & Ba, Sec. 2, the
    form TensorFlow uses): lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t);  p <- p - lr_t * m / (sqrt(v) + eps)."""

    def __init__(self, spec: OptimizerSpec):
        self.beta1, self.beta2, self.epsilon = spec.beta1, spec.beta2, spec.epsilon

    def init(self, ops, params: dict) -> dict:
        state = {f"m/{k}": ops.zeros_like(v) for k, v in params.items()}
        state.update({f"v/{k}": ops.zeros_like(v) for k, v in params.items()})
        return state

    def effective_learning_rate(self, learning_rate: float, step: int) -> float:
        t = step + 1
        return learning_rate * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)

    def update(self, ops, params: dict, grads: dict, state: dict, lr):
        new_params, new_state = {}, {}
        for k, p in params.items():
            g = grads[k]
            m = self.beta1 * state[f"m/{k}"] + (1.0 - self.beta1) * g
            v = self.beta2 * state[f"v/{k}"] + (1.0 - self.beta2) * g * g
            new_params[k], new_state[f"m/{k}"], new_state[f"v/{k}"] = p - lr * m / (ops.sqrt(v) + self.epsilon), m, v
        return new_params, new_state


def build(spec: OptimizerSpec):
    return {"sgd": SGD, "rmsprop": RMSProp, "adam": Adam}[spec.name](spec)


def schedule_multiplier(schedule: ScheduleSpec, step: int, steps_per_epoch: float | None = None) -> float:
    """Learning-rate multiplier for update number `step` (0-based). `steps_per_epoch`
    (training examples / the batch size) is needed by a decay counted in epochs."""
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    after = step - schedule.warmup_steps
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step_decay":
        if schedule.decay_every_epochs is not None:
            if steps_per_epoch is None:
                raise ValueError("a step_decay counted in epochs needs steps_per_epoch")
            return schedule.decay_rate ** math.floor(after / (schedule.decay_every_epochs * steps_per_epoch))
        return schedule.decay_rate ** (after // schedule.decay_every)
    if schedule.name == "piecewise":
        index = sum(1 for b in schedule.boundaries if step >= b)
        return schedule.multipliers[index]
    raise ValueError(f"unknown schedule {schedule.name!r}")
