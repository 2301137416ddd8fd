"""Batch norm through the neutral `Plan.forward`, against NumPy references:
training-mode forward, backward (central finite differences, float64), running
statistics (biased and unbiased estimators, a given decay) and inference mode."""

from __future__ import annotations

import numpy as np
import pytest

import types

from normbench.architectures import Architecture


def _tiny(net, x):
    x = net.conv("conv1", x, 3, kernel_size=3, stride=2)
    x = net.dense("dense1", x, 4)
    return net.dense("logits", x, 5, normalize=False, activation=None)


# Conv (asymmetric SAME padding, 6 -> 3) then dense, then the head: every BN code path.
TINY = Architecture("bn-tiny", (6, 6, 2), 5, _tiny)
BN_VARIANTS = ["batch_norm_shift", "batch_norm_scale_shift"]


def BatchNormSpec(**fields):
    """The [batch_norm] table of a spec, with attribute access for the tests below."""
    table = {"running_decay": 0.99, "epsilon": 1e-3, "running_variance": "biased", **fields}
    return types.SimpleNamespace(table=table, **table)


def _random_params(arch, normalization, rng, seed=0):
    """Initial parameters with random (non-trivial) scales and shifts, so a missing one shows."""
    from normbench.plan import Plan
    from normbench import spec as spec_module

    text = ('name = "t"\nmodel = "mlp-tiny"\ndataset = "mnist"\nbatch_size = 8\nsteps = 1\neval_every = 1\nseeds = 1\n'
            f'[optimizer]\nname = "sgd"\nlearning_rate = 0.1\n[[variant]]\nname = "v"\nnormalization = "{normalization}"\n')
    spec = spec_module.loads(text)
    params, state = Plan(spec, spec.variants[0], arch=arch).initial_parameters(seed)
    for key in params:
        if key.endswith("/shift") or key.endswith("/bias"):
            params[key] = rng.normal(size=params[key].shape) * 0.5
        elif key.endswith("/scale"):
            params[key] = rng.uniform(0.5, 2.0, size=params[key].shape)
    return params, state


def _images(rng, n, arch=TINY):
    # An offset and a non-unit spread: the batch moments are far from (0, 1).
    return rng.normal(size=(n, *arch.input_shape)) * 2.0 + 0.7


@pytest.mark.parametrize("normalization", BN_VARIANTS)
def test_training_forward(engine64, rng, ref, nets, normalization):
    bn = BatchNormSpec(running_decay=0.9, epsilon=1e-3)
    params, state = _random_params(TINY, normalization, rng)
    assert ("conv1/scale" in params) == (normalization == "batch_norm_scale_shift")
    assert "conv1/bias" not in params and "logits/bias" in params
    images = _images(rng, 5)
    e = engine64
    out = nets.forward(e, TINY, params, state, images, normalization=normalization, batch_norm=bn.table, training=True)
    logits, preacts, raw = ref.forward(TINY, params, state, images, normalization=normalization, bn_epsilon=bn.epsilon)
    np.testing.assert_allclose(e.activation_to_numpy(out.logits), logits, rtol=1e-10, atol=1e-12)
    for name, z in preacts.items():
        np.testing.assert_allclose(e.activation_to_numpy(out.preactivations[name]), z, rtol=1e-10, atol=1e-12)
        # After BN a layer's batch mean is its shift and its variance scale^2 * var / (var + eps).
        mean, var = out.moments[name]
        np.testing.assert_allclose(e.to_numpy(mean), params[f"{name}/shift"], atol=1e-10)
        scale = params.get(f"{name}/scale", 1.0)
        raw_var = ref.moments(raw[name])[1]
        np.testing.assert_allclose(e.to_numpy(var), scale**2 * raw_var / (raw_var + bn.epsilon), rtol=1e-9)


@pytest.mark.parametrize("model,normalization", [("cnn-tiny", "batch_norm_scale_shift"), ("mlp-tiny", "batch_norm_shift")])
def test_training_backward(engine64, program_factory, rng, ref, normalization, model):
    """Gradients of CE + weight decay through BN (batch moments differentiated) vs central differences."""
    program = program_factory(normalization, model=model, batch_size=6,
                              optimizer={"name": "sgd", "learning_rate": 0.1, "weight_decay": 1e-3},
                              batch_norm={"epsilon": 1e-3})
    params, state = _random_params(program.arch, normalization, rng, seed=5)
    images, labels = _images(rng, 6, program.arch), rng.integers(0, 10, size=6)
    e = engine64
    x, y = e.put_images(images), e.put_labels(labels)
    grads, seen = e.trainer(program, params, state, x, y).gradients(x, y)
    assert set(grads) == set(params)
    np.testing.assert_allclose(seen["total_loss"], ref.objective(program, params, images, labels), rtol=1e-11)

    def loss_at(name, index, delta):
        moved = {k: v.copy() for k, v in params.items()}
        moved[name][index] += delta
        return ref.objective(program, moved, images, labels)

    h = 1e-6
    checked = 0
    for name, value in params.items():
        # Every scale and shift entry; a few random entries of each kernel.
        flat = range(value.size) if value.ndim == 1 else rng.choice(value.size, size=4, replace=False)
        for i in flat:
            index = np.unravel_index(i, value.shape)
            numeric = (loss_at(name, index, h) - loss_at(name, index, -h)) / (2 * h)
            np.testing.assert_allclose(grads[name][index], numeric, rtol=1e-5, atol=1e-8, err_msg=f"{name}{index}")
            checked += 1
    assert checked > 20
    assert np.abs(grads[f"{program.arch.slots[0].layer}/shift"]).max() > 1e-4


