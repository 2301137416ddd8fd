"""Inception-v2 (normbench/architectures/inception_v2.py): the reference configuration
layer by layer and its parameter and multiply-accumulate counts against TF-slim's
`inception_v2` (tf-slim 1.1.0, `tf_slim/nets/inception_v2.py`, built in TensorFlow), the
small configuration's shapes, cross-backend training parity of the small configuration,
and group norm's fit to its channel counts."""

from __future__ import annotations

import numpy as np
import pytest

from normbench import architectures, backends, parity
from normbench.architectures import inception_v2
from normbench.plan import architecture_counts, resolve
from normbench.spec import PluginSpec

# TF-slim `inception_v2(num_classes=1000)` under `inception_v2_arg_scope()` (tf-slim 1.1.0,
# TensorFlow 2.21, graph mode, 224 x 224 x 3), counted with
# `sum(prod(v.shape) for v in tf.compat.v1.trainable_variables())`: 11,178,336 (beta
# only in its batch norms; the separable stem has biases and no batch norm). Without the
# arg_scope (biases everywhere, no batch norm): the same 11,178,336. With num_classes=1001
# (slim's ImageNet with a background class): 11,179,361.
SLIM_TRAINABLE = 11_178_336
SLIM_TRAINABLE_1001 = 11_179_361
# The Conv2D and DepthwiseConv2dNative ops of that graph, each output value times kh x kw
# x (input channels / groups): 1,934,857,216 (the 1x1 logits conv included).
REFERENCE_MACS = 1_934_857_216

