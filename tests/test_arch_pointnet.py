"""PointNet (normbench/architectures/pointnet.py): its layers and counts against the
authors' network, the vocabulary it added (point transforms, K x K matrices, dropout with
framework-free masks, the orthogonality loss) against NumPy, and cross-backend training
parity of the small configuration in float64 on synthetic point clouds (the real MNIST
point clouds are a 430 MB cache; `normbench parity` runs on them)."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import architectures, backends
from normbench.architectures.layers import Net
from normbench.plan import architecture_counts, resolve
from normbench.spec import PluginSpec

# Summed from the authors' layer list (charlesq34/pointnet, models/pointnet_cls.py and
# transform_nets.py): every conv and fc carries a bias, and batch norm adds a scale and a
# shift per channel, on 6,080 channels in all.
AUTHORS_TRAINABLE = 3_480_049
REFERENCE_MACS = 443_822_336  # Qi et al. Table 6: 440 M "FLOPs" (multiply-accumulates)


@pytest.fixture(scope="module")
def reference():
    return architectures.get("pointnet")


@pytest.fixture(scope="module")
def small():
    return architectures.get("pointnet-small")


def test_registered(reference, small):
    assert (reference.input_shape, reference.num_classes) == ((1024, 1, 3), 40)
    assert (small.input_shape, small.num_classes, small.small) == ((512, 1, 3), 10, True)


def test_reference_layers_and_counts(reference):
    layers = {layer.name: layer for layer in reference.layers()}
    assert [name for name in layers if not name.startswith(("input_transform", "feature_transform"))] == [
        "conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "logits"]
    for tnet, size, fan_in in (("input_transform", 3, 3), ("feature_transform", 64, 64)):
        assert layers[f"{tnet}.conv1"].kernel_shape == (1, 1, fan_in, 64)
        assert layers[f"{tnet}.conv3"].out_shape == (1024, 1, 1024)
        regressor = layers[f"{tnet}.transform"]
        assert (regressor.kernel_shape, regressor.normalized) == ((256, size * size), False)
        assert (regressor.kernel_init, regressor.bias_init) == ("zeros", "identity")
    assert layers["conv5"].out_shape == (1024, 1, 1024) and layers["logits"].kernel_shape == (256, 40)
    assert [(d.name, d.shape, d.rate) for d in reference.dropouts()] == [("dropout1", (512,), 0.3), ("dropout2", (256,), 0.3)]
    assert reference.auxiliary_losses() == (("feature_transform", 0.001),)
    with_bn, none = architecture_counts(reference, PluginSpec("batch_norm")), architecture_counts(reference, PluginSpec("none"))
    channels = sum(slot.channels for slot in reference.slots)
    assert channels == 6_080
    assert with_bn["multiply_accumulates"] == none["multiply_accumulates"] == REFERENCE_MACS
    assert with_bn["parameters"] + channels == AUTHORS_TRAINABLE  # their bias before every batch norm
    assert none["parameters"] + 2 * channels == AUTHORS_TRAINABLE


def test_small_configuration(small):
    layers = {layer.name: layer for layer in small.layers()}
    assert layers["conv5"].out_shape == (512, 1, 256) and layers["feature_transform.transform"].kernel_shape == (64, 256)
    assert architecture_counts(small, PluginSpec("batch_norm")) == {
        "parameters": 170_771, "multiply_accumulates": 13_952_192, "flops": 27_904_384}


@pytest.fixture
def point_spec(spec_factory):
    def make(variants=None, **fields):
        return spec_factory(model="pointnet-small", dataset="mnist_point_clouds",
                            variants=variants or [{"name": "v", "normalization": "batch_norm"}], **fields)
    return make


def test_transforms_start_at_the_identity(point_spec):
    params, _ = resolve(point_spec(), "v").initial_parameters(0)
    assert np.array_equal(params["input_transform.transform/kernel"], np.zeros((64, 9)))
    assert np.array_equal(params["input_transform.transform/bias"], np.eye(3).ravel())
    assert np.array_equal(params["feature_transform.transform/bias"], np.eye(16).ravel())


def test_dropout_masks_come_from_the_run_seed_and_step(point_spec, spec_factory):
    plan = resolve(point_spec(), "v")
    a, b = plan.dropout_masks(3, 10, 32), plan.dropout_masks(3, 10, 32)
    assert a.keys() == {"dropout1", "dropout2"} and a["dropout1"].shape == (32, 128) and a["dropout2"].shape == (32, 64)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["dropout1"], plan.dropout_masks(3, 11, 32)["dropout1"])
    assert not np.array_equal(a["dropout1"], plan.dropout_masks(4, 10, 32)["dropout1"])
    drawn = np.concatenate([plan.dropout_masks(0, t, 64)["dropout1"].ravel() for t in range(20)])
    assert set(np.unique(drawn)) == {0.0, 1.0} and abs(1 - drawn.mean() - 0.3) < 0.01
    mlp = resolve(spec_factory(), "none")
    assert mlp.dropout_masks(0, 0, 8) is None


def _engines():
    names = backends.available()
    if not names:
        pytest.skip("no backend installed")
    return {name: backends.get_engine(name, dtype="float64") for name in names}


def test_vocabulary_primitives_match_numpy():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(4, 7, 1, 5))
    matrix = rng.normal(size=(4, 5, 5))
    expected_points = np.einsum("bpk,bkj->bpj", points[:, :, 0], matrix)[:, :, None, :]
    gram = np.einsum("bij,bkj->bik", matrix, matrix)
    expected_loss = 0.5 * np.sum((gram - np.eye(5)) ** 2)
    for name, engine in _engines().items():
        net = Net(engine.ops, (), {}, None, None)
        transformed = net.point_transform(engine.put_images(points), engine.import_tree({"m": matrix})["m"])
        np.testing.assert_allclose(engine.activation_to_numpy(transformed), expected_points, rtol=1e-12, err_msg=name)
        net.orthogonality_loss("ft", engine.import_tree({"m": matrix})["m"], 0.001)
        np.testing.assert_allclose(float(engine.to_numpy(net.losses["ft"])), expected_loss, rtol=1e-11, err_msg=name)
        flat = engine.import_tree({"f": matrix.reshape(4, 25)})["f"]
        np.testing.assert_array_equal(engine.to_numpy(net.matrix(flat, 5)), matrix, err_msg=name)


@pytest.mark.parametrize("antisymmetric", [False, True], ids=["any", "near-rotation"])
def test_orthogonality_loss_keeps_float32_precision_near_the_identity(antisymmetric):
    """Transforms start as the identity and stay near it, where the loss is small beside
    the entries of A A^T: float32 must still give it to about its own precision (the
    expanded formula this replaced was 6-28% off float64 on pointnet-small). Near a
    rotation (D ~ -D^T) the first-order terms cancel and the loss is of order |D|^4."""
    rng = np.random.default_rng(3)
    deviation = rng.normal(size=(12, 64, 64)) * 1e-3
    if antisymmetric:
        deviation = deviation - np.swapaxes(deviation, -1, -2)
    matrix = (np.eye(64) + deviation).astype(np.float32).astype(np.float64)  # what float32 holds, exactly
    residual = np.einsum("bij,bkj->bik", matrix, matrix) - np.eye(64)
    expected = 0.5 * np.sum(residual**2)
    if not backends.available():
        pytest.skip("no backend installed")
    for name in backends.available():
        engine = backends.get_engine(name, dtype="float32")
        net = Net(engine.ops, (), {}, None, None)
        net.orthogonality_loss("ft", engine.import_tree({"m": matrix})["m"], 0.001)
        np.testing.assert_allclose(float(engine.to_numpy(net.losses["ft"])), expected, rtol=1e-4, err_msg=name)


def _synthetic_clouds(examples=48, points=512, seed=0):
    rng = np.random.default_rng(seed)
    clouds = rng.normal(size=(examples, points, 1, 3)) * 0.4
    clouds[..., 2] = 0.0  # MNIST point clouds are planar
    return clouds, rng.integers(0, 10, size=examples)


@pytest.mark.parametrize("method", ["batch_norm", "group_norm", "standardization"])
def test_small_configuration_trains_alike_in_every_backend(point_spec, method):
    variant = ({"name": "v", "auxiliary_losses": [{"name": "standardization", "weight": 0.001}], "affine": True}
               if method == "standardization" else
               {"name": "v", "normalization": {"name": "group_norm", "groups": 8}} if method == "group_norm" else
               {"name": "v", "normalization": method})
    spec = point_spec(variants=[variant], batch_size=16, optimizer={"name": "adam", "learning_rate": 1e-3})
    plan = resolve(spec, "v")
    images, labels = _synthetic_clouds()
    engines = _engines()
    results = {}
    for name, engine in engines.items():
        params, state = plan.initial_parameters(0)
        trainer = engine.trainer(plan, params, state, engine.put_images(images), engine.put_labels(labels))
        grads, seen = trainer.gradients(engine.put_images(images[:16]), engine.put_labels(labels[:16]),
                                        plan.dropout_masks(0, 0, 16))
        losses = [trainer.step(np.arange(16 * t, 16 * t + 16) % 48, plan.learning_rate(t), plan.dropout_masks(0, t, 16))
                  for t in range(4)]
        results[name] = {"grads": grads, "seen": seen, "losses": trainer.read_losses(losses), "final": trainer.export()[0]}
    for out in results.values():
        losses = out["losses"]
        assert np.all(np.isfinite(losses)) and len(set(losses[:, 0])) == 4
        assert plan.step_loss_names[-1] == "feature_transform_loss" and np.all(losses[1:, -1] > 0)
    if len(results) < 2:
        pytest.skip(f"parity needs two backends; available: {list(results)}")
    first, *others = results
    for other in others:
        a, b = results[first], results[other]
        np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-9, atol=1e-12, err_msg=f"{first} vs {other}")
        for key in a["grads"]:
            # A shift followed by a later batch norm has a gradient that vanishes
            # mathematically (~1e-17 here): an absolute floor far below every real gradient.
            scale = np.abs(a["grads"][key]).max()
            assert np.abs(b["grads"][key] - a["grads"][key]).max() <= 1e-9 * scale + 1e-14, (other, key, scale)
        for key in a["final"]:
            np.testing.assert_allclose(b["final"][key], a["final"][key], rtol=1e-9, atol=1e-12, err_msg=f"{other} {key}")
