"""Group norm (`normbench/normalizations/group_norm.py`) against an independent float64
NumPy reference written from the formula (loops over examples and groups): forward
output in training and inference mode on NHWC and (N, C) inputs, gradients of a whole
network through it against central finite differences, cross-backend parity of one step
and a short trajectory, and the spec validator's message for indivisible channels."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import backends, normalizations, parity
from normbench.normalizations import Slot
from normbench.plan import resolve
from normbench.spec import SpecError

EPSILON = 1e-3


def np_group_norm(z, scale, shift, groups, epsilon=EPSILON):
    """y[n, ..., c] = (z - mean) / sqrt(var + eps) * scale[c] + shift[c], mean and the biased
    var over example n's positions and the C / G channels of c's group."""
    y = np.empty_like(z)
    per_group = z.shape[-1] // groups
    for n in range(z.shape[0]):
        for g in range(groups):
            block = z[n, ..., g * per_group:(g + 1) * per_group]
            mean = block.mean()
            var = ((block - mean) ** 2).mean()
            y[n, ..., g * per_group:(g + 1) * per_group] = (block - mean) / np.sqrt(var + epsilon)
    return y * scale + shift


def _tolerances(dtype):
    return (1e-10, 1e-12) if dtype == "float64" else (1e-4, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape,groups", [((5, 4, 3, 6), 3), ((5, 4, 3, 6), 1), ((5, 4, 3, 6), 6), ((7, 12), 4)],
                         ids=["nhwc-g3", "nhwc-g1", "nhwc-g6", "dense-g4"])
def test_forward_matches_reference(engine, rng, ref, shape, groups, training):
    e = engine
    method = normalizations.get("group_norm")(groups=groups, epsilon=EPSILON)
    slot = Slot("layer", "conv" if len(shape) == 4 else "dense", shape[1:], ())
    assert method.check_slot(slot) is None
    # An offset per channel and a different spread per example: wrong axes show.
    z = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=(shape[0],) + (1,) * (len(shape) - 1))
         + rng.normal(size=shape[-1]) * 2).astype(e.dtype).astype(np.float64)
    scale, shift = rng.uniform(0.5, 2.0, size=shape[-1]), rng.normal(size=shape[-1])
    params = e.import_tree({"scale": scale, "shift": shift})
    if training:
        y, state = method.train(e.ops, ref.put_activation(e, z), params, {}, slot)
        assert state == {}
    else:
        y = method.infer(e.ops, ref.put_activation(e, z), params, {}, slot)
    rtol, atol = _tolerances(e.dtype)
    np.testing.assert_allclose(e.activation_to_numpy(y), np_group_norm(z, scale, shift, groups), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- whole network

VARIANT = {"name": "gn", "normalization": {"name": "group_norm", "groups": 4}}


def np_objective(ref, plan, params, images, labels):
    """Cross entropy of `plan`'s straight-chain network with group norm in every slot."""
    return ref.chain_objective(plan, params, images, labels, lambda z, p, layer: np_group_norm(
        z, p[f"{layer}/scale"], p[f"{layer}/shift"], 4))


def test_network_gradients_match_finite_differences(engine64, rng, ref, spec_factory):
    plan = resolve(spec_factory(model="cnn3", batch_size=4, variants=[VARIANT]), "gn")
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
    # mlp-tiny (8 and 6 units, 2 groups) keeps this fast; the convolutional case is the
    # gradient test above on every backend, and `normbench parity` on cnn3.
    variant = {"name": "gn", "normalization": {"name": "group_norm", "groups": 2}}
    spec = spec_factory(model="mlp-tiny", batch_size=8, dtype=dtype, variants=[variant])
    rows = parity.compare_step(spec, "gn", available, dtype) + parity.compare_trajectory(spec, "gn", available, 2, dtype)
    assert {"gradient/dense1/scale", "gradient/dense2/shift", "final/dense1/scale"} <= {r.quantity for r in rows}
    assert all(r.ok for r in rows), parity.format_table([r for r in rows if not r.ok])
    if dtype == "float64":
        assert max(r.max_rel for r in rows) <= 1e-9


# ----------------------------------------------------------------------------- validation


def test_indivisible_channels_are_a_one_line_spec_error(spec_factory):
    with pytest.raises(SpecError) as caught:  # cnn-tiny's conv2 has 3 channels
        spec_factory(model="cnn-tiny", variants=[{"name": "gn", "normalization": {"name": "group_norm", "groups": 2}}])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("<test>: variant[0].normalization: ")
    assert "layer conv2" in message and "3 channels" in message and "groups = 2" in message


def test_groups_must_be_a_positive_integer(spec_factory):
    with pytest.raises(SpecError, match=r"variant\[0\]\.normalization\.groups"):
        spec_factory(model="mlp-tiny", variants=[{"name": "gn", "normalization": {"name": "group_norm", "groups": 0}}])


def test_defaults_are_the_papers():
    method = normalizations.get("group_norm")()
    assert method.groups == 32 and method.epsilon == 1e-3 and method.provides_offset
