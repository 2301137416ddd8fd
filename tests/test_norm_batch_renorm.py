"""Batch renorm (`normbench/normalizations/batch_renorm.py`) against an independent
float64 NumPy reference written from Ioffe (2017), Algorithm 1: training output with r
and d clipped (inputs built so that the clipping binds on some channels and not on
others), the r_max / d_max warm-up, running statistics and the step counter, inference
with the running statistics, gradients of a whole network with r and d held constant
(stop_gradient) against central finite differences, and cross-backend parity."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import backends, normalizations, parity
from normbench.normalizations import Slot
from normbench.plan import resolve
from normbench.spec import SpecError

DEFAULTS = dict(r_max=3.0, d_max=5.0, warmup_start=0, warmup_steps=500, running_decay=0.99, epsilon=1e-3,
                replica_batch_size=None)
# Per channel, cycled: running var = batch var x factor (r ~ 1 / sqrt(factor)) and running
# mean = batch mean - delta x sigma (d = delta). With the final limits r_max 3, d_max 5:
# r 4 -> 3 and 0.2 -> 1/3 clipped, 1 and 1.41 not; d 8 -> 5 and -7 -> -5 clipped, 0.5 and -0.2 not.
VAR_FACTORS = (1 / 16, 1.0, 25.0, 0.5)
MEAN_DELTAS = (8.0, 0.5, -7.0, -0.2)


def np_limits(step, o):
    if o["warmup_steps"]:
        progress = min(max((step - o["warmup_start"]) / o["warmup_steps"], 0.0), 1.0)
    else:
        progress = 1.0 if step >= o["warmup_start"] else 0.0
    return 1.0 + (o["r_max"] - 1.0) * progress, o["d_max"] * progress


def np_batch_renorm(z, scale, shift, running_mean, running_var, step, o, fixed=None):
    """Training mode: (y, new state, (r, d, unclipped r, unclipped d)). `fixed` = (r, d)
    replaces r and d (what stop_gradient means for a finite difference)."""
    axes = tuple(range(z.ndim - 1))
    mean = z.mean(axis=axes)
    var = ((z - mean) ** 2).mean(axis=axes)
    batch_sigma, sigma = np.sqrt(var + o["epsilon"]), np.sqrt(running_var + o["epsilon"])
    r_max, d_max = np_limits(step, o)
    r_free, d_free = batch_sigma / sigma, (mean - running_mean) / sigma
    r, d = (np.clip(r_free, 1.0 / r_max, r_max), np.clip(d_free, -d_max, d_max)) if fixed is None else fixed
    y = ((z - mean) / batch_sigma * r + d) * scale + shift
    decay = o["running_decay"]
    state = {"running_mean": decay * running_mean + (1 - decay) * mean,
             "running_var": decay * running_var + (1 - decay) * var, "step": np.array([step + 1.0])}
    return y, state, (r, d, r_free, d_free)


def binding_state(z, o):
    """Running statistics that make r and d clip on some channels of `z` and not on others."""
    axes = tuple(range(z.ndim - 1))
    mean = z.mean(axis=axes)
    var = ((z - mean) ** 2).mean(axis=axes)
    channels = z.shape[-1]
    running_var = var * np.resize(VAR_FACTORS, channels)
    running_mean = mean - np.resize(MEAN_DELTAS, channels) * np.sqrt(running_var + o["epsilon"])
    return running_mean, running_var


def _put(e, z):
    """A canonical activation onto a backend: images travel NHWC -> backend layout; (N, C) as is."""
    return e.put_images(z) if z.ndim == 4 else e.import_tree({"z": z})["z"]


def _tolerances(dtype):
    return (1e-10, 1e-12) if dtype == "float64" else (1e-4, 1e-5)


def _inputs(rng, shape, dtype):
    z = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[-1]) + rng.normal(size=shape[-1]) * 2
    return z.astype(dtype).astype(np.float64)


SHAPES = pytest.mark.parametrize("shape", [(6, 4, 3, 8), (16, 8)], ids=["nhwc", "dense"])


@SHAPES
def test_training_output_and_state_with_clipping(engine, rng, shape):
    e = engine
    method = normalizations.get("batch_renorm")()
    assert method.settings == DEFAULTS and method.provides_offset
    slot = Slot("layer", "conv" if len(shape) == 4 else "dense", shape[1:], ())
    z = _inputs(rng, shape, e.dtype)
    scale, shift = rng.uniform(0.5, 2.0, size=shape[-1]), rng.normal(size=shape[-1])
    running_mean, running_var = binding_state(z, DEFAULTS)
    step = 1000.0  # past the warm-up: r_max 3, d_max 5
    expected, expected_state, (r, d, r_free, d_free) = np_batch_renorm(z, scale, shift, running_mean, running_var, step, DEFAULTS)
    # The clipping binds on some channels and not on others, in both directions.
    assert (r_free > 3).any() and (r_free < 1 / 3).any() and ((r_free > 1 / 3) & (r_free < 3)).any()
    assert (d_free > 5).any() and (d_free < -5).any() and (np.abs(d_free) < 5).any()
    state = {"running_mean": running_mean, "running_var": running_var, "step": np.array([step])}
    y, new_state = method.train(e.ops, _put(e, z), e.import_tree({"scale": scale, "shift": shift}), e.import_tree(state), slot)
    rtol, atol = _tolerances(e.dtype)
    np.testing.assert_allclose(e.activation_to_numpy(y), expected, rtol=rtol, atol=atol)
    got = e.export_tree(new_state)
    assert set(got) == set(expected_state) and got["step"].shape == (1,)
    for key in expected_state:
        np.testing.assert_allclose(got[key], expected_state[key], rtol=rtol, atol=atol, err_msg=key)
    # Unclipped r and d would give a visibly different output (the clipping is what is tested).
    unclipped, _, _ = np_batch_renorm(z, scale, shift, running_mean, running_var, step, DEFAULTS, fixed=(r_free, d_free))
    assert np.abs(unclipped - expected).max() > 0.5


@SHAPES
def test_inference_uses_the_running_statistics(engine, rng, shape):
    e = engine
    method = normalizations.get("batch_renorm")()
    slot = Slot("layer", "conv" if len(shape) == 4 else "dense", shape[1:], ())
    z = _inputs(rng, shape, e.dtype)
    scale, shift = rng.uniform(0.5, 2.0, size=shape[-1]), rng.normal(size=shape[-1])
    running_mean, running_var = rng.normal(size=shape[-1]), rng.uniform(0.5, 2.0, size=shape[-1])
    state = {"running_mean": running_mean, "running_var": running_var, "step": np.array([7.0])}
    y = method.infer(e.ops, _put(e, z), e.import_tree({"scale": scale, "shift": shift}), e.import_tree(state), slot)
    expected = (z - running_mean) / np.sqrt(running_var + 1e-3) * scale + shift
    rtol, atol = _tolerances(e.dtype)
    np.testing.assert_allclose(e.activation_to_numpy(y), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("warmup_start,warmup_steps,step,limits", [
    (100, 400, 0.0, (1.0, 0.0)),     # before the ramp: plain batch norm
    (100, 400, 250.0, (1.75, 1.875)),  # 150 / 400 of the way
    (100, 400, 500.0, (3.0, 5.0)),   # the ramp's end
    (100, 400, 2000.0, (3.0, 5.0)),
    (3, 0, 2.0, (1.0, 0.0)),         # no ramp: plain batch norm for 3 steps, then the final limits
    (3, 0, 3.0, (3.0, 5.0)),
])
def test_warmup_ramps_the_limits(engine64, rng, warmup_start, warmup_steps, step, limits):
    e = engine64
    options = {**DEFAULTS, "warmup_start": warmup_start, "warmup_steps": warmup_steps}
    assert np_limits(step, options) == pytest.approx(limits)
    method = normalizations.get("batch_renorm")(**options)
    r_max, d_max = method.limits(e.ops, e.import_tree({"t": np.array([step])})["t"])
    np.testing.assert_allclose([e.to_numpy(r_max).item(), e.to_numpy(d_max).item()], limits, rtol=1e-15)
    shape = (16, 8)
    z = _inputs(rng, shape, "float64")
    scale, shift = np.ones(8), np.zeros(8)
    running_mean, running_var = binding_state(z, options)
    state = e.import_tree({"running_mean": running_mean, "running_var": running_var, "step": np.array([step])})
    y, _ = method.train(e.ops, _put(e, z), e.import_tree({"scale": scale, "shift": shift}), state, Slot("l", "dense", (8,), ()))
    expected, _, _ = np_batch_renorm(z, scale, shift, running_mean, running_var, step, options)
    np.testing.assert_allclose(e.activation_to_numpy(y), expected, rtol=1e-10, atol=1e-12)
    if limits == (1.0, 0.0):  # exactly batch norm
        mean, var = z.mean(axis=0), z.var(axis=0)
        np.testing.assert_allclose(e.activation_to_numpy(y), (z - mean) / np.sqrt(var + 1e-3), rtol=1e-10, atol=1e-12)


def test_running_statistics_and_step_through_the_trainer(engine, rng, spec_factory):
    """Three steps at learning rate 0: the running averages follow batch norm's rule and `step` counts."""
    plan = resolve(spec_factory(model="mlp-tiny", batch_size=4, variants=[{"name": "brn", "normalization": {
        "name": "batch_renorm", "running_decay": 0.9}}]), "brn")
    params, state = plan.initial_parameters(seed=1)
    assert state["dense1/step"].shape == (1,) and set(state) == {
        f"{layer}/{k}" for layer in ("dense1", "dense2") for k in ("running_mean", "running_var", "step")}
    images, labels = rng.uniform(0, 1, size=(12, 28, 28, 1)), rng.integers(0, 10, size=12)
    e = engine
    trainer = e.trainer(plan, params, state, e.put_images(images), e.put_labels(labels))
    images = images.astype(e.dtype).astype(np.float64)
    expected = dict(state)
    for step in range(3):
        indices = np.arange(4 * step, 4 * step + 4)
        trainer.step(indices, 0.0)
        x = images[indices].reshape(4, -1)
        for layer in ("dense1", "dense2"):
            z = x @ params[f"{layer}/kernel"]
            y, new, _ = np_batch_renorm(z, params[f"{layer}/scale"], params[f"{layer}/shift"], expected[f"{layer}/running_mean"],
                                        expected[f"{layer}/running_var"], float(step), {**DEFAULTS, "running_decay": 0.9})
            expected.update({f"{layer}/{k}": v for k, v in new.items()})
            x = np.maximum(y, 0.0)
    _, got = trainer.export()
    rtol, atol = _tolerances(e.dtype)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, atol=atol, err_msg=key)
    assert got["dense2/step"].tolist() == [3.0]