# slim's convolutions in graph order: name, kernel (slim's layout: depthwise (h, w, in,
# multiplier)), output (h, w, c) for one example, stride. Every padding is SAME but the
# final 7x7 average pool's (VALID).
SLIM_CONVS = [
    ("Conv2d_1a_7x7/depthwise", (7, 7, 3, 8), (112, 112, 24), 2),
    ("Conv2d_1a_7x7/pointwise", (1, 1, 24, 64), (112, 112, 64), 1),
    ("Conv2d_2b_1x1", (1, 1, 64, 64), (56, 56, 64), 1),
    ("Conv2d_2c_3x3", (3, 3, 64, 192), (56, 56, 192), 1),
    ("Mixed_3b/Branch_0/Conv2d_0a_1x1", (1, 1, 192, 64), (28, 28, 64), 1),
    ("Mixed_3b/Branch_1/Conv2d_0a_1x1", (1, 1, 192, 64), (28, 28, 64), 1),
    ("Mixed_3b/Branch_1/Conv2d_0b_3x3", (3, 3, 64, 64), (28, 28, 64), 1),
    ("Mixed_3b/Branch_2/Conv2d_0a_1x1", (1, 1, 192, 64), (28, 28, 64), 1),
    ("Mixed_3b/Branch_2/Conv2d_0b_3x3", (3, 3, 64, 96), (28, 28, 96), 1),
    ("Mixed_3b/Branch_2/Conv2d_0c_3x3", (3, 3, 96, 96), (28, 28, 96), 1),
    ("Mixed_3b/Branch_3/Conv2d_0b_1x1", (1, 1, 192, 32), (28, 28, 32), 1),
    ("Mixed_3c/Branch_0/Conv2d_0a_1x1", (1, 1, 256, 64), (28, 28, 64), 1),
    ("Mixed_3c/Branch_1/Conv2d_0a_1x1", (1, 1, 256, 64), (28, 28, 64), 1),
    ("Mixed_3c/Branch_1/Conv2d_0b_3x3", (3, 3, 64, 96), (28, 28, 96), 1),
    ("Mixed_3c/Branch_2/Conv2d_0a_1x1", (1, 1, 256, 64), (28, 28, 64), 1),
    ("Mixed_3c/Branch_2/Conv2d_0b_3x3", (3, 3, 64, 96), (28, 28, 96), 1),
    ("Mixed_3c/Branch_2/Conv2d_0c_3x3", (3, 3, 96, 96), (28, 28, 96), 1),
    ("Mixed_3c/Branch_3/Conv2d_0b_1x1", (1, 1, 256, 64), (28, 28, 64), 1),
    ("Mixed_4a/Branch_0/Conv2d_0a_1x1", (1, 1, 320, 128), (28, 28, 128), 1),
    ("Mixed_4a/Branch_0/Conv2d_1a_3x3", (3, 3, 128, 160), (14, 14, 160), 2),
    ("Mixed_4a/Branch_1/Conv2d_0a_1x1", (1, 1, 320, 64), (28, 28, 64), 1),
    ("Mixed_4a/Branch_1/Conv2d_0b_3x3", (3, 3, 64, 96), (28, 28, 96), 1),
    ("Mixed_4a/Branch_1/Conv2d_1a_3x3", (3, 3, 96, 96), (14, 14, 96), 2),
    ("Mixed_4b/Branch_0/Conv2d_0a_1x1", (1, 1, 576, 224), (14, 14, 224), 1),
    ("Mixed_4b/Branch_1/Conv2d_0a_1x1", (1, 1, 576, 64), (14, 14, 64), 1),
    ("Mixed_4b/Branch_1/Conv2d_0b_3x3", (3, 3, 64, 96), (14, 14, 96), 1),
    ("Mixed_4b/Branch_2/Conv2d_0a_1x1", (1, 1, 576, 96), (14, 14, 96), 1),
    ("Mixed_4b/Branch_2/Conv2d_0b_3x3", (3, 3, 96, 128), (14, 14, 128), 1),
    ("Mixed_4b/Branch_2/Conv2d_0c_3x3", (3, 3, 128, 128), (14, 14, 128), 1),
    ("Mixed_4b/Branch_3/Conv2d_0b_1x1", (1, 1, 576, 128), (14, 14, 128), 1),
    ("Mixed_4c/Branch_0/Conv2d_0a_1x1", (1, 1, 576, 192), (14, 14, 192), 1),
    ("Mixed_4c/Branch_1/Conv2d_0a_1x1", (1, 1, 576, 96), (14, 14, 96), 1),
    ("Mixed_4c/Branch_1/Conv2d_0b_3x3", (3, 3, 96, 128), (14, 14, 128), 1),
    ("Mixed_4c/Branch_2/Conv2d_0a_1x1", (1, 1, 576, 96), (14, 14, 96), 1),
    ("Mixed_4c/Branch_2/Conv2d_0b_3x3", (3, 3, 96, 128), (14, 14, 128), 1),
    ("Mixed_4c/Branch_2/Conv2d_0c_3x3", (3, 3, 128, 128), (14, 14, 128), 1),
    ("Mixed_4c/Branch_3/Conv2d_0b_1x1", (1, 1, 576, 128), (14, 14, 128), 1),
    ("Mixed_4d/Branch_0/Conv2d_0a_1x1", (1, 1, 576, 160), (14, 14, 160), 1),
    ("Mixed_4d/Branch_1/Conv2d_0a_1x1", (1, 1, 576, 128), (14, 14, 128), 1),
    ("Mixed_4d/Branch_1/Conv2d_0b_3x3", (3, 3, 128, 160), (14, 14, 160), 1),
    ("Mixed_4d/Branch_2/Conv2d_0a_1x1", (1, 1, 576, 128), (14, 14, 128), 1),
    ("Mixed_4d/Branch_2/Conv2d_0b_3x3", (3, 3, 128, 160), (14, 14, 160), 1),
    ("Mixed_4d/Branch_2/Conv2d_0c_3x3", (3, 3, 160, 160), (14, 14, 160), 1),
    ("Mixed_4d/Branch_3/Conv2d_0b_1x1", (1, 1, 576, 96), (14, 14, 96), 1),
    ("Mixed_4e/Branch_0/Conv2d_0a_1x1", (1, 1, 576, 96), (14, 14, 96), 1),
    ("Mixed_4e/Branch_1/Conv2d_0a_1x1", (1, 1, 576, 128), (14, 14, 128), 1),
    ("Mixed_4e/Branch_1/Conv2d_0b_3x3", (3, 3, 128, 192), (14, 14, 192), 1),
    ("Mixed_4e/Branch_2/Conv2d_0a_1x1", (1, 1, 576, 160), (14, 14, 160), 1),
    ("Mixed_4e/Branch_2/Conv2d_0b_3x3", (3, 3, 160, 192), (14, 14, 192), 1),
    ("Mixed_4e/Branch_2/Conv2d_0c_3x3", (3, 3, 192, 192), (14, 14, 192), 1),
    ("Mixed_4e/Branch_3/Conv2d_0b_1x1", (1, 1, 576, 96), (14, 14, 96), 1),
    ("Mixed_5a/Branch_0/Conv2d_0a_1x1", (1, 1, 576, 128), (14, 14, 128), 1),
    ("Mixed_5a/Branch_0/Conv2d_1a_3x3", (3, 3, 128, 192), (7, 7, 192), 2),
    ("Mixed_5a/Branch_1/Conv2d_0a_1x1", (1, 1, 576, 192), (14, 14, 192), 1),
    ("Mixed_5a/Branch_1/Conv2d_0b_3x3", (3, 3, 192, 256), (14, 14, 256), 1),
    ("Mixed_5a/Branch_1/Conv2d_1a_3x3", (3, 3, 256, 256), (7, 7, 256), 2),
    ("Mixed_5b/Branch_0/Conv2d_0a_1x1", (1, 1, 1024, 352), (7, 7, 352), 1),
    ("Mixed_5b/Branch_1/Conv2d_0a_1x1", (1, 1, 1024, 192), (7, 7, 192), 1),
    ("Mixed_5b/Branch_1/Conv2d_0b_3x3", (3, 3, 192, 320), (7, 7, 320), 1),
    ("Mixed_5b/Branch_2/Conv2d_0a_1x1", (1, 1, 1024, 160), (7, 7, 160), 1),
    ("Mixed_5b/Branch_2/Conv2d_0b_3x3", (3, 3, 160, 224), (7, 7, 224), 1),
    ("Mixed_5b/Branch_2/Conv2d_0c_3x3", (3, 3, 224, 224), (7, 7, 224), 1),
    ("Mixed_5b/Branch_3/Conv2d_0b_1x1", (1, 1, 1024, 128), (7, 7, 128), 1),
    ("Mixed_5c/Branch_0/Conv2d_0a_1x1", (1, 1, 1024, 352), (7, 7, 352), 1),
    ("Mixed_5c/Branch_1/Conv2d_0a_1x1", (1, 1, 1024, 192), (7, 7, 192), 1),
    ("Mixed_5c/Branch_1/Conv2d_0b_3x3", (3, 3, 192, 320), (7, 7, 320), 1),
    ("Mixed_5c/Branch_2/Conv2d_0a_1x1", (1, 1, 1024, 192), (7, 7, 192), 1),
    ("Mixed_5c/Branch_2/Conv2d_0b_3x3", (3, 3, 192, 224), (7, 7, 224), 1),
    ("Mixed_5c/Branch_2/Conv2d_0c_3x3", (3, 3, 224, 224), (7, 7, 224), 1),
    ("Mixed_5c/Branch_3/Conv2d_0b_1x1", (1, 1, 1024, 128), (7, 7, 128), 1),
    ("Logits/Conv2d_1c_1x1", (1, 1, 1024, 1000), (1, 1, 1000), 1),
]


