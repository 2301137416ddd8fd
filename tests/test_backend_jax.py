"""Tests specific to the JAX backend (cross-backend agreement: tests/test_parity.py): the
compiled step and evaluation one program's trainers share.

Everything runs on synthetic MNIST-shaped data, so no download is needed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from normbench import backends
from normbench.data_order import BatchOrder, seed_streams
from normbench.plan import Plan, resolve
from normbench.spec import PluginSpec

if not backends.is_available("jax"):
    pytest.skip("jax is not installed", allow_module_level=True)

from normbench.backends.jax import engine as jax_engine  # noqa: E402

STEPS = 4


def _data(count, seed=3):
    rng = np.random.default_rng(seed)
    return rng.random((count, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, count)


def _trajectory(engine, plan, seed, images, labels):
    """Losses of STEPS steps of seed's batch order, the final parameters, and the test metrics."""
    trainer = engine.trainer(plan, *plan.initial_parameters(seed), engine.put_images(images), engine.put_labels(labels))
    order = BatchOrder(seed_streams(seed)[1], len(labels), plan.batch_size)
    losses = trainer.read_losses([trainer.step(order.indices(t), plan.learning_rate(t)) for t in range(STEPS)])
    params, _ = trainer.export()
    evaluated = trainer.evaluate(engine.put_images(images), engine.put_labels(labels), len(labels), chunk_size=24)
    return trainer, losses, params, evaluated


def _assert_same(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and all(np.array_equal(a[2][k], b[2][k]) for k in a[2])
    assert a[3]["cross_entropy"] == b[3]["cross_entropy"] and a[3]["accuracy"] == b[3]["accuracy"]


def test_the_seeds_of_a_variant_compile_once_and_train_as_they_do_alone(spec_factory):
    """A sweep's next seed reuses the step the first compiled (no compile time), and each
    seed's trajectory, parameters and evaluation are bit for bit those of the seed trained
    by an engine of its own."""
    spec = spec_factory(model="cnn-tiny", batch_size=16, steps=STEPS, seeds=2,
                        variants=[{"name": "batch_norm", "normalization": "batch_norm"}])
    images, labels = _data(64)
    shared = backends.get_engine("jax", dtype="float32")
    first = _trajectory(shared, resolve(spec, spec.variants[0]), 0, images, labels)
    second = _trajectory(shared, resolve(spec, spec.variants[0]), 1, images, labels)
    assert first[0].compile_seconds and not second[0].compile_seconds  # the second found it compiled
    assert second[0].compile(16) == 0.0
    for seed, got in ((0, first), (1, second)):
        alone = _trajectory(backends.get_engine("jax", dtype="float32"), resolve(spec, spec.variants[0]), seed,
                            images, labels)
        _assert_same(got, alone)


def test_another_variant_under_the_same_name_or_another_training_set_gets_its_own(spec_factory):
    """The key is the whole variant, not its name (folding builds the plain network as a
    variant of the same name its spec does not list), and an executable is never handed
    a training set of another size."""
    spec = spec_factory(model="cnn-tiny", batch_size=16, steps=STEPS, seeds=1,
                        variants=[{"name": "v", "normalization": "batch_norm"}])
    plan = resolve(spec, spec.variants[0])
    plain = Plan(spec, dataclasses.replace(plan.variant, normalization=PluginSpec("none")), plan.arch)
    engine = backends.get_engine("jax", dtype="float32")
    assert engine.step_functions(plan) is not engine.step_functions(plain)
    assert engine.step_functions(plan) is engine.step_functions(resolve(spec, spec.variants[0]))
    images, labels = _data(64)
    small = _trajectory(engine, plan, 0, images[:48], labels[:48])
    large = _trajectory(engine, plan, 0, images, labels)
    assert small[0].compile_seconds and large[0].compile_seconds  # one executable per training-set shape
    alone = _trajectory(backends.get_engine("jax", dtype="float32"), plan, 0, images[:48], labels[:48])
    _assert_same(small, alone)


def test_an_engine_keeps_the_last_few_programs_only(spec_factory, monkeypatch):
    monkeypatch.setattr(jax_engine, "STEP_FUNCTIONS_KEPT", 2)
    spec = spec_factory(model="cnn-tiny", batch_size=16, steps=STEPS, seeds=1,
                        variants=[{"name": f"v{k}", "normalization": "none"} for k in range(3)])
    engine = backends.get_engine("jax", dtype="float32")
    plans = [resolve(spec, v) for v in spec.variants]
    kept = [engine.step_functions(p) for p in plans[:2]]
    engine.step_functions(plans[0])  # used again: now the most recent
    engine.step_functions(plans[2])  # evicts v1, the least recently used
    assert engine.step_functions(plans[0]) is kept[0]
    assert engine.step_functions(plans[1]) is not kept[1]
