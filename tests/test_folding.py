"""Batch norm folded into the layers before it (`normbench/folding.py`): the folded plain
network predicts the logits of the network as trained, in inference mode, in every
installed backend, for every variant of the methods spec (`mnist-norms`) and of the small
architectures' smoke specs whose method folds (batch norm and batch renorm, shift-only and
per-replica included, and the standardization loss's `affine` scale and shift); a NumPy
reference agrees without any framework; methods that normalize with each example's own
statistics or reparameterize the kernel refuse, naming the layer; and the comparison's
tolerance is tight enough to catch a wrong epsilon or a forgotten shift."""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import pytest

from normbench import backends, folding, spec as specs
from normbench.plan import Plan, resolve
from normbench.spec import PluginSpec

# max |folded - unfolded| over the largest |logit|: float32 rounding measured 2e-7 to 7e-7
# in every backend and network; a fold with PyTorch's epsilon (1e-5) instead of the
# method's (1e-3) moves cnn3's logits by far more (test_the_tolerance_catches_...).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
SPECS = ["mnist-norms", *(name for name in specs.bundled_specs() if name.startswith("smoke-"))]


def _cases() -> tuple[list, list]:
    """(spec, variant) pairs whose fold changes the network, and those that cannot fold."""
    foldable, refused = [], []
    for name in SPECS:
        spec = specs.load(name)
        for variant in spec.variants:
            plan = resolve(spec, variant)
            case = pytest.param(name, variant.name, id=f"{name}:{variant.name}")
            try:
                folding.fold(plan, *plan.initial_parameters(0))
            except ValueError:
                refused.append(case)
                continue
            if folding.folds_anything(plan):
                foldable.append(case)
    return foldable, refused


FOLDABLE, REFUSED = _cases()


def _plan(spec_name: str, variant: str) -> Plan:
    return resolve(specs.load(spec_name), variant)


def _trained_looking(plan: Plan, rng) -> tuple[dict, dict]:
    """Initial kernels with non-trivial scales, shifts, biases and running statistics, so
    that a fold dropping or misplacing any of them shows."""
    params, state = plan.initial_parameters(0)
    for name, value in params.items():
        if name.endswith("scale"):  # a method's scale and `affine_scale`
            params[name] = rng.uniform(0.5, 2.0, size=value.shape)
        elif name.endswith(("shift", "/bias")):
            params[name] = 0.3 * rng.normal(size=value.shape)
    for name, value in state.items():
        if name.endswith("/running_mean"):
            state[name] = 0.3 * rng.normal(size=value.shape)
        elif name.endswith("/running_var"):
            state[name] = rng.uniform(0.5, 2.0, size=value.shape)
    return params, state


@functools.cache
def _engine(backend: str, dtype: str):
    return backends.get_engine(backend, device="cpu", dtype=dtype)


def _logits(engine, plan: Plan, params: dict, state: dict, images: np.ndarray) -> np.ndarray:
    """Inference-mode logits through the backend's trainer (`Trainer.predict`)."""
    placed = engine.put_images(images)
    trainer = engine.trainer(plan, params, state, placed, engine.put_labels(np.zeros(len(images), np.int64)))
    return trainer.predict(placed)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("spec_name, variant", FOLDABLE)
def test_the_folded_plain_network_predicts_the_same_logits(backend_name, spec_name, variant, rng):
    plan = _plan(spec_name, variant)
    params, state = _trained_looking(plan, rng)
    plain, folded = folding.fold(plan, params, state)
    assert plain.method.name == "none" and not plain.affine and not plain.losses
    assert set(folded) == set(plain.initial_parameters(0)[0])  # the plain network's parameters, no others
    engine = _engine(backend_name, "float32")
    images = rng.normal(size=(4, *plan.arch.input_shape))
    expected = _logits(engine, plan, params, state, images)
    assert _relative_error(_logits(engine, plain, folded, {}, images), expected) <= TOLERANCE["float32"]


@pytest.mark.parametrize("variant", ["cnn3-batch-norm", "mlp3-batch-norm", "cnn3-batch-renorm"])
def test_the_fold_agrees_with_a_numpy_reference(ref, rng, variant):
    """Without any framework: the reference forward of the chain with batch norm's
    running statistics against the same forward of the folded network with its biases."""
    plan = _plan("mnist-norms", variant)
    params, state = _trained_looking(plan, rng)
    _, folded = folding.fold(plan, params, state)
    images = rng.normal(size=(4, *plan.arch.input_shape))
    expected, _, _ = ref.forward(plan.arch, params, state, images, normalization="batch_norm",
                                 bn_epsilon=plan.method.epsilon, training=False)
    actual, _, _ = ref.forward(plan.arch, folded, {}, images, normalization="none")
    assert _relative_error(actual, expected) <= TOLERANCE["float64"]


@pytest.mark.parametrize("spec_name, variant", REFUSED)
def test_methods_with_per_example_statistics_or_kernels_refuse_naming_the_layer(spec_name, variant):
    plan = _plan(spec_name, variant)
    first = next(layer.name for layer in plan.layers if layer.normalized)
    with pytest.raises(ValueError, match=f"cannot be folded into layer {re.escape(first)} of {re.escape(plan.arch.name)}"):
        folding.fold(plan, *plan.initial_parameters(0))


def test_per_example_methods_are_the_ones_refused():
    refused = {_plan(*case.values).method.name for case in REFUSED}
    assert {"group_norm", "layer_norm", "instance_norm", "weight_norm", "weight_standardization"} <= refused
    assert not refused & {_plan(*case.values).method.name for case in FOLDABLE}


def test_the_tolerance_catches_a_wrong_epsilon_and_a_forgotten_shift(backend_name, rng):
    plan = _plan("mnist-norms", "cnn3-batch-norm")
    params, state = _trained_looking(plan, rng)
    engine = _engine(backend_name, "float32")
    images = rng.normal(size=(4, *plan.arch.input_shape))
    expected = _logits(engine, plan, params, state, images)
    wrong_epsilon = Plan(plan.spec, dataclasses.replace(plan.variant, normalization=PluginSpec("batch_norm", (("epsilon", 1e-5),))),
                         plan.arch)
    no_shift = {name: 0.0 * value if name.endswith("/shift") else value for name, value in params.items()}
    for mistaken, mistaken_params in ((wrong_epsilon, params), (plan, no_shift)):
        plain, folded = folding.fold(mistaken, mistaken_params, state)
        assert _relative_error(_logits(engine, plain, folded, {}, images), expected) > 10 * TOLERANCE["float32"]