@pytest.fixture(scope="module")
def reference():
    return architectures.get("inception-v2")


@pytest.fixture(scope="module")
def small():
    return architectures.get("inception-v2-small")


def test_registered(reference, small):
    assert {"inception-v2", "inception-v2-small"} <= set(architectures.names())
    assert (reference.input_shape, reference.num_classes, reference.small) == ((224, 224, 3), 1000, False)
    assert (small.input_shape, small.num_classes, small.small) == ((28, 28, 1), 10, True)


# ----------------------------------------------------------------------------- the reference


def test_reference_layers_match_slim(reference):
    layers = reference.layers()
    assert len(layers) == len(SLIM_CONVS) == 71
    for layer, (slim_name, kernel, out, stride) in zip(layers, SLIM_CONVS):
        assert layer.name == slim_name.lower().replace("/", ".").replace("logits.conv2d_1c_1x1", "logits")
        if slim_name.endswith("depthwise"):  # slim (h, w, in, multiplier) -> grouped HWIO
            kernel = (*kernel[:2], 1, kernel[2] * kernel[3])
            assert layer.groups == 3
        if layer.kind == "dense":  # a 1x1 conv with bias on the 1 x 1 x 1024 pooled map
            kernel, out = kernel[2:], out[-1:]
        assert (layer.kernel_shape, layer.out_shape, layer.stride) == (kernel, out, stride), layer.name
    by_name = {layer.name: layer for layer in layers}
    # One slot per layer but the depthwise half of the stem (slim: one after the pair) and the head.
    assert [layer.name for layer in layers if not layer.normalized] == ["conv2d_1a_7x7.depthwise", "logits"]
    assert len(reference.slots) == 69
    # SAME pads: the 7x7/2 stem (2, 3); the 3x3/2 reductions on even maps (0, 1).
    assert by_name["conv2d_1a_7x7.depthwise"].pads == ((2, 3), (2, 3))
    strided = [layer for layer in layers if layer.stride == 2 and layer.kernel_shape[0] == 3]
    assert len(strided) == 4 and all(layer.pads == ((0, 1), (0, 1)) for layer in strided)