# ----------------------------------------------------------------------------- whole network

VARIANT = {"name": "brn", "normalization": {"name": "batch_renorm"}}


def np_network(ref, plan, params, state, images, labels, fixed=None, options=DEFAULTS):
    """(cross entropy, {layer: (r, d, unclipped r, unclipped d)}) of `plan`'s straight-chain
    network with batch renorm in training mode; `fixed` holds r and d per layer."""
    x, seen = images, {}
    for layer in plan.layers:
        kernel = params[f"{layer.name}/kernel"]
        z = ref.conv2d(x, kernel, layer.stride, layer.pads) if layer.kind == "conv" else x.reshape(len(x), -1) @ kernel
        if f"{layer.name}/bias" in params:
            z = z + params[f"{layer.name}/bias"]
        if not layer.normalized:
            break
        if f"{layer.name}/running_mean" not in state:  # make the clipping bind on this layer's batch
            state[f"{layer.name}/running_mean"], state[f"{layer.name}/running_var"] = binding_state(z, options)
            state[f"{layer.name}/step"] = np.array([1000.0])
        y, _, seen[layer.name] = np_batch_renorm(
            z, params[f"{layer.name}/scale"], params[f"{layer.name}/shift"], state[f"{layer.name}/running_mean"],
            state[f"{layer.name}/running_var"], float(state[f"{layer.name}/step"][0]), options,
            None if fixed is None else fixed[layer.name][:2])
        x = np.maximum(y, 0.0)
    return ref.softmax_cross_entropy(z, labels), seen


