"""The architectures: padding, layer shapes, initialization, conv/flatten per backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normbench import architectures
from normbench.architectures import Architecture, conv_padding
from normbench.data_order import seed_streams

from normbench.plan import resolve
from normbench import spec as spec_module

NORMALIZATIONS = ["none", "batch_norm_shift", "batch_norm_scale_shift", "standardization_loss"]


# ----------------------------------------------------------------------------- padding and shapes


@pytest.mark.parametrize("size,kernel,stride,mode,pads,out", [
    (28, 5, 2, "same", (1, 2), 14),  # TensorFlow SAME: the odd pixel at the bottom/right
    (14, 5, 2, "same", (1, 2), 7),
    (7, 5, 2, "same", (2, 2), 4),
    (4, 3, 2, "same", (0, 1), 2),
    (5, 3, 1, "same", (1, 1), 5),
    (6, 3, 2, "same", (0, 1), 3),
    (1, 5, 2, "same", (2, 2), 1),
    (3, 1, 3, "same", (0, 0), 1),  # kernel smaller than the stride: no padding needed
    (28, 5, 2, "valid", (0, 0), 12),
    (7, 5, 2, "valid", (0, 0), 2),
    (5, 5, 1, "valid", (0, 0), 1),
])
def test_conv_padding_table(size, kernel, stride, mode, pads, out):
    assert conv_padding(size, kernel, stride, mode) == (pads, out)


def test_conv_padding_rejects_unknown_mode():
    with pytest.raises(ValueError, match="full"):
        conv_padding(28, 5, 2, "full")


def _shapes(arch):
    return [(layer.name, layer.kernel_shape, layer.pads) for layer in arch.layers()]


def test_cnn3_layer_shapes():
    assert _shapes(architectures.get("cnn3")) == [
        ("conv1", (5, 5, 1, 32), ((1, 2), (1, 2))),  # 28 -> 14
        ("conv2", (5, 5, 32, 16), ((1, 2), (1, 2))),  # 14 -> 7
        ("conv3", (5, 5, 16, 8), ((2, 2), (2, 2))),  # 7 -> 4
        ("logits", (4 * 4 * 8, 10), None),  # the dense head sees 128 features
    ]
    assert architectures.get("cnn3").is_convolutional
    assert [slot.layer for slot in architectures.get("cnn3").slots] == ["conv1", "conv2", "conv3"]


def test_mlp3_layer_shapes():
    assert _shapes(architectures.get("mlp3")) == [
        ("dense1", (784, 100), None), ("dense2", (100, 100), None), ("dense3", (100, 100), None), ("logits", (100, 10), None)]
    assert not architectures.get("mlp3").is_convolutional


def _valid_net(net, x):
    x = net.conv("c1", x, 6, kernel_size=3, stride=1, padding="valid")
    x = net.conv("c2", x, 2, kernel_size=3, stride=2, padding="valid")
    return net.dense("logits", x, 4, normalize=False, activation=None)


def test_valid_padding_shapes():
    arch = Architecture("v", (10, 10, 3), 4, _valid_net)
    # 10 -> 8 -> 3
    assert _shapes(arch) == [("c1", (3, 3, 3, 6), ((0, 0), (0, 0))), ("c2", (3, 3, 6, 2), ((0, 0), (0, 0))),
                             ("logits", (18, 4), None)]
    wrong = Architecture("wrong-classes", (10, 10, 3), 5, _valid_net)
    with pytest.raises(ValueError, match="expected"):
        wrong.layers()


def test_architectures_registry_lists_every_family_file():
    assert {"cnn3", "mlp3", "cnn-tiny", "mlp-tiny"} <= set(architectures.names())
    with pytest.raises(KeyError, match="did you mean 'cnn3'"):
        architectures.get("cnn33")


# ----------------------------------------------------------------------------- initialization


def _params(model, normalization, seed):
    """Initial parameters of a bundled-spec-like variant written the old way."""
    variant = {"name": "v", "normalization": normalization}
    if normalization == "standardization_loss":
        variant["standardization_loss_weight"] = 1.0
    text = (f'name = "t"\nmodel = "{model}"\ndataset = "mnist"\nbatch_size = 8\nsteps = 1\neval_every = 1\nseeds = 1\n'
            '[optimizer]\nname = "sgd"\nlearning_rate = 0.1\n[[variant]]\n' + "\n".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in variant.items()))
    spec = spec_module.loads(text)
    return resolve(spec, spec.variants[0]).initial_parameters(seed)


def kernel_names(params):
    return [k for k in params if k.endswith("/kernel")]


@pytest.mark.parametrize("model", ["cnn3", "mlp3"])
def test_glorot_uniform_limits_and_statistics(model):
    params, _ = _params(model, "none", 0)
    for name, shape, _ in _shapes(architectures.get(model)):
        kernel = params[f"{name}/kernel"]
        assert kernel.shape == shape and kernel.dtype == np.float64
        receptive = shape[0] * shape[1] if len(shape) == 4 else 1
        limit = math.sqrt(6.0 / (shape[-2] * receptive + shape[-1] * receptive))
        assert np.abs(kernel).max() <= limit
        assert np.abs(kernel).max() > 0.9 * limit  # uniform over the whole interval, not a narrower one
        # U(-a, a): mean 0, variance a^2 / 3 = 2 / (fan_in + fan_out); within 5 standard errors.
        n = kernel.size
        assert abs(kernel.mean()) < 5 * limit / math.sqrt(3 * n)
        assert kernel.var() == pytest.approx(limit**2 / 3, rel=5 * math.sqrt(0.8 / n))
    # Spot values: cnn3 conv1 limit sqrt(6 / (25 + 800)), mlp3 dense1 sqrt(6 / 884).
    expected = {"cnn3": ("conv1/kernel", math.sqrt(6 / 825)), "mlp3": ("dense1/kernel", math.sqrt(6 / 884))}[model]
    assert np.abs(params[expected[0]]).max() == pytest.approx(expected[1], rel=0.02)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_biases_shifts_scales_and_state(normalization):
    params, state = _params("cnn3", normalization, 1)
    bn = normalization.startswith("batch_norm")
    hidden = ["conv1", "conv2", "conv3"]
    for layer, channels in zip(hidden, (32, 16, 8)):
        if bn:
            assert f"{layer}/bias" not in params
            np.testing.assert_array_equal(params[f"{layer}/shift"], np.zeros(channels))
            np.testing.assert_array_equal(state[f"{layer}/running_mean"], np.zeros(channels))
            np.testing.assert_array_equal(state[f"{layer}/running_var"], np.ones(channels))
        else:
            np.testing.assert_array_equal(params[f"{layer}/bias"], np.zeros(channels))
            assert f"{layer}/shift" not in params
        if normalization == "batch_norm_scale_shift":
            np.testing.assert_array_equal(params[f"{layer}/scale"], np.ones(channels))
        else:
            assert f"{layer}/scale" not in params
    np.testing.assert_array_equal(params["logits/bias"], np.zeros(10))
    assert bool(state) == bn
    assert kernel_names(params) == ["conv1/kernel", "conv2/kernel", "conv3/kernel", "logits/kernel"]


@pytest.mark.parametrize("model", ["cnn3", "mlp3"])
def test_init_is_deterministic_and_shared_by_variants(model):
    reference, _ = _params(model, "none", 7)
    for normalization in NORMALIZATIONS:
        params, _ = _params(model, normalization, 7)
        for name in kernel_names(reference):
            np.testing.assert_array_equal(params[name], reference[name], err_msg=f"{normalization} {name}")
    other, _ = _params(model, "none", 8)
    for name in kernel_names(reference):
        assert not np.allclose(other[name], reference[name]), name
    # The weights stream is not the data-order stream.
    init_seed, data_seed = seed_streams(7)
    assert not np.array_equal(init_seed.generate_state(4), data_seed.generate_state(4))


def test_program_initial_parameters_follow_the_seed(program_factory):
    program = program_factory("batch_norm_shift", model="cnn-tiny")
    a, _ = program.initial_parameters(3)
    b, _ = program.initial_parameters(3)
    c, _ = _params("cnn-tiny", "none", 3)
    for name in kernel_names(a):
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])


# ----------------------------------------------------------------------------- backends: layout, conv, flatten


def test_canonical_layout_round_trip(engine, rng):
    tree = {"k4": rng.normal(size=(5, 3, 2, 7)), "k2": rng.normal(size=(12, 4)), "b": rng.normal(size=7)}
    back = engine.export_tree(engine.import_tree(tree))
    assert set(back) == set(tree)
    for name, value in tree.items():
        assert back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value.astype(engine.dtype))
    images = rng.normal(size=(3, 5, 4, 2))
    np.testing.assert_array_equal(engine.activation_to_numpy(engine.put_images(images)), images.astype(engine.dtype))
    labels = np.array([3, 0, 9])
    np.testing.assert_array_equal(engine.to_numpy(engine.put_labels(labels)), labels)


@pytest.mark.parametrize("size,channels,kernel,stride,pads", [
    ((28, 28), (1, 4), 5, 2, ((1, 2), (1, 2))),
    ((7, 7), (3, 2), 5, 2, ((2, 2), (2, 2))),
    ((9, 6), (2, 3), 3, 1, ((0, 0), (0, 0))),  # valid
    ((6, 5), (2, 2), 3, 2, ((0, 1), (1, 1))),  # different padding per axis
    ((5, 6), (1, 2), 2, 1, ((1, 0), (0, 1))),  # the odd pixel on the other side
], ids=["28-k5s2", "7-k5s2", "valid", "mixed", "low-pad"])
def test_conv2d_against_numpy(engine, rng, ref, tolerance, size, channels, kernel, stride, pads):
    x = rng.normal(size=(2, *size, channels[0]))
    k = rng.normal(size=(kernel, kernel, *channels))
    out = engine.activation_to_numpy(engine.ops.conv2d(engine.put_images(x), engine.import_tree({"k": k})["k"], stride, pads))
    expected = ref.conv2d(x.astype(engine.dtype).astype(np.float64), k.astype(engine.dtype).astype(np.float64), stride, pads)
    assert out.shape == expected.shape
    rtol, atol = tolerance[engine.dtype]
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol * 100)
    # The alignment matters: the symmetric alternative is a different result.
    (top, bottom), (left, right) = pads
    if top != bottom:
        shifted = ref.conv2d(x, k, stride, ((bottom, top), (left, right)))
        if shifted.shape == expected.shape:
            assert not np.allclose(shifted, expected, atol=1e-3)


def test_flatten_order_is_hwc(engine, rng):
    x = rng.normal(size=(3, 4, 5, 6))
    flat = engine.activation_to_numpy(engine.ops.flatten(engine.put_images(x)))
    np.testing.assert_array_equal(flat, x.reshape(3, -1).astype(engine.dtype))
    # Feature index of (h, w, c) is (h * W + w) * C + c.
    assert flat[1, (2 * 5 + 3) * 6 + 4] == np.asarray(x[1, 2, 3, 4], dtype=engine.dtype)


def test_dense_and_channel_primitives(engine, rng, tolerance):
    x, k = rng.normal(size=(4, 6)), rng.normal(size=(6, 3))
    e = engine
    dense = e.ops.dense(e.import_tree({"x": x})["x"], e.import_tree({"k": k})["k"])
    rtol, atol = tolerance[e.dtype]
    np.testing.assert_allclose(e.activation_to_numpy(dense), x @ k, rtol=rtol, atol=atol * 10)
    images, bias, scale = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=4), rng.normal(size=4)
    b, s = e.import_tree({"b": bias, "s": scale}).values()
    got = e.activation_to_numpy(e.ops.add_channel_bias(e.ops.scale_channels(e.put_images(images), s), b))
    np.testing.assert_allclose(got, images * scale + bias, rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("model", ["cnn3", "mlp3"])
def test_forward_logits_against_numpy(engine, rng, ref, program_factory, nets, model):
    """The paper's models, no normalization, end to end against the NumPy reference forward."""
    program = program_factory("none", model=model)
    params, state = program.initial_parameters(seed=0)
    params = {k: (rng.normal(size=v.shape) * 0.1 if k.endswith("/bias") else v) for k, v in params.items()}
    images = rng.uniform(0, 1, size=(3, 28, 28, 1))
    e = engine
    out = nets.forward(e, program.arch, params, state, images, normalization="none")
    logits, preacts, _ = ref.forward(program.arch, params, state, images, normalization="none")
    rtol = 1e-10 if e.dtype == "float64" else 1e-4
    np.testing.assert_allclose(e.activation_to_numpy(out.logits), logits, rtol=rtol, atol=rtol)
    assert list(out.preactivations) == [slot.layer for slot in program.arch.slots]
    for name, z in preacts.items():
        np.testing.assert_allclose(e.activation_to_numpy(out.preactivations[name]), z, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(e.to_numpy(out.moments[name][1]), ref.moments(z)[1], rtol=rtol * 10, atol=rtol)


def test_depth_counts_the_longest_path_of_weight_layers():
    """The depth parity scales its single-step float32 bounds by (`normbench.parity`)."""
    from normbench.architectures import get

    depths = {name: get(name).depth for name in ("cnn3", "mlp3", "resnet-18", "resnet-50", "mobilenet-v1", "inception-v2")}
    # cnn3 / mlp3: 3 hidden layers and the head; ResNet-n: n (projection shortcuts are not longer paths);
    # MobileNet-v1: the stem, 13 depthwise and 13 pointwise convolutions and the head
    assert depths == {"cnn3": 4, "mlp3": 4, "resnet-18": 18, "resnet-50": 50, "mobilenet-v1": 28, "inception-v2": 35}
