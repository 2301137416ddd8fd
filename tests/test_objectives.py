"""The training objective: equation (2) (value and gradient), moments, weight decay."""

from __future__ import annotations

import numpy as np
import pytest

from normbench.auxiliary_losses import combine_moments
from normbench.auxiliary_losses.standardization import loss_numpy as standardization_loss_numpy
from normbench.plan import weight_decay_penalty


def _std_loss(ops, moments, log_epsilon):
    """Equation (2) summed over layers from per-channel moments (`Ops.standard_normal_kl`)."""
    total = 0.0
    for mean, var in moments.values():
        total = total + ops.standard_normal_kl(mean, var, log_epsilon)
    return total

EPS = 1e-8

# (shape, which channels get a near-zero / exactly-zero variance); 4D shapes are NHWC.
SHAPES = [
    pytest.param((16, 3), id="2d-c3"),
    pytest.param((7, 10), id="2d-c10"),
    pytest.param((5, 4, 4, 1), id="4d-c1"),
    pytest.param((3, 6, 5, 8), id="4d-c8"),
    pytest.param((2, 3, 3, 32), id="4d-c32"),
]


def _activation(rng, shape, degenerate: bool):
    """Random values with per-channel offsets and scales; optionally a near-dead and a dead channel."""
    channels = shape[-1]
    x = rng.normal(size=shape) * rng.uniform(0.2, 3.0, channels) + rng.normal(size=channels)
    if degenerate and channels >= 3:
        x[..., 0] = 0.25 + 1e-6 * rng.normal(size=shape[:-1])  # variance ~1e-12, below eps = 1e-8
        x[..., 1] = 0.0  # a dead ReLU input: variance exactly zero, log() kept finite by eps
    return x


def _to_backend(engine, x):
    return engine.put_images(x) if x.ndim == 4 else engine.import_tree({"x": x})["x"]


# ----------------------------------------------------------------------------- the reference itself


def test_reference_formula_by_hand():
    # One channel holding {1, 3}: mean 2, biased variance 1 -> 0.5 * (4 + 1 - log(1 + eps) - 1).
    x = np.array([[1.0], [3.0]])
    expected = 0.5 * (4.0 + 1.0 - np.log(1.0 + EPS) - 1.0)
    assert np.mean(x) == 2.0
    assert standardization_loss_numpy({"a": (np.array([2.0]), np.array([1.0]))}, EPS) == pytest.approx(expected, rel=1e-15)
    # A standard normal layer has (nearly) zero loss; eq. (2) is a KL divergence, so never negative.
    assert standardization_loss_numpy({"a": (np.zeros(5), np.ones(5))}, 0.0) == 0.0
    assert standardization_loss_numpy({"a": (np.zeros(5), np.ones(5))}, EPS) == pytest.approx(-2.5 * np.log1p(EPS))


@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_standardization_loss_matches_reference(rng, ref, shape):
    layers = {f"layer{i}": _activation(rng, shape, degenerate=True) for i in range(3)}
    moments = {k: ref.moments(z) for k, z in layers.items()}
    value = standardization_loss_numpy(moments, EPS)
    assert np.isfinite(value)
    assert value == pytest.approx(ref.std_loss(layers.values(), EPS), rel=1e-13)
    # Summed over layers.
    parts = [standardization_loss_numpy({k: m}, EPS) for k, m in moments.items()]
    assert value == pytest.approx(sum(parts), rel=1e-13)


