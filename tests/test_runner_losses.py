"""`execute_run` reads training losses back in batches, not every step: divergence must
still be pinned to the exact step, and the reads must happen at every evaluation and at
least every `LOSS_CHECK_EVERY` steps. A scripted NumPy engine stands in for a framework,
so these tests see exactly which step produced which loss and when it was read."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import runner
from normbench.plan import resolve as TrainingProgram


class _ScriptedTrainer:
    """Loss of step k (0-based) is `losses(k)`; records every step and every read."""

    def __init__(self, losses):
        self.losses, self.steps, self.reads = losses, 0, []

    def step(self, indices, learning_rate, dropout_masks=None, images=None):
        value = self.losses(self.steps)
        self.steps += 1
        return np.array([value, value, 0.0])

    def read_losses(self, step_losses):
        self.reads.append(self.steps)
        return np.stack(step_losses)

    def evaluate(self, images, labels, n):
        return {"cross_entropy": 1.0, "accuracy": 0.5, "moments": {}, "tracked": {}}


class _ScriptedEngine:
    name = "scripted"

    def __init__(self, trainer):
        self._trainer = trainer

    def trainer(self, *args):
        return self._trainer

    def synchronize(self):
        pass


class _Evaluator:
    splits = {"test": (None, None, 10)}


def _run(make_spec, losses, steps: int, eval_every: int):
    spec = make_spec(steps=steps, eval_every=eval_every)
    trainer = _ScriptedTrainer(losses)
    labels = np.zeros(64, np.int64)
    outcome = runner.execute_run(_ScriptedEngine(trainer), TrainingProgram(spec, spec.variants[0]), 0,
                                 np.zeros((64, 28, 28, 1)), labels, _Evaluator())
    return outcome, trainer


def test_losses_are_read_at_every_evaluation_and_at_least_every_check_interval(spec_factory):
    check = runner.LOSS_CHECK_EVERY
    outcome, trainer = _run(spec_factory, lambda k: 1.0, steps=2 * check + 30, eval_every=2 * check + 30)
    assert outcome["status"] == "ok" and outcome["steps_completed"] == 2 * check + 30
    assert trainer.reads == [check, 2 * check, 2 * check + 30]
    _, trainer = _run(spec_factory, lambda k: 1.0, steps=25, eval_every=10)
    assert trainer.reads == [10, 20, 25]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("first_bad_step", [1, 7, 10, 11, 135])
def test_divergence_is_pinned_to_the_first_non_finite_step_despite_batched_reads(spec_factory, first_bad_step, bad):
    outcome, trainer = _run(spec_factory, lambda k: bad if k + 1 >= first_bad_step else 2.0, steps=300, eval_every=10)
    assert outcome["status"] == "diverged"
    assert outcome["diverged_at_step"] == outcome["steps_completed"] == first_bad_step
    assert outcome["non_finite"] == ["training-step loss", "training-step cross_entropy"]
    # Training stopped at the first read after the bad step; no NaN model was evaluated.
    assert trainer.steps == -(-first_bad_step // 10) * 10
    assert [r["step"] for r in outcome["rows"]] == list(range(0, trainer.steps - 9, 10))


class _TwoSplitEvaluator:
    splits = {"test": (None, None, 10), "train": (None, None, 10)}


def test_eval_resolution_adds_test_only_evaluations_on_a_geometric_grid(spec_factory):
    spec = spec_factory(steps=300, eval_every=100).replace(eval_resolution=0.25)
    grid = dict(spec.evaluation_steps(spec.variants[0]))
    # Multiples of eval_every (and 0, the end) are full; the grid below eval_every / r = 400
    # (capped at the budget) adds points at most 25% (or one step) apart.
    assert [s for s, full in grid.items() if full] == [0, 100, 200, 300]
    steps = sorted(grid)
    assert all(b - a <= max(1, 0.25 * a) + 1 for a, b in zip(steps, steps[1:]))
    assert {1, 2, 3, 4, 5} <= set(steps) and len(steps) < 40
    outcome = runner.execute_run(_ScriptedEngine(_ScriptedTrainer(lambda k: 1.0)), TrainingProgram(spec, spec.variants[0]),
                                 0, np.zeros((64, 28, 28, 1)), np.zeros(64, np.int64), _TwoSplitEvaluator())
    test_steps = [r["step"] for r in outcome["rows"] if r["split"] == "test"]
    train_steps = [r["step"] for r in outcome["rows"] if r["split"] == "train"]
    assert test_steps == steps and train_steps == [0, 100, 200, 300]


def test_without_eval_resolution_the_grid_is_the_multiples_of_eval_every(spec_factory):
    spec = spec_factory(steps=250, eval_every=100)
    assert spec.evaluation_steps(spec.variants[0]) == ((0, True), (100, True), (200, True), (250, True))
