"""The ResNet family (normbench/architectures/resnet.py): the reference configurations'
parameter and multiply-accumulate counts against torchvision's, the small
configuration's layers and shapes, and the small configuration training the same
trajectory in every installed backend."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import architectures, backends
from normbench.plan import Plan, architecture_counts
from normbench.spec import PluginSpec, SpecError

# torchvision 0.29.1 `torchvision/models/resnet.py`: num_params (batch norm: scale and
# shift per channel, no conv bias) and _ops (multiply-accumulates of Conv2d and Linear),
# reproduced by building its ResNet classes; `none`: every hidden convolution keeps a
# bias instead of its batch norm's scale and shift.
REFERENCE = {  # name: (parameters with batch_norm, parameters with none, multiply-accumulates)
    "resnet-18": (11_689_512, 11_684_712, 1_814_073_344),
    "resnet-34": (21_797_672, 21_789_160, 3_663_761_408),
    "resnet-50": (25_557_032, 25_530_472, 4_089_184_256),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_counts_equal_torchvision(name):
    arch = architectures.get(name)
    assert arch.input_shape == (224, 224, 3) and arch.num_classes == 1000 and not arch.small
    with_bn, with_none, macs = REFERENCE[name]
    counts = architecture_counts(arch, PluginSpec("batch_norm"))
    assert counts["parameters"] == with_bn
    assert counts["multiply_accumulates"] == macs
    assert counts["flops"] == 2 * macs
    none = architecture_counts(arch, PluginSpec("none"))
    assert none["parameters"] == with_none and none["multiply_accumulates"] == macs


def test_reference_structure():
    """torchvision's module names; shortcuts and stride placement of ResNet-50 (v1.5)."""
    layers = {layer.name: layer for layer in architectures.get("resnet-50").layers()}
    assert len(layers) == 53 + 1  # 53 convolutions (16 blocks x 3 + 4 projections + stem) and fc
    assert layers["conv1"].kernel_shape == (7, 7, 3, 64) and layers["conv1"].stride == 2
    assert layers["conv1"].out_shape == (112, 112, 64)
    assert layers["layer1.0.conv1"].kernel_shape == (1, 1, 64, 64)  # after the 3x3/2 max pool: 56 x 56
    assert layers["layer1.0.downsample"].stride == 1 and layers["layer1.0.downsample"].out_shape == (56, 56, 256)
    assert layers["layer2.0.conv1"].stride == 1 and layers["layer2.0.conv2"].stride == 2  # v1.5
    assert layers["layer4.2.conv3"].out_shape == (7, 7, 2048)
    assert layers["fc"].kernel_shape == (2048, 1000) and not layers["fc"].normalized
    assert sum(name.endswith("downsample") for name in layers) == 4
    for name, n_convs, n_projections in [("resnet-18", 20, 3), ("resnet-34", 36, 3)]:
        convs = [layer for layer in architectures.get(name).layers() if layer.kind == "conv"]
        assert len(convs) == n_convs and sum(c.name.endswith("downsample") for c in convs) == n_projections


def test_original_v1_stride_placement():
    """He et al.'s v1 bottleneck (stride on the first 1x1): same parameters, fewer MACs."""
    from normbench.architectures.resnet import imagenet_resnet

    v1 = imagenet_resnet("resnet-50-v1-test", "bottleneck", (3, 4, 6, 3), "", stride_on="1x1")
    counts = architecture_counts(v1, PluginSpec("batch_norm"))
    assert counts["parameters"] == REFERENCE["resnet-50"][0]
    assert counts["multiply_accumulates"] == 3_857_973_248