def test_zero_variance_needs_eps(ref):
    z = np.zeros((4, 2))
    assert np.isfinite(ref.std_loss([z], EPS))
    # Each dead channel costs 0.5 * (-log(eps) - 1).
    assert ref.std_loss([z], EPS) == pytest.approx(2 * 0.5 * (-np.log(EPS) - 1.0), rel=1e-12)


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4, 5)])
def test_reference_gradient_matches_finite_differences(rng, ref, shape):
    z = _activation(rng, shape, degenerate=False)
    analytic = ref.std_loss_grad(z, EPS)
    h = 1e-6
    for index in [tuple(rng.integers(0, s) for s in shape) for _ in range(8)]:
        up, down = z.copy(), z.copy()
        up[index] += h
        down[index] -= h
        numeric = (ref.std_loss([up], EPS) - ref.std_loss([down], EPS)) / (2 * h)
        assert analytic[index] == pytest.approx(numeric, rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------- through each backend


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4]])
def test_backend_standardization_loss(engine64, rng, ref, shape):
    ops = engine64.ops
    layers = [_activation(rng, shape, degenerate=True), _activation(rng, shape, degenerate=False)]
    moments = {f"l{i}": ops.channel_moments(_to_backend(engine64, z)) for i, z in enumerate(layers)}
    for (mean, var), z in zip(moments.values(), layers):
        ref_mean, ref_var = ref.moments(z)
        np.testing.assert_allclose(engine64.to_numpy(mean), ref_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(engine64.to_numpy(var), ref_var, rtol=1e-9, atol=1e-18)
    if shape[-1] >= 3:
        assert engine64.to_numpy(moments["l0"][1])[1] == 0.0  # the dead channel
    value = float(engine64.to_numpy(_std_loss(ops, moments, EPS)))
    assert np.isfinite(value)
    np.testing.assert_allclose(value, ref.std_loss(layers, EPS), rtol=1e-11)


def test_backend_channel_moments_are_stable(engine, rng, ref):
    """A large common offset must not destroy the variance (two-pass or Welford, never E[x^2] - E[x]^2)."""
    x = (1000.0 + 0.01 * rng.normal(size=(64, 6, 6, 3))).astype(engine.dtype).astype(np.float64)
    mean, var = engine.ops.channel_moments(engine.put_images(x))
    ref_mean, ref_var = ref.moments(x)
    rtol = 1e-8 if engine.dtype == "float64" else 1e-2
    np.testing.assert_allclose(engine.to_numpy(mean), ref_mean, rtol=1e-12 if engine.dtype == "float64" else 1e-6)
    np.testing.assert_allclose(engine.to_numpy(var), ref_var, rtol=rtol)
    assert engine.ops.reduced_count(engine.put_images(x)) == 64 * 6 * 6


@pytest.mark.parametrize("whole", [False, True], ids=["per-layer", "standardization_loss"])
@pytest.mark.parametrize("shape", [(16, 128), (8, 3, 3, 24)], ids=["dense", "conv"])
def test_backend_loss_gradient_summed_over_the_batch_where_spreads_are_tiny(engine32, backend_gradient, rng, ref, shape,
                                                                            whole):
    """Eq. (2)'s input gradient summed over every axis but the channel, which is what a bias
    before the slot receives, in float32, for channels whose spread (3e-5 to 3e-3) is tiny
    beside their mean (~1.9). Its variance part, (1 - 1 / (var + eps)) (x - mean) / n, sums
    to 0 and is huge, so the sum holds only if the gradient keeps the centring mean's term
    (`Ops.channel_moments`): without it, PyTorch's and TensorFlow's sums were off by 4x
    their size; with it, 4e-5 to 7e-5 in every backend. Against float64 from the same float32
    inputs (the inputs' own rounding moves that sum by 8e-9)."""
    channels = shape[-1]
    x = 1.9 * rng.normal(size=channels) + rng.normal(size=shape) * np.logspace(-4.5, -2.5, channels)
    x = x.astype(np.float32).astype(np.float64)
    ops, rank = engine32.ops, len(shape)

    def loss(z):
        if whole:  # the whole network's loss, as the objective takes it (PyTorch's fused Function)
            return ops.standardization_loss([z], EPS)
        return _std_loss(ops, {"a": ops.channel_moments(z)}, EPS)

    grad = backend_gradient(engine32, loss, x, activation=rank == 4)
    expected = ref.std_loss_grad(x, EPS)
    summed, expected_sum = grad.sum(axis=tuple(range(rank - 1))), expected.sum(axis=tuple(range(rank - 1)))
    assert np.max(np.abs(summed - expected_sum)) <= 1e-3 * np.max(np.abs(expected_sum))
    np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-4 * np.max(np.abs(expected)))


def test_backend_zero_variance_loss_is_finite(engine, ref):
    ops = engine.ops
    z = np.zeros((4, 3, 3, 2))
    z[..., 0] = np.arange(36).reshape(4, 3, 3) / 10.0
    value = float(engine.to_numpy(_std_loss(ops, {"a": ops.channel_moments(engine.put_images(z))}, EPS)))
    rtol = 1e-12 if engine.dtype == "float64" else 1e-5
    np.testing.assert_allclose(value, ref.std_loss([z], EPS), rtol=rtol)


