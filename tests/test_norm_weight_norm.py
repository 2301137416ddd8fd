"""Weight normalization (`normbench/normalizations/weight_norm.py`) on every backend,
against float64 NumPy written from the formula w = g * v / ||v|| (per output channel, the
norm over every other kernel axis): initialisation (g = ||v0||, so the initial network is
the un-normalized one), forward values, gradients of the full objective (weight decay on v
only) against central differences, and cross-backend parity in float64 and float32."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import backends, parity
from normbench.plan import add_weight_decay_gradient, resolve

MODELS = ["mlp-tiny", "cnn-tiny"]
WEIGHT_DECAY = 0.01


def _plan(make_spec, model, normalization="weight_norm", **fields):
    spec = make_spec(model=model, batch_size=6, variants=[{"name": "v", "normalization": normalization}],
                     optimizer={"name": "sgd", "learning_rate": 0.1, "weight_decay": WEIGHT_DECAY}, **fields)
    return resolve(spec, spec.variants[0])


def _weight_normalized(params):
    """The reference: every stored (v, g) pair replaced by the kernel g * v / ||v||."""
    out = {}
    for name, value in params.items():
        layer, suffix = name.rsplit("/", 1)
        if suffix == "kernel" and f"{layer}/gain" in params:
            norm = np.sqrt(np.sum(value**2, axis=tuple(range(value.ndim - 1))))
            value = value * (params[f"{layer}/gain"] / norm)
        if suffix != "gain":
            out[name] = value
    return out


def _data(rng, n=6):
    return rng.uniform(0, 1, size=(n, 28, 28, 1)), rng.integers(0, 10, size=n)


def _perturbed(params, rng):
    """Gains and biases away from their initial values, so that a dropped gain or bias shows."""
    out = dict(params)
    for name, value in params.items():
        if name.endswith("/gain"):
            out[name] = value * rng.uniform(0.5, 1.5, size=value.shape)
        elif name.endswith("/bias"):
            out[name] = value + rng.normal(size=value.shape) * 0.3
    return out


def test_gain_starts_at_the_initial_kernel_norm(spec_factory):
    for model in MODELS:
        plan = _plan(spec_factory, model)
        params, state = plan.initial_parameters(seed=4)
        for slot in plan.slots:
            kernel = params[f"{slot.layer}/kernel"]
            np.testing.assert_allclose(params[f"{slot.layer}/gain"],
                                       np.sqrt((kernel**2).reshape(-1, kernel.shape[-1]).sum(0)), rtol=1e-15)
            assert f"{slot.layer}/bias" in params  # the layer keeps its bias
        assert state == {}


@pytest.mark.parametrize("model", MODELS)
def test_initial_network_is_the_unnormalized_one(engine, spec_factory, rng, model):
    e = engine
    wn, none = _plan(spec_factory, model), _plan(spec_factory, model, "none")
    (p_wn, s_wn), (p_none, s_none) = wn.initial_parameters(seed=2), none.initial_parameters(seed=2)
    assert {k: v for k, v in p_wn.items() if not k.endswith("/gain")}.keys() == p_none.keys()
    images, _ = _data(rng)
    x = e.put_images(images)
    out_wn = wn.forward(e.ops, e.import_tree(p_wn), e.import_tree(s_wn), x, training=True)
    out_none = none.forward(e.ops, e.import_tree(p_none), e.import_tree(s_none), x, training=True)
    rtol = 1e-12 if e.dtype == "float64" else 2e-5
    np.testing.assert_allclose(e.activation_to_numpy(out_wn.logits), e.activation_to_numpy(out_none.logits), rtol=rtol, atol=rtol)
    for layer in out_none.preactivations:
        np.testing.assert_allclose(e.activation_to_numpy(out_wn.preactivations[layer]),
                                   e.activation_to_numpy(out_none.preactivations[layer]), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("model", MODELS)
def test_forward(engine, spec_factory, rng, ref, model):
    e = engine
    plan = _plan(spec_factory, model)
    params, state = plan.initial_parameters(seed=1)
    params = _perturbed(params, rng)
    images, _ = _data(rng)
    out = plan.forward(e.ops, e.import_tree(params), e.import_tree(state), e.put_images(images), training=True)
    logits, preacts, _ = ref.forward(plan.arch, _weight_normalized(params), {}, images, normalization="none")
    rtol, atol = (1e-11, 1e-12) if e.dtype == "float64" else (5e-5, 5e-6)
    np.testing.assert_allclose(e.activation_to_numpy(out.logits), logits, rtol=rtol, atol=atol)
    for layer, z in preacts.items():
        np.testing.assert_allclose(e.activation_to_numpy(out.preactivations[layer]), z, rtol=rtol, atol=atol, err_msg=layer)


def _objective(plan, ref, params, images, labels):
    """CE of the reference network + 0.5 * wd * sum of the *stored* kernels v squared."""
    logits, _, _ = ref.forward(plan.arch, _weight_normalized(params), {}, images, normalization="none")
    penalty = sum(np.sum(v * v) for k, v in params.items() if k.endswith("/kernel"))
    return ref.softmax_cross_entropy(logits, labels) + 0.5 * WEIGHT_DECAY * penalty


@pytest.mark.parametrize("model", MODELS)
def test_gradients_match_finite_differences(engine64, spec_factory, rng, ref, model):
    e = engine64
    plan = _plan(spec_factory, model)
    params, state = plan.initial_parameters(seed=5)
    params = _perturbed(params, rng)
    images, labels = _data(rng)
    x, y = e.put_images(images), e.put_labels(labels)
    grads, seen = e.trainer(plan, params, state, x, y).gradients(x, y)
    np.testing.assert_allclose(seen["total_loss"], _objective(plan, ref, params, images, labels), rtol=1e-11)
    ref.check_gradients(grads, lambda p: _objective(plan, ref, p, images, labels), params, rng)


def test_weight_decay_applies_to_the_kernel_only():
    params = {"dense1/kernel": np.ones((3, 2)), "dense1/gain": np.ones(2), "dense1/bias": np.ones(2)}
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    out = add_weight_decay_gradient(params, zero, 0.5)
    assert np.all(out["dense1/kernel"] == 0.5) and np.all(out["dense1/gain"] == 0) and np.all(out["dense1/bias"] == 0)


# ----------------------------------------------------------------------------- cross-backend parity

AVAILABLE = backends.available()
needs_two = pytest.mark.skipif(len(AVAILABLE) < 2, reason=f"parity needs two backends; available: {AVAILABLE}")


@needs_two
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity(spec_factory, dtype):
    """On cnn-tiny (PyTorch's OIHW kernels exercise the layout-aware primitives); mlp-tiny's
    dense path is covered against NumPy above. `normbench parity` runs cnn3 and mlp3."""
    spec = spec_factory(model="cnn-tiny", dtype=dtype, batch_size=16, variants=[{"name": "wn", "normalization": "weight_norm"}],
                        optimizer={"name": "sgd", "learning_rate": 0.1, "weight_decay": WEIGHT_DECAY})
    rows = parity.compare_step(spec, "wn", AVAILABLE, dtype) + parity.compare_trajectory(spec, "wn", AVAILABLE, 3, dtype)
    assert any(r.quantity.endswith("/gain") for r in rows)
    failed = [r for r in rows if not r.ok]
    assert not failed, failed
    if dtype == "float64":
        assert max(r.max_rel for r in rows) <= 1e-9