def test_reference_counts_match_slim(reference):
    shift_only = architecture_counts(reference, PluginSpec("batch_norm", (("scale", False),)))
    with_bn = architecture_counts(reference, PluginSpec("batch_norm"))
    none = architecture_counts(reference, PluginSpec("none"))
    channels = sum(slot.channels for slot in reference.slots)
    assert channels == 9_952
    # Shift-only batch norm (the paper's A.4, slim's scale=False): slim's trainable
    # variables exactly (the depthwise half of the stem has no bias, as in slim).
    assert shift_only["parameters"] == SLIM_TRAINABLE == 11_178_336
    # No normalization: a bias per slot channel instead of a shift (slim without its arg_scope).
    assert none["parameters"] == SLIM_TRAINABLE
    # Scale and shift: a scale per slot channel more.
    assert with_bn["parameters"] == SLIM_TRAINABLE + channels == 11_188_288
    for counts in (shift_only, with_bn, none):
        assert counts["multiply_accumulates"] == REFERENCE_MACS
        assert counts["flops"] == 2 * REFERENCE_MACS
    # slim's ImageNet head has 1001 classes: 1,025 parameters more.
    assert SLIM_TRAINABLE_1001 - SLIM_TRAINABLE == 1024 + 1
    # The paper's 7x7 stem as one full convolution (3 -> 64) instead of slim's separable
    # pair: 2.02 G, the ~2.0 G quoted for BN-Inception.
    stem = sum(layer.multiply_accumulates for layer in reference.layers() if layer.name.startswith("conv2d_1a"))
    assert stem == 14_751_744 + 19_267_584
    assert REFERENCE_MACS - stem + 112 * 112 * 64 * 7 * 7 * 3 == 2_018_851_840


def test_group_norm_fills_every_reference_slot(reference):
    assert all(slot.channels % 32 == 0 for slot in reference.slots)
    counts = architecture_counts(reference, PluginSpec("group_norm"))  # default groups = 32
    assert counts["parameters"] == 11_188_288  # a scale and a shift per channel, like batch norm


def test_configuration_checks():
    with pytest.raises(ValueError, match="final map is 14 x 14"):
        inception_v2.inception_v2("inception-v2-test-large", "", input_shape=(448, 448, 3))
    with pytest.raises(ValueError, match="stem's depthwise convolution no channels"):
        inception_v2.inception_v2("inception-v2-test-thin", "", depth_multiplier=0.03, min_depth=2)


# ----------------------------------------------------------------------------- the small configuration