def test_small_configuration_layers():
    arch = architectures.get("resnet-small")
    assert arch.small and arch.input_shape == (28, 28, 1) and arch.num_classes == 10
    shapes = [(layer.name, layer.kernel_shape, layer.out_shape, layer.stride) for layer in arch.layers()]
    assert shapes == [
        ("conv1", (3, 3, 1, 8), (28, 28, 8), 1),
        ("layer1.0.conv1", (3, 3, 8, 8), (28, 28, 8), 1),
        ("layer1.0.conv2", (3, 3, 8, 8), (28, 28, 8), 1),
        ("layer2.0.conv1", (3, 3, 8, 16), (14, 14, 16), 2),
        ("layer2.0.conv2", (3, 3, 16, 16), (14, 14, 16), 1),
        ("layer2.0.downsample", (1, 1, 8, 16), (14, 14, 16), 2),
        ("layer3.0.conv1", (3, 3, 16, 32), (7, 7, 32), 2),
        ("layer3.0.conv2", (3, 3, 32, 32), (7, 7, 32), 1),
        ("layer3.0.downsample", (1, 1, 16, 32), (7, 7, 32), 2),
        ("fc", (32, 10), (10,), 1),
    ]
    assert [layer.normalized for layer in arch.layers()] == [True] * 9 + [False]
    assert architecture_counts(arch, PluginSpec("batch_norm")) == {
        "parameters": 19_810, "multiply_accumulates": 2_364_864, "flops": 4_729_728}
    resnet20 = architectures.get("resnet-20")
    assert not resnet20.small and resnet20.input_shape == (28, 28, 1)
    convs = [layer for layer in resnet20.layers() if layer.kind == "conv"]
    assert len(convs) == 19 + 2  # 6n + 1 convolutions (n = 3) and two projections
    assert [c.out_shape[-1] for c in convs if c.name.endswith("conv2")] == [16] * 3 + [32] * 3 + [64] * 3
    assert architecture_counts(resnet20, PluginSpec("batch_norm"))["parameters"] == 272_186


@pytest.mark.parametrize("name, channels", [("resnet-small", 8), ("resnet-20", 16)])
def test_group_norm_with_32_groups_names_the_layer(name, channels):
    with pytest.raises(ValueError, match=rf"layer conv1 of {name}: its {channels} channels are not divisible by "
                                         r"groups = 32"):
        architecture_counts(architectures.get(name), PluginSpec("group_norm"))


def test_spec_validation_names_the_layer_group_norm_cannot_fill(spec_factory):
    with pytest.raises(SpecError, match=r"variant\[0\]\.normalization: .*layer conv1 of resnet-small: its 8 channels"):
        spec_factory(model="resnet-small", variants=[{"name": "gn", "normalization": "group_norm"}])
    spec_factory(model="resnet-small", variants=[{"name": "gn", "normalization": {"name": "group_norm", "groups": 8}}])


def test_group_norm_fills_the_reference_and_smaller_groups_the_small():
    architecture_counts(architectures.get("resnet-50"), PluginSpec("group_norm"))  # every width divides by 32
    architecture_counts(architectures.get("resnet-small"), PluginSpec("group_norm", (("groups", 8),)))


# ----------------------------------------------------------------------------- training in every backend

STEPS = 3


def _trajectory(backend: str, method: str, images: np.ndarray, labels: np.ndarray, spec_factory):
    spec = spec_factory(model="resnet-small", batch_size=len(images), dtype="float64",
                        variants=[{"name": "v", "normalization": method}],
                        optimizer={"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 1e-4})
    plan = Plan(spec, spec.variants[0])
    engine = backends.get_engine(backend, device="cpu", dtype="float64")
    params, state = plan.initial_parameters(0)
    trainer = engine.trainer(plan, params, state, engine.put_images(images), engine.put_labels(labels))
    indices = np.arange(len(images))
    losses = [trainer.step_and_read(indices, plan.learning_rate(t))["loss"] for t in range(STEPS)]
    final_params, final_state = trainer.export()
    return np.array(losses), final_params, final_state


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), np.finfo(np.float64).tiny))


@pytest.mark.parametrize("method", ["none", "batch_norm"])
def test_small_configuration_trains_alike_in_every_backend(method, spec_factory):
    available = backends.available()
    if not available:
        pytest.skip("no backend installed")
    rng = np.random.default_rng(11)
    images, labels = rng.normal(size=(8, 28, 28, 1)), np.arange(8) % 10
    runs = {b: _trajectory(b, method, images, labels, spec_factory) for b in available}
    first, (losses0, params0, state0) = next(iter(runs.items()))
    assert np.all(np.isfinite(losses0)) and losses0[-1] < losses0[0], losses0  # it trains
    assert set(params0) >= {"layer3.0.downsample/kernel", "fc/kernel", "fc/bias"}
    for backend, (losses, params, state) in runs.items():
        assert _relative(losses, losses0) <= 1e-9, (first, backend, losses, losses0)
        assert set(params) == set(params0) and set(state) == set(state0)
        worst = max((_relative(params[k], params0[k]), k) for k in params0)
        assert worst[0] <= 1e-9, (first, backend, worst)
        for k in state0:
            assert _relative(state[k], state0[k]) <= 1e-9, (first, backend, k)
