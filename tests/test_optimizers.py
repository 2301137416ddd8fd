"""Optimizer update formulas and learning-rate schedules against hand-computed steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normbench import optimizers
from normbench.spec import OptimizerSpec, ScheduleSpec


class NumpyOps:
    """The two primitives the optimizers use, in NumPy."""

    def zeros_like(self, x):
        return np.zeros_like(x)

    def sqrt(self, x):
        return np.sqrt(x)


OPS = NumpyOps()


def _run(spec: OptimizerSpec, params: dict, grads: list[dict], lr: float, ops=OPS):
    optimizer = optimizers.build(spec)
    state = optimizer.init(ops, params)
    history = []
    for g in grads:
        params, state = optimizer.update(ops, params, g, state, lr)
        history.append(params)
    return history


# ----------------------------------------------------------------------------- hand-computed scalar steps
# p0 = 1.0, gradients 0.5 then -0.2, learning rate 0.1 (numbers worked out by hand).

GRADS = [{"w": np.array(0.5)}, {"w": np.array(-0.2)}]


def test_sgd_by_hand():
    steps = _run(OptimizerSpec(name="sgd", learning_rate=0.1), {"w": np.array(1.0)}, GRADS, 0.1)
    assert [float(s["w"]) for s in steps] == pytest.approx([0.95, 0.97], abs=1e-15)


def test_momentum_by_hand():
    # v1 = 0.5, p1 = 1 - 0.05 = 0.95;  v2 = 0.9 * 0.5 - 0.2 = 0.25, p2 = 0.95 - 0.025 = 0.925
    steps = _run(OptimizerSpec(name="sgd", learning_rate=0.1, momentum=0.9), {"w": np.array(1.0)}, GRADS, 0.1)
    assert [float(s["w"]) for s in steps] == pytest.approx([0.95, 0.925], abs=1e-15)


def test_nesterov_by_hand():
    # step1 = g + 0.9 v1 = 0.5 + 0.45 = 0.95, p1 = 0.905;  step2 = -0.2 + 0.9 * 0.25 = 0.025, p2 = 0.9025
    steps = _run(OptimizerSpec(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True), {"w": np.array(1.0)}, GRADS, 0.1)
    assert [float(s["w"]) for s in steps] == pytest.approx([0.905, 0.9025], abs=1e-15)


def test_rmsprop_by_hand():
    # ms1 = 0.1 * 0.25 = 0.025, p1 = 1 - 0.1 * 0.5 / sqrt(0.025)
    # ms2 = 0.9 * 0.025 + 0.1 * 0.04 = 0.0265, p2 = p1 + 0.1 * 0.2 / sqrt(0.0265)
    spec = OptimizerSpec(name="rmsprop", learning_rate=0.1, decay=0.9, momentum=0.0, epsilon=1e-10)
    steps = _run(spec, {"w": np.array(1.0)}, GRADS, 0.1)
    p1 = 1 - 0.05 / math.sqrt(0.025 + 1e-10)
    assert float(steps[0]["w"]) == pytest.approx(p1, abs=1e-12)
    assert float(steps[0]["w"]) == pytest.approx(0.683772234, abs=1e-8)
    assert float(steps[1]["w"]) == pytest.approx(p1 + 0.02 / math.sqrt(0.0265 + 1e-10), abs=1e-12)


def test_rmsprop_momentum_by_hand():
    # mom1 = 0.1 * 0.5 / sqrt(0.025) = 0.316227766;  mom2 = 0.5 * mom1 - 0.1 * 0.2 / sqrt(0.0265)
    spec = OptimizerSpec(name="rmsprop", learning_rate=0.1, decay=0.9, momentum=0.5, epsilon=1e-10)
    steps = _run(spec, {"w": np.array(1.0)}, GRADS, 0.1)
    mom1 = 0.05 / math.sqrt(0.025 + 1e-10)
    mom2 = 0.5 * mom1 - 0.02 / math.sqrt(0.0265 + 1e-10)
    assert float(steps[1]["w"]) == pytest.approx(1 - mom1 - mom2, abs=1e-12)


def test_adam_first_step_is_learning_rate_sized():
    # Bias-corrected Adam's first step is lr * g / (|g| + eps'), i.e. almost exactly lr.
    spec = OptimizerSpec(name="adam", learning_rate=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8)
    optimizer = optimizers.build(spec)
    lr_0 = optimizer.effective_learning_rate(0.1, 0)
    assert lr_0 == pytest.approx(0.1 * math.sqrt(0.001) / 0.1, rel=1e-14)
    (p1,) = _run(spec, {"w": np.array(1.0)}, GRADS[:1], lr_0)
    assert float(p1["w"]) == pytest.approx(1.0 - 0.1, abs=1e-7)


# ----------------------------------------------------------------------------- arrays, several steps


def _grads(rng, shapes, n):
    return [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(n)]


SHAPES = {"a/kernel": (3, 4), "a/bias": (4,)}


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.5, True)])
def test_sgd_steps(rng, momentum, nesterov):
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = _grads(rng, SHAPES, 5)
    got = _run(OptimizerSpec(name="sgd", learning_rate=0.1, momentum=momentum, nesterov=nesterov), params, grads, 0.05)
    for k in SHAPES:
        p, v = params[k].copy(), np.zeros(SHAPES[k])
        for g, after in zip(grads, got):
            v = momentum * v + g[k]
            p = p - 0.05 * ((g[k] + momentum * v) if nesterov else v)
            np.testing.assert_allclose(after[k], p, rtol=1e-14, atol=1e-15)


def test_rmsprop_steps(rng):
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = _grads(rng, SHAPES, 5)
    spec = OptimizerSpec(name="rmsprop", learning_rate=0.01, decay=0.8, momentum=0.3, epsilon=1e-6)
    got = _run(spec, params, grads, 0.01)
    for k in SHAPES:
        p, ms, mom = params[k].copy(), 0.0, 0.0
        for g, after in zip(grads, got):
            ms = 0.8 * ms + 0.2 * g[k] ** 2
            mom = 0.3 * mom + 0.01 * g[k] / np.sqrt(ms + 1e-6)  # epsilon inside the square root
            p = p - mom
            np.testing.assert_allclose(after[k], p, rtol=1e-14, atol=1e-15)


def test_adam_steps_match_textbook_adam(rng):
    """Folded bias correction == Kingma & Ba's m_hat / (sqrt(v_hat) + eps_hat), eps_hat = eps / sqrt(1 - b2^t)."""
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = _grads(rng, SHAPES, 6)
    b1, b2, eps, lr = 0.8, 0.95, 1e-3, 0.01  # a large eps so its placement matters
    spec = OptimizerSpec(name="adam", learning_rate=lr, beta1=b1, beta2=b2, epsilon=eps)
    optimizer = optimizers.build(spec)
    state, current = optimizer.init(OPS, params), params
    p = {k: v.copy() for k, v in params.items()}
    m = {k: 0.0 for k in SHAPES}
    v = {k: 0.0 for k in SHAPES}
    for step, g in enumerate(grads):
        current, state = optimizer.update(OPS, current, g, state, optimizer.effective_learning_rate(lr, step))
        t = step + 1
        for k in SHAPES:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps / math.sqrt(1 - b2**t))
            np.testing.assert_allclose(current[k], p[k], rtol=1e-12, atol=1e-14)


