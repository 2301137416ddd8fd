"""Instance norm (`normbench/normalizations/instance_norm.py`) against an independent
float64 NumPy reference written from the formula (loops over examples and channels):
forward output in training and inference mode on NHWC inputs, gradients of a whole
network through it against central finite differences, cross-backend parity of one step
and a short trajectory, and the spec validator's message for an MLP."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import backends, normalizations, parity
from normbench.normalizations import Slot
from normbench.plan import resolve
from normbench.spec import SpecError

EPSILON = 1e-3
VARIANT = {"name": "in", "normalization": {"name": "instance_norm"}}


def np_instance_norm(z, scale, shift, epsilon=EPSILON):
    """y[n, :, :, c] = (z - mean) / sqrt(var + eps) * scale[c] + shift[c], mean and the biased
    var over example n's spatial positions in channel c."""
    y = np.empty_like(z)
    for n in range(z.shape[0]):
        for c in range(z.shape[-1]):
            plane = z[n, :, :, c]
            mean = plane.mean()
            y[n, :, :, c] = (plane - mean) / np.sqrt(((plane - mean) ** 2).mean() + epsilon)
    return y * scale + shift


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape", [(5, 4, 3, 6), (3, 1, 7, 2)], ids=["nhwc", "nhwc-one-row"])
def test_forward_matches_reference(engine, rng, ref, shape, training):
    e = engine
    method = normalizations.get("instance_norm")()
    assert method.epsilon == EPSILON and method.provides_offset
    slot = Slot("layer", "conv", shape[1:], ())
    assert method.check_slot(slot) is None
    # A different offset and spread per example and channel: wrong axes show.
    z = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=(shape[0], 1, 1, shape[-1])) \
        + rng.normal(size=(shape[0], 1, 1, shape[-1])) * 2
    z = z.astype(e.dtype).astype(np.float64)
    scale, shift = rng.uniform(0.5, 2.0, size=shape[-1]), rng.normal(size=shape[-1])
    params = e.import_tree({"scale": scale, "shift": shift})
    if training:
        y, state = method.train(e.ops, e.put_images(z), params, {}, slot)
        assert state == {}
    else:
        y = method.infer(e.ops, e.put_images(z), params, {}, slot)
    rtol, atol = (1e-10, 1e-12) if e.dtype == "float64" else (1e-4, 1e-5)
    np.testing.assert_allclose(e.activation_to_numpy(y), np_instance_norm(z, scale, shift), rtol=rtol, atol=atol)


def np_objective(ref, plan, params, images, labels):
    """Cross entropy of `plan`'s straight-chain CNN with instance norm in every slot."""
    return ref.chain_objective(plan, params, images, labels, lambda z, p, layer: np_instance_norm(
        z, p[f"{layer}/scale"], p[f"{layer}/shift"]))


def test_network_gradients_match_finite_differences(engine64, rng, ref, spec_factory):
    plan = resolve(spec_factory(model="cnn-tiny", batch_size=4, variants=[VARIANT]), "in")
    params, state = plan.initial_parameters(seed=3)
    assert state == {} and "conv1/bias" not in params and "conv1/scale" in params
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
    rows = parity.compare_step(spec, "in", available, dtype) + parity.compare_trajectory(spec, "in", available, 2, dtype)
    assert {"gradient/conv1/scale", "gradient/conv2/shift", "final/conv1/scale"} <= {r.quantity for r in rows}
    assert all(r.ok for r in rows), parity.format_table([r for r in rows if not r.ok])
    if dtype == "float64":
        assert max(r.max_rel for r in rows) <= 1e-9


def test_an_mlp_is_a_one_line_spec_error(spec_factory):
    with pytest.raises(SpecError) as caught:
        spec_factory(model="mlp-tiny", variants=[VARIANT])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("<test>: variant[0].normalization: ")
    assert "layer dense1" in message and "dense layer" in message and "spatial" in message


def test_a_single_position_is_rejected():
    assert "single spatial position" in normalizations.get("instance_norm")().check_slot(Slot("c", "conv", (1, 1, 4), (3, 3, 2, 4)))