@pytest.mark.parametrize("running_variance", ["biased", "unbiased"])
@pytest.mark.parametrize("normalization", BN_VARIANTS)
def test_running_statistics(engine, rng, ref, nets, running_variance, normalization):
    """Several training-mode forwards: running = decay * running + (1 - decay) * batch estimate."""
    decay = 0.8
    bn = BatchNormSpec(running_decay=decay, epsilon=1e-3, running_variance=running_variance)
    params, state = _random_params(TINY, normalization, rng)
    e = engine
    expected = {k: v.copy() for k, v in state.items()}
    plan = nets.plan(normalization, arch=TINY, batch_norm=bn.table)
    backend_params, backend_state = e.import_tree(params), e.import_tree(state)
    for _ in range(4):
        images = _images(rng, 7).astype(e.dtype).astype(np.float64)
        out = plan.forward(e.ops, backend_params, backend_state, e.put_images(images), training=True)
        backend_state = out.state
        _, _, raw = ref.forward(TINY, params, state, images, normalization=normalization, bn_epsilon=bn.epsilon)
        for name, z in raw.items():
            mean, var = ref.moments(z)
            count = z.size // z.shape[-1]
            assert count == (7 * 3 * 3 if name == "conv1" else 7)
            if running_variance == "unbiased":
                var = var * count / (count - 1)
            expected[f"{name}/running_mean"] = decay * expected[f"{name}/running_mean"] + (1 - decay) * mean
            expected[f"{name}/running_var"] = decay * expected[f"{name}/running_var"] + (1 - decay) * var
    got = e.export_tree(backend_state)
    assert set(got) == set(expected)
    rtol, atol = (1e-10, 1e-12) if e.dtype == "float64" else (1e-4, 1e-5)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, atol=atol, err_msg=key)
    # The two estimators differ by count / (count - 1), visibly for the dense layer (count 7).
    assert not np.allclose(expected["dense1/running_var"], state["dense1/running_var"])