def test_adam_effective_learning_rate():
    optimizer = optimizers.build(OptimizerSpec(name="adam", learning_rate=1.0, beta1=0.9, beta2=0.999))
    for step in (0, 1, 9, 999):
        t = step + 1
        assert optimizer.effective_learning_rate(2.0, step) == pytest.approx(2.0 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t), rel=1e-14)
    assert optimizer.effective_learning_rate(2.0, 0) == pytest.approx(2.0 * math.sqrt(0.001) / 0.1)
    assert optimizer.effective_learning_rate(2.0, 100000) == pytest.approx(2.0, rel=1e-12)  # correction vanishes
    for name in ("sgd", "rmsprop"):
        assert optimizers.build(OptimizerSpec(name=name)).effective_learning_rate(0.3, 5) == 0.3


def test_program_learning_rate_combines_schedule_and_adam(program_factory):
    program = program_factory("none", optimizer={"name": "adam", "learning_rate": 0.01},
                              schedule={"name": "constant", "warmup_steps": 4})
    for step in range(8):
        expected = 0.01 * min((step + 1) / 4, 1.0) * math.sqrt(1 - 0.999 ** (step + 1)) / (1 - 0.9 ** (step + 1))
        assert program.learning_rate(step) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("spec", [
    OptimizerSpec(name="sgd", momentum=0.9, nesterov=True),
    OptimizerSpec(name="rmsprop", momentum=0.5, epsilon=1e-6),
    OptimizerSpec(name="adam"),
], ids=["nesterov", "rmsprop", "adam"])
def test_update_through_backend_ops(engine, rng, spec):
    """The same update applied with a backend's ops and arrays equals the NumPy one."""
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = _grads(rng, SHAPES, 3)
    expected = _run(spec, params, grads, 0.01)[-1]
    optimizer = optimizers.build(spec)
    current = engine.import_tree(params)
    state = optimizer.init(engine.ops, current)
    for g in grads:
        current, state = optimizer.update(engine.ops, current, engine.import_tree(g), state, 0.01)
    got = engine.export_tree(current)
    rtol = 1e-12 if engine.dtype == "float64" else 1e-5
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=rtol, atol=rtol)


