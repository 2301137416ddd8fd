"""Layer norm (`normbench/normalizations/layer_norm.py`) against an independent float64
NumPy reference written from the formula (a loop over examples): forward output in
training and inference mode on NHWC and (N, C) inputs, gradients of a whole network
through it against central finite differences, and cross-backend parity of one step and
a short trajectory."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import backends, normalizations, parity
from normbench.normalizations import Slot
from normbench.plan import resolve

EPSILON = 1e-3
VARIANT = {"name": "ln", "normalization": {"name": "layer_norm"}}


def np_layer_norm(z, scale, shift, epsilon=EPSILON):
    """y[n] = (z[n] - mean) / sqrt(var + eps) * scale + shift, mean and the biased var over
    all of example n's units (H, W and C, or C)."""
    y = np.empty_like(z)
    for n in range(z.shape[0]):
        mean = z[n].mean()
        y[n] = (z[n] - mean) / np.sqrt(((z[n] - mean) ** 2).mean() + epsilon)
    return y * scale + shift


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape", [(5, 4, 3, 6), (7, 12)], ids=["nhwc", "dense"])
def test_forward_matches_reference(engine, rng, ref, shape, training):
    e = engine
    method = normalizations.get("layer_norm")()
    assert method.epsilon == EPSILON and method.provides_offset
    slot = Slot("layer", "conv" if len(shape) == 4 else "dense", shape[1:], ())
    assert method.check_slot(slot) is None
    # A different offset and spread per example and per channel: wrong axes show.
    z = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=(shape[0],) + (1,) * (len(shape) - 1))
         + rng.normal(size=shape[-1]) * 2 + rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)))
    z = z.astype(e.dtype).astype(np.float64)
    scale, shift = rng.uniform(0.5, 2.0, size=shape[-1]), rng.normal(size=shape[-1])
    params = e.import_tree({"scale": scale, "shift": shift})
    if training:
        y, state = method.train(e.ops, ref.put_activation(e, z), params, {}, slot)
        assert state == {}
    else:
        y = method.infer(e.ops, ref.put_activation(e, z), params, {}, slot)
    rtol, atol = (1e-10, 1e-12) if e.dtype == "float64" else (1e-4, 1e-5)
    np.testing.assert_allclose(e.activation_to_numpy(y), np_layer_norm(z, scale, shift), rtol=rtol, atol=atol)


def np_objective(ref, plan, params, images, labels):
    """Cross entropy of `plan`'s straight-chain network with layer norm in every slot."""
    return ref.chain_objective(plan, params, images, labels, lambda z, p, layer: np_layer_norm(
        z, p[f"{layer}/scale"], p[f"{layer}/shift"]))


@pytest.mark.parametrize("model", ["cnn-tiny", "mlp-tiny"])
def test_network_gradients_match_finite_differences(engine64, rng, ref, spec_factory, model):
    plan = resolve(spec_factory(model=model, batch_size=4, variants=[VARIANT]), "ln")
    params, state = plan.initial_parameters(seed=3)
    first = plan.slots[0].layer
    assert state == {} and f"{first}/bias" not in params and f"{first}/scale" in params
    ref.perturb_scales_and_shifts(params, rng)
    images, labels = rng.normal(size=(4, 28, 28, 1)) + 0.5, rng.integers(0, 10, size=4)
    e = engine64
    x, y = e.put_images(images), e.put_labels(labels)
    grads, seen = e.trainer(plan, params, state, x, y).gradients(x, y)
    np.testing.assert_allclose(seen["total_loss"], np_objective(ref, plan, params, images, labels), rtol=1e-11)
    ref.check_gradients(grads, lambda p: np_objective(ref, plan, p, images, labels), params, rng,
                        coordinates=3, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_across_backends(dtype, spec_factory):
    available = backends.available()
    if len(available) < 2:
        pytest.skip(f"parity needs two backends; available: {available}")
    spec = spec_factory(model="cnn-tiny", batch_size=8, dtype=dtype, variants=[VARIANT])
    rows = parity.compare_step(spec, "ln", available, dtype) + parity.compare_trajectory(spec, "ln", available, 2, dtype)
    assert {"gradient/conv1/scale", "gradient/conv2/shift", "final/conv1/scale"} <= {r.quantity for r in rows}
    assert all(r.ok for r in rows), parity.format_table([r for r in rows if not r.ok])
    if dtype == "float64":
        assert max(r.max_rel for r in rows) <= 1e-9


def test_a_single_unit_layer_is_rejected():
    assert "single unit" in normalizations.get("layer_norm")().check_slot(Slot("d", "dense", (1,), (4, 1)))