def test_small_configuration_shapes(small):
    layers = small.layers()
    by_name = {layer.name: layer for layer in layers}
    assert [layer.name for layer in layers] == [layer.name for layer in architectures.get("inception-v2").layers()]
    assert len(small.slots) == 69
    # depth(d) = max(int(d / 8), 8); the stem's depthwise multiplier int(depth(64) / 3) = 2.
    assert by_name["conv2d_1a_7x7.depthwise"].kernel_shape == (7, 7, 1, 2)
    assert by_name["conv2d_1a_7x7.depthwise"].out_shape == (14, 14, 2)
    assert by_name["conv2d_1a_7x7.pointwise"].out_shape == (14, 14, 8)
    assert by_name["conv2d_2c_3x3"].out_shape == (14, 14, 24)
    # Mixed blocks at 7 x 7 (3b, 3c), 4 x 4 (4b..4e) and 2 x 2 (5b, 5c); reductions 7 -> 4 -> 2.
    maps = {block: by_name[f"{block}.branch_0.conv2d_0a_1x1"].out_shape[:2] for block, _, _ in inception_v2.BLOCKS}
    assert maps == {"mixed_3b": (7, 7), "mixed_3c": (7, 7), "mixed_4a": (7, 7), "mixed_4b": (4, 4),
                    "mixed_4c": (4, 4), "mixed_4d": (4, 4), "mixed_4e": (4, 4), "mixed_5a": (4, 4),
                    "mixed_5b": (2, 2), "mixed_5c": (2, 2)}
    assert by_name["mixed_4a.branch_0.conv2d_1a_3x3"].out_shape == (4, 4, 20)
    assert by_name["mixed_5a.branch_1.conv2d_1a_3x3"].out_shape == (2, 2, 32)
    # mixed_5c concatenates 44 + 40 + 28 + 16 channels: the classifier's fan-in.
    assert by_name["logits"].kernel_shape == (128, 10)
    assert sorted({slot.channels for slot in small.slots}) == [8, 12, 16, 20, 24, 28, 32, 40, 44]
    assert architecture_counts(small, PluginSpec("batch_norm")) == {
        "parameters": 162_572, "multiply_accumulates": 2_211_112, "flops": 4_422_224}
    assert architecture_counts(small, PluginSpec("none"))["parameters"] == 161_324


def test_group_norm_on_the_small_configuration(small):
    """Slim's widths at depth multiplier 1/8 (8 .. 44 channels) do not divide into group
    norm's default 32 groups; the error names the first slot that fails. Every slot's
    channels are multiples of 4, so 4 groups fill them all."""
    with pytest.raises(ValueError, match=r"layer conv2d_1a_7x7\.pointwise of inception-v2-small: its 8 channels "
                                         r"are not divisible by groups = 32"):
        architecture_counts(small, PluginSpec("group_norm"))
    assert architecture_counts(small, PluginSpec("group_norm", (("groups", 4),)))["parameters"] == 162_572


# ----------------------------------------------------------------------------- training parity




@pytest.mark.slow  # ~1 min: JAX and TensorFlow compile a 71-layer float64 step
@pytest.mark.parametrize("method", ["batch_norm", "none"])
def test_small_configuration_trains_alike_in_every_backend(spec_factory, method):
    available = backends.available()
    if not available:
        pytest.skip("no backend installed")
    spec = spec_factory(model="inception-v2-small", batch_size=8, dtype="float64",
                        variants=[{"name": "v", "normalization": method}],
                        optimizer={"name": "sgd", "learning_rate": 0.05, "momentum": 0.9})
    trajectory = {b: parity.trajectory_outputs(spec, "v", b, 3, "float64") for b in available}
    initial, _ = resolve(spec, "v").initial_parameters(0)
    for name, out in trajectory.items():  # it trains: finite losses, every kernel moved
        assert np.all(np.isfinite(out["trajectory/loss"])), name
        unmoved = [k for k in initial if k.endswith("/kernel") and np.array_equal(out[f"final/{k}"], initial[k])]
        assert not unmoved, (name, unmoved)
    # The stem's depthwise half has no bias (as in slim): none to move by rounding noise alone.
    assert not any(key.startswith("final/conv2d_1a_7x7.depthwise/bias") for out in trajectory.values() for key in out)
    if len(available) < 2:
        pytest.skip(f"parity needs two backends; available: {available}")
    rows = parity.compare_outputs(trajectory, "float64", "v", resolve(spec, "v").std_metric.log_epsilon)
    quantities = {r.quantity for r in rows}
    assert {"trajectory/loss", "final/conv2d_1a_7x7.depthwise/kernel", "final/mixed_5c.branch_3.conv2d_0b_1x1/kernel",
            "final/logits/kernel"} <= quantities
    assert all(r.ok for r in rows), parity.format_table([r for r in rows if not r.ok])
    assert max(r.max_rel for r in rows) <= 1e-9, parity.format_table(sorted(rows, key=lambda r: -r.max_rel)[:5])