# ----------------------------------------------------------------------------- schedules


def _multipliers(schedule, steps):
    return [optimizers.schedule_multiplier(schedule, s) for s in steps]


def test_constant_schedule():
    assert _multipliers(ScheduleSpec(name="constant"), [0, 1, 500]) == [1.0, 1.0, 1.0]


def test_warmup_is_a_linear_ramp():
    schedule = ScheduleSpec(name="constant", warmup_steps=4)
    assert _multipliers(schedule, range(7)) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_step_decay():
    schedule = ScheduleSpec(name="step_decay", decay_rate=0.5, decay_every=10)
    assert _multipliers(schedule, [0, 9, 10, 19, 20, 35]) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_step_decay_counts_after_warmup():
    schedule = ScheduleSpec(name="step_decay", warmup_steps=2, decay_rate=0.1, decay_every=3)
    assert _multipliers(schedule, range(9)) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01])


def test_step_decay_counted_in_epochs_follows_the_batch_size():
    """decay_every_epochs: the decay comes after the same examples at every batch size (a
    batch-size sweep's variants), at the first step past each multiple of the epochs."""
    schedule = ScheduleSpec(name="step_decay", decay_rate=0.5, decay_every_epochs=1.5)
    # 100 examples: 10 steps an epoch at batch 10 (decays at steps 15, 30), 2.5 at batch 40 (at 3.75, 7.5).
    small = [optimizers.schedule_multiplier(schedule, step, 100 / 10) for step in (0, 14, 15, 29, 30)]
    large = [optimizers.schedule_multiplier(schedule, step, 100 / 40) for step in (0, 3, 4, 7, 8)]
    assert small == large == [1.0, 1.0, 0.5, 0.5, 0.25]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optimizers.schedule_multiplier(schedule, 3)


def test_piecewise():
    schedule = ScheduleSpec(name="piecewise", boundaries=(10, 20), multipliers=(1.0, 0.1, 0.01))
    assert _multipliers(schedule, [0, 9, 10, 19, 20, 1000]) == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_schedule_from_spec(program_factory):
    program = program_factory("none", optimizer={"name": "sgd", "learning_rate": 0.2},
                              schedule={"name": "piecewise", "boundaries": [3], "multipliers": [1.0, 0.5]})
    assert [program.learning_rate(s) for s in range(5)] == pytest.approx([0.2, 0.2, 0.2, 0.1, 0.1])


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        optimizers.schedule_multiplier(ScheduleSpec(name="cosine"), 0)
