"""PyTorch's fused fast paths (backends/torch/ops.py) against the compositions they
replace, in float64: the bias inside the convolution, TensorFlow's SAME alignment in the
reversed layout (symmetric pads, zero kernel rows, a cropped or padded input) against
the canonical padded input, the one-channel convolution's kernel gradient, the channel
moments' written-out gradient, and F.group_norm for layer, group and instance norm. The parity tests hold the whole network to the other backends; these name the
primitive that broke."""

from __future__ import annotations

import numpy as np
import pytest
from unittest import mock

torch = pytest.importorskip("torch")
F = torch.nn.functional

from normbench.backends import base  # noqa: E402
from normbench.backends.torch import ops as torch_ops  # noqa: E402


@pytest.fixture
def ops():
    return torch_ops.Ops()


def _leaves(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.normal(size=shape), dtype=torch.float64, requires_grad=True) for shape in shapes]


# (input size, kernel size, stride, canonical pads, groups) -> the path conv2d_bias takes
# in the reversed layout, each against the canonical padded input.
CONVOLUTIONS = {
    "SAME 5x5 stride 2: symmetric": (10, 5, 2, ((1, 2), (1, 2)), 1, "symmetric"),
    "SAME 3x3 stride 2, depthwise: symmetric": (10, 3, 2, ((0, 1), (0, 1)), 3, "symmetric"),
    "SAME 7x7 stride 2: symmetric": (10, 7, 2, ((2, 3), (2, 3)), 1, "symmetric"),
    "7x7 stride 2 padded 3 around, leaving a row: zero rows ahead": (10, 7, 2, ((3, 3), (3, 3)), 1, "kernel"),
    "SAME 6x6 stride 1: zero rows behind": (10, 6, 1, ((2, 3), (2, 3)), 1, "kernel"),
    "VALID 3x3 stride 2 leaving a row: cropped": (10, 3, 2, ((0, 0), (0, 0)), 1, "symmetric"),
    "VALID 1x1 stride 2 leaving a row: subsampled": (10, 1, 2, ((0, 0), (0, 0)), 1, "symmetric"),
    "VALID 1x1 stride 3, depthwise: subsampled": (10, 1, 3, ((0, 0), (0, 0)), 3, "symmetric"),
    "SAME 4x4 stride 1: padded input": (10, 4, 1, ((1, 2), (1, 2)), 1, "padded"),
    "SAME 3x3 stride 1 on one channel: padded input": (10, 3, 1, ((0, 2), (1, 1)), 1, "padded"),
    # One input channel and at least 25 taps: the kernel gradient is a convolution of its own.
    "SAME 5x5 stride 2 on one channel: symmetric": (10, 5, 2, ((1, 2), (1, 2)), 1, "symmetric"),
    "SAME 6x6 stride 1 on one channel: padded input": (10, 6, 1, ((2, 3), (2, 3)), 1, "padded"),
    "VALID 5x5 stride 3 leaving two rows on one channel: cropped": (10, 5, 3, ((0, 0), (0, 0)), 1, "symmetric"),
}


def _path(x, kernel, stride, pads, groups):
    _, _, ((_, ahead_h, behind_h), (_, ahead_w, behind_w)) = torch_ops._reversed_window(
        x, tuple(kernel.shape[2:]), stride, pads)
    extra_h, extra_w = ahead_h + behind_h, ahead_w + behind_w
    if not (extra_h or extra_w):
        return "symmetric"
    return "kernel" if torch_ops._kernel_padding_pays(x, kernel, extra_h, extra_w, groups) else "padded"