# ----------------------------------------------------------------------------- gradient through a program
# Analytic backpropagation of CE + 0.5 * wd * sum(kernel^2) + w * eq. (2) through the tiny
# models, in NumPy, from the backend's own exported intermediates: eq. (2)'s gradient enters
# every hidden layer as w * d(eq. 2)/dz on top of the cross entropy's.

WEIGHT, WEIGHT_DECAY = 0.3, 0.01  # not 1 and not 0, so a dropped factor shows


def _gradients(engine, program_factory, model, rng):
    program = program_factory("standardization_loss", weight=WEIGHT, model=model, batch_size=6,
                              optimizer={"name": "sgd", "learning_rate": 0.1, "weight_decay": WEIGHT_DECAY})
    params, state = program.initial_parameters(seed=3)
    # Non-zero biases, so that the layer means (and eq. 2's mean term) are far from zero.
    params = {k: (v + rng.normal(size=v.shape) * 0.3 if k.endswith("/bias") else v) for k, v in params.items()}
    images = rng.uniform(0, 1, size=(6, 28, 28, 1))
    labels = rng.integers(0, 10, size=6)
    x, y = engine.put_images(images), engine.put_labels(labels)
    grads, seen = engine.trainer(program, params, state, x, y).gradients(x, y)
    return program, grads, seen, params, images, labels


def _head_gradient(seen, params, labels, hidden_output):
    logits = seen["logits"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d_logits = (p - np.eye(10)[labels]) / len(labels)
    flat = hidden_output.reshape(len(labels), -1)
    expected = {"logits/kernel": flat.T @ d_logits + WEIGHT_DECAY * params["logits/kernel"], "logits/bias": d_logits.sum(0)}
    return expected, (d_logits @ params["logits/kernel"].T).reshape(hidden_output.shape)


def _check(grads, expected):
    assert set(grads) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-8, atol=1e-12, err_msg=name)


def test_backend_gradient_mlp(engine64, program_factory, rng, ref):
    program, grads, seen, params, images, labels = _gradients(engine64, program_factory, "mlp-tiny", rng)
    z1, z2 = seen["preactivation/dense1"], seen["preactivation/dense2"]
    np.testing.assert_allclose(seen["total_loss"], ref.objective(program, params, images, labels), rtol=1e-11)
    expected, d_h2 = _head_gradient(seen, params, labels, np.maximum(z2, 0))
    d_z2 = d_h2 * (z2 > 0) + WEIGHT * ref.std_loss_grad(z2, EPS)
    d_z1 = (d_z2 @ params["dense2/kernel"].T) * (z1 > 0) + WEIGHT * ref.std_loss_grad(z1, EPS)
    x = images.reshape(len(images), -1)
    expected.update({
        "dense2/kernel": np.maximum(z1, 0).T @ d_z2 + WEIGHT_DECAY * params["dense2/kernel"], "dense2/bias": d_z2.sum(0),
        "dense1/kernel": x.T @ d_z1 + WEIGHT_DECAY * params["dense1/kernel"], "dense1/bias": d_z1.sum(0),
    })
    _check(grads, expected)
    # eq. (2) alone moves the last hidden bias by w * (the layer's mean): not a negligible part.
    assert np.abs(WEIGHT * z2.mean(0)).max() > 0.1 * np.abs(grads["dense2/bias"]).max()


