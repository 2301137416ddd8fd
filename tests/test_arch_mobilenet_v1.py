"""MobileNet-v1 (normbench/architectures/mobilenet_v1.py): the reference configuration's
parameter and multiply-accumulate counts against Keras' `applications.MobileNet(alpha=1.0)`
and Howard et al. (2017), its layer geometry (the stride-2 pads Keras writes as
ZeroPadding2D((0, 1), (0, 1)) + valid), the small configuration's shapes, cross-backend
training parity of the small configuration, and group norm's fit to its channel counts."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import architectures, backends, parity
from normbench.architectures import mobilenet_v1
from normbench.plan import architecture_counts, resolve
from normbench.spec import PluginSpec

# Keras 3 `keras.applications.MobileNet(alpha=1.0, weights=None)` (224 x 224 x 3, 1000
# classes), counted with `sum(prod(w.shape) for w in model.trainable_weights)`: 4,231,976
# (4,253,864 with the batch-norm moving statistics). Multiply-accumulates summed over its
# Conv2D / DepthwiseConv2D layers from their output shapes: 568,740,352 (Howard et al.
# Table 4: 569 million mult-adds, 4.2 million parameters).
KERAS_TRAINABLE = 4_231_976
KERAS_TOTAL = 4_253_864
REFERENCE_MACS = 568_740_352


@pytest.fixture(scope="module")
def reference():
    return architectures.get("mobilenet-v1")


@pytest.fixture(scope="module")
def small():
    return architectures.get("mobilenet-v1-small")


def test_registered(reference, small):
    assert {"mobilenet-v1", "mobilenet-v1-small"} <= set(architectures.names())
    assert (reference.input_shape, reference.num_classes, reference.small) == ((224, 224, 3), 1000, False)
    assert (small.input_shape, small.num_classes, small.small) == ((28, 28, 1), 10, True)


# ----------------------------------------------------------------------------- the reference


def test_reference_counts_match_keras(reference):
    with_bn = architecture_counts(reference, PluginSpec("batch_norm"))
    assert with_bn["parameters"] == KERAS_TRAINABLE
    assert with_bn["multiply_accumulates"] == REFERENCE_MACS
    assert with_bn["flops"] == 2 * REFERENCE_MACS
    # The running means and variances (state, not parameters) make Keras' total.
    channels = sum(slot.channels for slot in reference.slots)
    assert KERAS_TRAINABLE + 2 * channels == KERAS_TOTAL
    # No normalization: a bias per channel instead of a scale and a shift.
    none = architecture_counts(reference, PluginSpec("none"))
    assert none["parameters"] == KERAS_TRAINABLE - channels == 4_221_032
    assert none["multiply_accumulates"] == REFERENCE_MACS


def test_reference_layers_match_keras(reference):
    layers = reference.layers()
    names = [layer.name for layer in layers]
    assert names == ["conv1", *[f"conv_{kind}_{k}" for k in range(1, 14) for kind in ("dw", "pw")], "logits"]
    assert len(reference.slots) == 27
    by_name = {layer.name: layer for layer in layers}
    assert by_name["conv1"].kernel_shape == (3, 3, 3, 32) and by_name["conv1"].out_shape == (112, 112, 32)
    pointwise = [by_name[f"conv_pw_{k}"].out_shape[-1] for k in range(1, 14)]
    assert pointwise == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    for k in range(1, 14):
        dw, pw = by_name[f"conv_dw_{k}"], by_name[f"conv_pw_{k}"]
        channels = dw.out_shape[-1]
        assert dw.kernel_shape == (3, 3, 1, channels) and dw.groups == channels and dw.normalized
        assert pw.kernel_shape[:2] == (1, 1) and pw.groups == 1 and pw.normalized
    assert by_name["conv_pw_13"].out_shape == (7, 7, 1024)
    head = by_name["logits"]
    assert (head.kind, head.kernel_shape, head.normalized) == ("dense", (1024, 1000), False)
    # Keras: ZeroPadding2D(((0, 1), (0, 1))) then a valid 3x3 stride-2 window (the stem:
    # `same`); SAME on these even sizes pads the same single bottom/right pixel.
    strided = [layer for layer in layers if layer.stride == 2]
    assert [layer.name for layer in strided] == ["conv1", "conv_dw_2", "conv_dw_4", "conv_dw_6", "conv_dw_12"]
    assert all(layer.pads == ((0, 1), (0, 1)) for layer in strided)


def test_width_rule():
    # Keras: int(filters * alpha); tf-slim: at least min_depth.
    assert mobilenet_v1.width(1024, 0.75, 1) == 768
    assert mobilenet_v1.width(32, 0.25, 1) == 8
    assert mobilenet_v1.width(32, 0.25, 32) == 32
    half = mobilenet_v1.mobilenet_v1("mobilenet-v1-test-half", "", alpha=0.5)
    assert [layer.kernel_shape[-1] for layer in half.layers() if layer.name.startswith("conv_pw")][-1] == 512


# ----------------------------------------------------------------------------- the small configuration


def test_small_configuration_shapes(small):
    layers = small.layers()
    by_name = {layer.name: layer for layer in layers}
    assert len(layers) == 28 and len(small.slots) == 27
    assert by_name["conv1"].out_shape == (14, 14, 32)
    maps = [by_name[f"conv_pw_{k}"].out_shape for k in range(1, 14)]
    assert maps == [(14, 14, 32), (7, 7, 32), (7, 7, 32), (4, 4, 64), (4, 4, 64), (2, 2, 128), (2, 2, 128),
                    (2, 2, 128), (2, 2, 128), (2, 2, 128), (2, 2, 128), (2, 2, 256), (2, 2, 256)]
    for k in range(1, 14):  # each depthwise layer keeps its input's channels and the pointwise one's map
        assert by_name[f"conv_dw_{k}"].out_shape[:2] == by_name[f"conv_pw_{k}"].out_shape[:2]
    assert by_name["logits"].kernel_shape == (256, 10)
    assert [layer.name for layer in layers if layer.stride == 2] == ["conv1", "conv_dw_2", "conv_dw_4", "conv_dw_6"]
    assert by_name["conv_dw_4"].pads == ((1, 1), (1, 1))  # SAME on the odd 7 x 7 map (Keras' scheme: 3 x 3)
    counts = architecture_counts(small, PluginSpec("batch_norm"))
    assert counts == {"parameters": 217_642, "multiply_accumulates": 1_349_696, "flops": 2_699_392}
    assert architecture_counts(small, PluginSpec("none"))["parameters"] == 214_826


def test_group_norm_fills_every_small_slot(small):
    """Figure 7 runs MobileNet-v1 with 32 groups: every slot of the small configuration
    has a multiple of 32 channels (the 32-channel minimum width)."""
    assert all(slot.channels % 32 == 0 for slot in small.slots)
    counts = architecture_counts(small, PluginSpec("group_norm"))  # default groups = 32
    assert counts["parameters"] == 217_642  # a scale and a shift per channel, like batch norm
    # Without the minimum width, alpha = 0.25 leaves the stem 8 channels: named in the error.
    narrow = mobilenet_v1.mobilenet_v1("mobilenet-v1-test-narrow", "", input_shape=(28, 28, 1), classes=10,
                                       alpha=0.25)
    with pytest.raises(ValueError, match=r"layer conv1 of mobilenet-v1-test-narrow: its 8 channels are not "
                                         r"divisible by groups = 32"):
        architecture_counts(narrow, PluginSpec("group_norm"))


# ----------------------------------------------------------------------------- training parity


@pytest.mark.parametrize("method", ["batch_norm", "none"])
def test_small_configuration_trains_alike_in_every_backend(spec_factory, method):
    available = backends.available()
    if not available:
        pytest.skip("no backend installed")
    spec = spec_factory(model="mobilenet-v1-small", batch_size=8, dtype="float64",
                        variants=[{"name": "v", "normalization": method}],
                        optimizer={"name": "sgd", "learning_rate": 0.05, "momentum": 0.9})
    # Batch 8 with batch norm is sensitive: backends agree to ~7e-11 after 3 steps here, and
    # with the reference's last stride (a 1 x 1 stage) they part beyond 1e-9 (module docstring).
    trajectory = {b: parity.trajectory_outputs(spec, "v", b, 3, "float64") for b in available}
    initial, _ = resolve(spec, "v").initial_parameters(0)
    for name, out in trajectory.items():  # it trains: finite, changing losses; moving parameters
        losses = out["trajectory/loss"]
        assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses), (name, losses)
        assert not np.array_equal(out["final/logits/bias"], initial["logits/bias"]), name
        if method == "batch_norm":
            unmoved = [k for k in initial if np.array_equal(out[f"final/{k}"], initial[k])]
            assert not unmoved, (name, unmoved)
        # Without normalization the Glorot-initialized network's activations shrink ~20x per
        # block (~1e-17 after block 13), and its early kernels' gradients (~1e-18) can fall
        # below the float64 spacing of the kernels: the paper's untrainable MobileNet without BN.
    if len(available) < 2:
        pytest.skip(f"parity needs two backends; available: {available}")
    rows = parity.compare_step(spec, "v", available, "float64")
    rows += parity.compare_outputs(trajectory, "float64", "v", resolve(spec, "v").std_metric.log_epsilon)
    quantities = {r.quantity for r in rows}
    assert {"gradient/conv_dw_1/kernel", "gradient/conv_pw_13/kernel", "logits", "trajectory/loss"} <= quantities
    assert all(r.ok for r in rows), parity.format_table([r for r in rows if not r.ok])
    assert max(r.max_rel for r in rows) <= 1e-9, parity.format_table(sorted(rows, key=lambda r: -r.max_rel)[:5])