@pytest.mark.parametrize("case", list(CONVOLUTIONS))
def test_convolutions_in_the_reversed_layout_equal_the_canonical_padded_input(ops, case):
    """The reversed layout's convolution (ops.py: symmetric pads, zero kernel rows or a
    padded input) gives the canonical padded input's outputs and gradients, in float64."""
    size, k, stride, pads, groups, path = CONVOLUTIONS[case]
    channels = 1 if "one channel" in case else 3
    (top, bottom), (left, right) = pads
    x, kernel, bias = _leaves((2, channels, size, size), (6, channels // groups, k, k), (6,))
    assert _path(x, kernel, stride, pads, groups) == path  # the path under test
    reverse = lambda t: t.flip((2, 3))
    ours = reverse(ops.conv2d_bias(reverse(x), reverse(kernel), bias, stride, pads, groups))
    padded = F.conv2d(F.pad(x, (left, right, top, bottom)), kernel, bias, stride=stride, groups=groups)
    assert ours.shape == padded.shape
    torch.testing.assert_close(ours, padded, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(ours.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((ours * upstream).sum(), (x, kernel, bias)),
                    torch.autograd.grad((padded * upstream).sum(), (x, kernel, bias))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pads,window,stride", [(((0, 1), (0, 1)), (3, 3), 2), (((1, 1), (1, 1)), (3, 3), 2),
                                                (((0, 0), (0, 0)), (3, 3), 2), (((0, 2), (1, 1)), (3, 3), 1)],
                         ids=["SAME-odd-pixel", "symmetric", "VALID-cropped", "padded"])
def test_average_pooling_in_the_reversed_layout_counts_the_canonical_windows(ops, pads, window, stride):
    (x,) = _leaves((2, 3, 10, 10))
    (top, bottom), (left, right) = pads
    reverse = lambda t: t.flip((2, 3))
    ours = reverse(ops.avg_pool2d(reverse(x), window, stride, pads))
    sums = F.avg_pool2d(F.pad(x, (left, right, top, bottom)), window, stride, divisor_override=1)
    counts = torch.from_numpy(base.valid_counts((10, 10), window, stride, pads))
    torch.testing.assert_close(ours, sums / counts, rtol=1e-12, atol=1e-12)


def test_max_pooling_ties_send_the_gradient_to_the_first_canonical_position(ops):
    """The contract's tie rule (base.Ops.max_pool2d) holds in canonical order, not in the
    reversed order the activations are stored in."""
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)  # every window a tie
    out = ops.max_pool2d(x.flip((2, 3)), (2, 2), 2, ((0, 0), (0, 0))).flip((2, 3))
    (grad,) = torch.autograd.grad(out.sum(), x)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[::2, ::2] = 1.0
    torch.testing.assert_close(grad[0, 0], expected)


@pytest.mark.parametrize("channels,kernel_size,grad,taken", [(1, 5, True, True), (1, 7, True, True), (1, 3, True, False),
                                                         (2, 5, True, False), (1, 5, False, False)],
                         ids=["one-channel-5x5", "one-channel-7x7", "3x3", "two-channels", "inference"])
def test_one_channel_kernel_gradients_take_their_own_convolution_where_it_pays(channels, kernel_size, grad, taken):
    """`_OneChannelConvolution` only where a kernel gradient over one input channel of at
    least ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS taps will be taken (ops.py says why)."""
    x, kernel, bias = _leaves((2, channels, 9, 9), (4, channels, kernel_size, kernel_size), (4,))
    for on_this_cpu in (True, False):  # False: a CPU with AVX-512, where oneDNN's own backward is faster
        with mock.patch.object(torch_ops, "ONE_CHANNEL_FUNCTION_ON_THIS_CPU", on_this_cpu), torch.set_grad_enabled(grad):
            out = torch_ops._convolve(x.detach(), kernel, bias, 2, (2, 2))
        assert (type(out.grad_fn).__name__ == "_OneChannelConvolutionBackward") == (taken and on_this_cpu)
    assert torch_ops.ONE_CHANNEL_FUNCTION_ON_THIS_CPU == (torch.backends.cpu.get_cpu_capability() != "AVX512")


def test_the_first_layer_compiles_into_one_graph():
    """`_convolve` decides its path without a call torch.compile cannot trace (a graph
    break in every compiled training step)."""
    x = torch.randn(4, 1, 28, 28)
    kernel, bias = torch.randn(8, 1, 5, 5, requires_grad=True), torch.randn(8, requires_grad=True)
    for on_this_cpu in (True, False):
        torch._dynamo.reset()
        with mock.patch.object(torch_ops, "ONE_CHANNEL_FUNCTION_ON_THIS_CPU", on_this_cpu):
            compiled = torch.compile(lambda x, k, b: torch_ops._convolve(x, k, b, 2, (2, 2)).square().sum(), fullgraph=True)
            compiled(x, kernel, bias).backward()


def test_one_channel_convolution_under_vmap_of_grad_is_autograds():
    """Vectorized runs differentiate each member's kernels under torch.func.vmap."""
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    kernels, biases = torch.randn(2, 4, 1, 5, 5, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    loss = lambda convolve: lambda k, b: convolve(x, k, b).square().sum()
    ours = torch.func.vmap(torch.func.grad(loss(lambda x, k, b: torch_ops._OneChannelConvolution.apply(x, k, b, 2, (2, 2))),
                                           argnums=(0, 1)))(kernels, biases)
    autograd = torch.func.vmap(torch.func.grad(loss(lambda x, k, b: F.conv2d(x, k, b, stride=2, padding=2)),
                                               argnums=(0, 1)))(kernels, biases)
    for a, b in zip(ours, autograd):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_small_kernels_and_single_channels_keep_the_padded_input():
    """Where the grown kernel costs more than the padding (measured: see ops.py)."""
    x3, k3 = torch.zeros(1, 8, 6, 6), torch.zeros(8, 8, 3, 3)
    assert not torch_ops._kernel_padding_pays(x3, k3, 1, 1, 1)  # 3x3 -> 4x4: 1.78x the multiply-adds
    x1, k5 = torch.zeros(1, 1, 6, 6), torch.zeros(8, 1, 5, 5)
    assert not torch_ops._kernel_padding_pays(x1, k5, 1, 1, 1)  # one input channel
    assert not torch_ops._kernel_padding_pays(torch.zeros(1, 8, 6, 6), torch.zeros(8, 1, 5, 5), 1, 1, 8)  # depthwise


def test_dense_bias_is_the_matrix_product_plus_the_bias(ops):
    x, kernel, bias = _leaves((5, 3), (3, 4), (4,))
    torch.testing.assert_close(ops.dense_bias(x, kernel, bias), x @ kernel + bias, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ops.dense_bias(x, kernel, None), x @ kernel)


@pytest.mark.parametrize("used", ["both", "mean", "var"])
@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 4)], ids=["nchw", "dense"])
def test_channel_moments_are_the_two_pass_formula_with_its_gradient(ops, shape, used):
    """Also where the loss reads only one of the two (the gradient of the other is None:
    the centred output's gradient is not materialized, nor are unused ones)."""
    (x,) = _leaves(shape)
    dims = (0, 2, 3) if len(shape) == 4 else (0,)
    view = (1, -1, 1, 1) if len(shape) == 4 else (1, -1)
    mean, var = ops.channel_moments(x)
    composed_mean = x.mean(dim=dims)
    composed_var = (x - composed_mean.view(view)).square().mean(dim=dims)
    # The same formula, its sums in another order (each example's positions first).
    torch.testing.assert_close(mean, composed_mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(var, composed_var, rtol=1e-14, atol=1e-15)
    with torch.inference_mode():  # the in-place path evaluation takes: the same values, bit for bit
        inferred_mean, inferred_var = ops.channel_moments(x.detach())
    assert torch.equal(inferred_mean, mean) and torch.equal(inferred_var, var)
    weights = torch.randn(2, shape[1], dtype=torch.float64)
    read = lambda m, v: (weights[0] * m if used != "var" else 0.0) + (weights[1] * v if used != "mean" else 0.0)
    ours = torch.autograd.grad(read(mean, var).sum(), x)[0]
    autograd = torch.autograd.grad(read(composed_mean, composed_var).sum(), x)[0]
    torch.testing.assert_close(ours, autograd, rtol=1e-12, atol=1e-14)


def _loss_taps(dtype):
    """Taps of the kinds a network gives: NCHW and dense, one with a dead channel (var 0)
    and one whose channel spreads (3e-5 to 3e-3) are tiny beside their means."""
    rng = np.random.default_rng(5)
    conv = rng.normal(size=(6, 4, 5, 5)) * 1.5 + rng.normal(size=(1, 4, 1, 1))
    conv[:, 1] = 0.0
    tiny = 1.9 * rng.normal(size=8) + rng.normal(size=(16, 8)) * np.logspace(-4.5, -2.5, 8)
    return [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (conv, tiny, rng.normal(size=(6, 3, 2, 2)))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_standardization_loss_is_the_composition_bit_for_bit(ops, dtype):
    """`_StandardizationLoss` (one Function for every tap) against `base.Ops`' composition
    of channel_moments and standard_normal_kl: the same value and input gradients, to the
    bit (its docstring says why they can be), through a loss weight as the objective
    applies it; with no graph recorded, the composition itself."""
    taps = _loss_taps(dtype)
    fused = ops.standardization_loss(taps, 1e-8)
    assert type(fused.grad_fn).__name__ == "_StandardizationLossBackward"
    composed = base.Ops.standardization_loss(ops, taps, 1e-8)
    assert torch.equal(fused, composed)
    for ours, theirs in zip(torch.autograd.grad(0.7 * fused, taps), torch.autograd.grad(0.7 * composed, taps)):
        assert torch.equal(ours, theirs)
    with torch.no_grad():
        assert torch.equal(ops.standardization_loss(taps, 1e-8), composed)


def test_fused_standardization_loss_under_vmap_of_grad_is_the_compositions(ops):
    """Vectorized runs differentiate each member's loss under torch.func.vmap."""
    stacked = [torch.stack([t.detach(), t.detach() * 0.5 + 0.1]) for t in _loss_taps(torch.float64)]
    ours = torch.func.vmap(torch.func.grad(lambda *t: ops.standardization_loss(list(t), 1e-8), argnums=(0, 1, 2)))(*stacked)
    theirs = torch.func.vmap(torch.func.grad(lambda *t: base.Ops.standardization_loss(ops, list(t), 1e-8),
                                             argnums=(0, 1, 2)))(*stacked)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_channel_moments_gradient_under_vmap_with_a_shared_input(ops):
    """The conv-tap gradient adds the offset in place. Here only the offset is batched:
    the input (so the centred product) is shared, the mean's cotangent is per member."""
    (x,) = _leaves((4, 3, 5, 5))
    weights = torch.randn(2, 3, dtype=torch.float64)

    def read(x, w):
        mean, var = ops.channel_moments(x)
        return (w * mean).sum() + (var * var).sum()

    vectorized = torch.func.vmap(torch.func.grad(read), in_dims=(None, 0))(x.detach(), weights)
    one_by_one = torch.stack([torch.func.grad(read)(x.detach(), w) for w in weights])
    torch.testing.assert_close(vectorized, one_by_one, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,groups", [((4, 8, 5, 5), 1), ((4, 8, 5, 5), 4), ((4, 8, 5, 5), 8), ((6, 8), 2)],
                         ids=["layer", "group", "instance", "dense-group"])
def test_fused_group_norm_is_the_composed_formula(ops, shape, groups):
    x, scale, shift = _leaves(shape, (shape[1],), (shape[1],))
    fused = ops.group_normalize(x, groups, 1e-3, scale, shift)
    composed = base.Ops.group_normalize(ops, x, groups, 1e-3, scale, shift)
    torch.testing.assert_close(fused, composed, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((fused * upstream).sum(), (x, scale, shift)),
                    torch.autograd.grad((composed * upstream).sum(), (x, scale, shift))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("variant", [{"name": "none", "normalization": "none"},
                                     {"name": "batch_norm", "normalization": "batch_norm"},
                                     {"name": "standardization_loss", "normalization": "none",
                                      "auxiliary_losses": [{"name": "standardization", "weight": 1.0}]}],
                         ids=lambda v: v["name"])
def test_the_compiled_step_follows_the_eager_trajectory(variant, spec_factory):
    """`--compile` (torch.compile of the loss, forward and backward, and of the evaluation)
    is held to the float32 trajectory tolerances of the parity tests against the eager
    step, on the batches, schedule and optimizer a real run takes; its evaluation of the
    trained network (two chunk shapes: two compilations) agrees with the eager one to
    float32 rounding."""
    from normbench import backends, parity
    from normbench.data_order import BatchOrder, seed_streams
    from normbench.plan import resolve

    spec = spec_factory(model="cnn3", dtype="float32", batch_size=16, steps=10, seeds=1,
                        optimizer={"name": "adam", "learning_rate": 3e-3}, variants=[variant])
    plan = resolve(spec, spec.variants[0])
    rng = np.random.default_rng(11)
    images, labels = rng.random((64, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 64)
    order = BatchOrder(seed_streams(0)[1], 64, plan.batch_size)
    outputs, evaluations = {}, {}
    for compiled in (False, True):
        engine = backends.get_engine("torch", dtype="float32", compile=compiled)
        assert engine.compiled_step == compiled
        trainer = engine.trainer(plan, *plan.initial_parameters(0), engine.put_images(images), engine.put_labels(labels))
        losses = trainer.read_losses([trainer.step(order.indices(t), plan.learning_rate(t)) for t in range(10)])
        params, state = trainer.export()
        evaluations[compiled] = trainer.evaluate(engine.put_images(images), engine.put_labels(labels), 64, chunk_size=48)
        outputs["compiled" if compiled else "eager"] = {
            **{f"trajectory/{name}": losses[:, k].astype(np.float64) for k, name in enumerate(plan.step_loss_names)},
            **{f"final/{k}": v.astype(np.float64) for k, v in params.items()},
            **{f"final_state/{k}": v.astype(np.float64) for k, v in state.items()}}
    rows = parity.compare_outputs(outputs, "float32", plan.variant.name, plan.std_metric.log_epsilon)
    failed = [r for r in rows if not r.ok]
    assert rows and not failed, parity.format_table(failed)
    eager, compiled = evaluations[False], evaluations[True]
    assert abs(eager["accuracy"] - compiled["accuracy"]) <= 1 / 64  # at most one argmax tie broken otherwise
    assert compiled["cross_entropy"] == pytest.approx(eager["cross_entropy"], rel=1e-5)
    assert eager["moments"].keys() == compiled["moments"].keys() and eager["moments"]
    for layer, moments in eager["moments"].items():
        for a, b in zip(moments, compiled["moments"][layer]):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=layer)