def test_backend_gradient_cnn(engine64, program_factory, rng, ref):
    program, grads, seen, params, images, labels = _gradients(engine64, program_factory, "cnn-tiny", rng)
    (shape1, pads1), (shape2, pads2) = [(layer.kernel_shape, layer.pads) for layer in program.arch.layers()[:2]]
    z1, z2 = seen["preactivation/conv1"], seen["preactivation/conv2"]
    np.testing.assert_allclose(seen["total_loss"], ref.objective(program, params, images, labels), rtol=1e-11)
    np.testing.assert_allclose(seen["standardization_loss"], ref.std_loss([z1, z2], EPS), rtol=1e-11)
    np.testing.assert_allclose(seen["mean/conv2"], z2.mean(axis=(0, 1, 2)), rtol=1e-12)
    h1 = np.maximum(z1, 0)
    expected, d_h2 = _head_gradient(seen, params, labels, np.maximum(z2, 0))
    d_z2 = d_h2 * (z2 > 0) + WEIGHT * ref.std_loss_grad(z2, EPS)
    d_h1 = ref.conv2d_input_grad(d_z2, params["conv2/kernel"], h1.shape, 2, pads2)
    d_z1 = d_h1 * (z1 > 0) + WEIGHT * ref.std_loss_grad(z1, EPS)
    expected.update({
        "conv2/kernel": ref.conv2d_kernel_grad(h1, d_z2, shape2, 2, pads2) + WEIGHT_DECAY * params["conv2/kernel"],
        "conv2/bias": d_z2.sum((0, 1, 2)),
        "conv1/kernel": ref.conv2d_kernel_grad(images, d_z1, shape1, 2, pads1) + WEIGHT_DECAY * params["conv1/kernel"],
        "conv1/bias": d_z1.sum((0, 1, 2)),
    })
    _check(grads, expected)


# ----------------------------------------------------------------------------- moments across chunks


@pytest.mark.parametrize("sizes", [[10], [3, 7], [1, 1, 8], [5, 2, 9, 4]], ids=str)
def test_combine_moments_equals_whole_array(rng, ref, sizes):
    x = rng.normal(size=(sum(sizes), 3, 3, 4)) * [0.1, 1.0, 10.0, 2.0] + [3.0, -1.0, 0.0, 100.0]
    x[..., 2] = 0.0  # a dead channel stays exactly zero-variance
    parts, start = [], 0
    for n in sizes:
        chunk = x[start:start + n]
        start += n
        parts.append((*ref.moments(chunk), chunk.size // chunk.shape[-1]))
    mean, var = combine_moments(parts)
    ref_mean, ref_var = ref.moments(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-9, atol=1e-12)
    assert var[2] == 0.0


def test_chunked_evaluation_equals_whole(engine64, program_factory, rng, ref):
    """Trainer.evaluate aggregates CE, accuracy and moments exactly across chunks of unequal size."""
    normalization = "batch_norm_shift"
    program = program_factory(normalization, model="cnn-tiny")
    params, state = program.initial_parameters(seed=1)
    images = rng.uniform(0, 1, size=(23, 28, 28, 1))
    labels = rng.integers(0, 10, size=23)
    x, y = engine64.put_images(images), engine64.put_labels(labels)
    trainer = engine64.trainer(program, params, state, x, y)
    whole = trainer.evaluate(x, y, 23, chunk_size=23)
    chunked = trainer.evaluate(x, y, 23, chunk_size=5)
    logits, preacts, _ = ref.forward(program.arch, params, state, images, normalization=normalization, training=False)
    assert whole["cross_entropy"] == pytest.approx(ref.softmax_cross_entropy(logits, labels), rel=1e-10)
    assert whole["accuracy"] == np.mean(logits.argmax(1) == labels)
    assert chunked["cross_entropy"] == pytest.approx(whole["cross_entropy"], rel=1e-12)
    assert chunked["accuracy"] == whole["accuracy"]
    for layer, z in preacts.items():
        for got in (whole["moments"][layer], chunked["moments"][layer]):
            np.testing.assert_allclose(got[0], ref.moments(z)[0], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got[1], ref.moments(z)[1], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- weight decay


def test_weight_decay_penalty(engine, rng):
    params = {"conv1/kernel": rng.normal(size=(5, 5, 1, 4)), "conv1/bias": rng.normal(size=4),
              "dense1/kernel": rng.normal(size=(12, 3)), "dense1/shift": rng.normal(size=3),
              "dense1/scale": rng.normal(size=3)}
    expected = 0.5 * 4e-5 * (np.sum(params["conv1/kernel"] ** 2) + np.sum(params["dense1/kernel"] ** 2))
    value = float(engine.to_numpy(weight_decay_penalty(engine.ops, engine.import_tree(params), 4e-5)))
    np.testing.assert_allclose(value, expected, rtol=1e-12 if engine.dtype == "float64" else 1e-5)
    assert float(engine.to_numpy(weight_decay_penalty(engine.ops, engine.import_tree(params), 0.0))) == 0.0