@pytest.mark.parametrize("model", ["cnn-tiny", "mlp-tiny"])
def test_network_gradients_hold_r_and_d_constant(engine64, rng, ref, spec_factory, model):
    plan = resolve(spec_factory(model=model, batch_size=6, variants=[VARIANT]), "brn")
    params, _ = plan.initial_parameters(seed=3)
    ref.perturb_scales_and_shifts(params, rng)
    images, labels = rng.normal(size=(6, 28, 28, 1)) + 0.5, rng.integers(0, 10, size=6)
    state = {}
    loss, seen = np_network(ref, plan, params, state, images, labels)
    for layer, (r, d, r_free, d_free) in seen.items():  # clipping binds on every layer
        assert (r != r_free).any() and (d != d_free).any() and (r == r_free).any(), layer
    e = engine64
    x, y = e.put_images(images), e.put_labels(labels)
    grads, intermediates = e.trainer(plan, params, state, x, y).gradients(x, y)
    np.testing.assert_allclose(intermediates["total_loss"], loss, rtol=1e-11)
    for layer in seen:
        assert intermediates[f"state/{layer}/step"].tolist() == [1001.0]
    h = 1e-6
    for name, value in params.items():
        for i in rng.choice(value.size, size=min(value.size, 3), replace=False):
            index = np.unravel_index(i, value.shape)
            moved = [{**params, name: value.copy()} for _ in range(2)]
            moved[0][name][index] += h
            moved[1][name][index] -= h
            numeric = (np_network(ref, plan, moved[0], state, images, labels, fixed=seen)[0]
                       - np_network(ref, plan, moved[1], state, images, labels, fixed=seen)[0]) / (2 * h)
            np.testing.assert_allclose(grads[name][index], numeric, rtol=1e-5, atol=1e-8, err_msg=f"{name}{index}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_across_backends(dtype, spec_factory):
    available = backends.available()
    if len(available) < 2:
        pytest.skip(f"parity needs two backends; available: {available}")
    # warmup_steps 1: plain batch norm at step 0, the final limits from step 1 on (r and d
    # then correct towards running statistics that are still close to their initial 0 and 1).
    variant = {"name": "brn", "normalization": {"name": "batch_renorm", "warmup_steps": 1}}
    spec = spec_factory(model="mlp-tiny", batch_size=8, dtype=dtype, variants=[variant])
    rows = parity.compare_step(spec, "brn", available, dtype) + parity.compare_trajectory(spec, "brn", available, 3, dtype)
    assert {"gradient/dense1/scale", "state/dense1/step", "final_state/dense2/step", "final_state/dense1/running_var"} <= {
        r.quantity for r in rows}
    assert all(r.ok for r in rows), parity.format_table([r for r in rows if not r.ok])
    if dtype == "float64":
        assert max(r.max_rel for r in rows) <= 1e-9


def test_option_ranges_are_spec_errors(spec_factory):
    with pytest.raises(SpecError, match=r"variant\[0\]\.normalization\.r_max: must be >= 1"):
        spec_factory(variants=[{"name": "brn", "normalization": {"name": "batch_renorm", "r_max": 0.5}}])