def test_running_statistics_through_trainer(engine64, program_factory, rng, ref):
    """The trainer carries the BN state across steps (learning rate 0: parameters stay fixed)."""
    running_variance = "unbiased"
    program = program_factory("batch_norm_shift", model="cnn-tiny", batch_size=4,
                              batch_norm={"running_decay": 0.9, "running_variance": running_variance})
    params, state = program.initial_parameters(seed=2)
    images, labels = rng.uniform(0, 1, size=(12, 28, 28, 1)), rng.integers(0, 10, size=12)
    e = engine64
    trainer = e.trainer(program, params, state, e.put_images(images), e.put_labels(labels))
    expected = dict(state)
    order = rng.permutation(12)
    for step in range(3):
        indices = order[4 * step:4 * step + 4]
        trainer.step(indices, 0.0)
        _, _, raw = ref.forward(program.arch, params, state, images[indices], normalization="batch_norm_shift")
        for name, z in raw.items():
            mean, var = ref.moments(z)
            n = z.size // z.shape[-1]
            var = var * n / (n - 1) if running_variance == "unbiased" else var
            expected[f"{name}/running_mean"] = 0.9 * expected[f"{name}/running_mean"] + 0.1 * mean
            expected[f"{name}/running_var"] = 0.9 * expected[f"{name}/running_var"] + 0.1 * var
    new_params, new_state = trainer.export()
    for key in params:
        np.testing.assert_array_equal(new_params[key], params[key])
    for key in expected:
        np.testing.assert_allclose(new_state[key], expected[key], rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("normalization", BN_VARIANTS)
def test_inference_uses_running_statistics(engine, rng, ref, nets, normalization):
    bn = BatchNormSpec(running_decay=0.99, epsilon=1e-3)
    params, state = _random_params(TINY, normalization, rng)
    for key in state:  # running stats unlike any batch's: inference must use these, not the batch's
        state[key] = rng.uniform(0.5, 2.0, size=state[key].shape) if key.endswith("running_var") else rng.normal(size=state[key].shape)
    images = _images(rng, 3)
    e = engine
    out = nets.forward(e, TINY, params, state, images, normalization=normalization, batch_norm=bn.table, training=False)
    logits, preacts, _ = ref.forward(TINY, params, state, images.astype(e.dtype).astype(np.float64),
                                     normalization=normalization, bn_epsilon=bn.epsilon, training=False)
    rtol, atol = (1e-10, 1e-12) if e.dtype == "float64" else (1e-4, 1e-4)
    np.testing.assert_allclose(e.activation_to_numpy(out.logits), logits, rtol=rtol, atol=atol)
    for name, z in preacts.items():
        np.testing.assert_allclose(e.activation_to_numpy(out.preactivations[name]), z, rtol=rtol, atol=atol)
    # Inference does not touch the running statistics.
    got = e.export_tree(out.state)
    for key in state:
        np.testing.assert_allclose(got[key], state[key], rtol=1e-6)
    # And it differs from training mode on the same batch.
    train_logits, _, _ = ref.forward(TINY, params, state, images, normalization=normalization, bn_epsilon=bn.epsilon)
    assert not np.allclose(train_logits, logits, atol=1e-3)


@pytest.mark.parametrize("shape", [(64, 10), (16, 5, 5, 4)])
def test_batch_norm_train_returns_the_batch_statistics_it_used(engine, rng, shape):
    """The primitive's (mean, biased var) feed the running averages: they must be the
    batch's, in every backend and dtype, and a dead (constant) channel's var must be 0
    or a rounding-level positive, never negative."""
    e = engine
    x = rng.standard_normal(shape) * 2.0 + 3.0
    x[..., 0] = 0.7  # a dead channel: zero variance
    x = x.astype(e.dtype).astype(np.float64)  # the reference sees exactly the backend's input
    tol = 1e-12 if e.dtype == "float64" else 2e-6
    y, mean, var = e.ops.batch_norm_train(e.put_images(x.astype(e.dtype)) if len(shape) == 4 else
                                          e.import_tree({"x": x})["x"], None, e.import_tree({"s": np.zeros(shape[-1])})["s"], 1e-3)
    axes = tuple(range(len(shape) - 1))
    got_mean, got_var = e.to_numpy(mean), e.to_numpy(var)
    np.testing.assert_allclose(got_mean, x.mean(axes), rtol=tol, atol=tol)
    np.testing.assert_allclose(got_var, x.var(axes), rtol=tol * 10, atol=tol * 1e-3)
    assert got_var[0] >= 0.0
    expected = (x - x.mean(axes)) / np.sqrt(x.var(axes) + 1e-3)
    # float32: the dead channel's x - mean is a rounding error of the mean (~1e-7 of 0.7),
    # magnified 30x by 1/sqrt(epsilon).
    np.testing.assert_allclose(e.activation_to_numpy(y), expected, rtol=tol * 10, atol=tol * 10 if e.dtype == "float64" else 3e-5)


@pytest.mark.parametrize("shape", [(64, 10), (16, 5, 5, 4)])
@pytest.mark.parametrize("affine", ["scale_shift", "shift", "none"])
def test_batch_norm_infer_is_the_running_statistics_formula(engine, rng, shape, affine):
    """The inference primitive (PyTorch fuses it in float32) is (x - mean) / sqrt(var +
    epsilon) * scale + shift with the given statistics, in every backend and dtype, with
    or without a scale and shift."""
    e = engine
    channels = shape[-1]
    as_backend = lambda a: a.astype(e.dtype).astype(np.float64)  # the reference sees the backend's values
    x = as_backend(rng.standard_normal(shape) * 2.0 + 0.5)
    mean, var = as_backend(rng.standard_normal(channels)), as_backend(rng.random(channels) * 3 + 0.1)
    scale = as_backend(rng.random(channels) + 0.5) if affine == "scale_shift" else None
    shift = as_backend(rng.standard_normal(channels)) if affine != "none" else None
    tree = e.import_tree({k: v for k, v in {"mean": mean, "var": var, "scale": scale, "shift": shift}.items()
                          if v is not None})
    x_in = e.put_images(x.astype(e.dtype)) if len(shape) == 4 else e.import_tree({"x": x})["x"]
    y = e.ops.batch_norm_infer(x_in, tree["mean"], tree["var"], tree.get("scale"), tree.get("shift"), 1e-3)
    expected = (x - mean) / np.sqrt(var + 1e-3) * (1.0 if scale is None else scale) + (0.0 if shift is None else shift)
    tol = 1e-12 if e.dtype == "float64" else 2e-6
    np.testing.assert_allclose(e.activation_to_numpy(y), expected, rtol=tol, atol=tol * 10)


def test_moving_average_is_decay_times_running_plus_the_rest(engine, rng):
    e = engine
    running, value = (a.astype(e.dtype).astype(np.float64) for a in (rng.random(7), rng.standard_normal(7)))
    got = e.to_numpy(e.ops.moving_average(*[e.import_tree({"a": a})["a"] for a in (running, value)], 0.99))
    # Absolute tolerance at the inputs' rounding: a result near zero is a cancellation.
    eps = np.finfo(e.dtype).eps
    np.testing.assert_allclose(got, 0.99 * running + 0.01 * value, rtol=4 * eps, atol=4 * eps)
