"""PyTorch's fused fast paths (backends/torch/ops.py) against the compositions they
replace, in float64: the bias inside the convolution, TensorFlow's SAME alignment through
a zero-rowed kernel instead of a padded input, the channel moments' written-out
gradient, and F.group_norm for layer, group and instance norm. The parity tests hold the whole network to the other backends; these name the
primitive that broke."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.mark.parametrize("kernel_size,pads", [(5, ((1, 2), (1, 2))), (7, ((2, 3), (2, 3))), (5, ((1, 2), (2, 2)))],
                         ids=["5x5-(1,2)", "7x7-(2,3)", "5x5-rows-only"])
def test_same_alignment_through_a_zero_rowed_kernel_equals_the_padded_input(ops, kernel_size, pads):
    (top, bottom), (left, right) = pads
    x, kernel, bias = _leaves((2, 3, 10, 10), (4, 3, kernel_size, kernel_size), (4,))
    assert torch_ops._kernel_padding_pays(x, kernel, bottom - top, right - left, 1)  # the path under test
    ours = ops.conv2d_bias(x, kernel, bias, 2, pads)
    padded = F.conv2d(F.pad(x, (left, right, top, bottom)), kernel, bias, stride=2)
    assert ours.shape == padded.shape
    torch.testing.assert_close(ours, padded, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(ours.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((ours * upstream).sum(), (x, kernel, bias)),
                    torch.autograd.grad((padded * upstream).sum(), (x, kernel, bias))):
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


@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 4)], ids=["nchw", "dense"])
def test_channel_moments_are_the_two_pass_formula_with_its_gradient(ops, shape):
    (x,) = _leaves(shape)
    dims = (0, 2, 3) if len(shape) == 4 else (0,)
    view = (1, -1, 1, 1) if len(shape) == 4 else (1, -1)
    mean, var = ops.channel_moments(x)
    composed_mean = x.mean(dim=dims)
    composed_var = (x - composed_mean.view(view)).square().mean(dim=dims)
    assert torch.equal(mean, composed_mean) and torch.equal(var, composed_var)  # the same reductions, bit for bit
    weights = torch.randn(2, shape[1], dtype=torch.float64)
    ours = torch.autograd.grad((weights[0] * mean + weights[1] * var).sum(), x)[0]
    autograd = torch.autograd.grad((weights[0] * composed_mean + weights[1] * composed_var).sum(), x)[0]
    torch.testing.assert_close(ours, autograd, rtol=1e-12, atol=1e-14)


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
    """`--compile` (torch.compile of the loss, forward and backward) is held to the float32
    trajectory tolerances of the parity tests against the eager step, on the batches,
    schedule and optimizer a real run takes."""
    from normbench import backends, parity
    from normbench.data_order import BatchOrder, seed_streams
    from normbench.plan import resolve

    spec = spec_factory(model="cnn3", dtype="float32", batch_size=16, steps=10, seeds=1,
                        optimizer={"name": "adam", "learning_rate": 3e-3}, variants=[variant])
    plan = resolve(spec, spec.variants[0])
    rng = np.random.default_rng(11)
    images, labels = rng.random((64, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 64)
    order = BatchOrder(seed_streams(0)[1], 64, plan.batch_size)
    outputs = {}
    for compiled in (False, True):
        engine = backends.get_engine("torch", dtype="float32", compile=compiled)
        assert engine.compiled_step == compiled
        trainer = engine.trainer(plan, *plan.initial_parameters(0), engine.put_images(images), engine.put_labels(labels))
        losses = trainer.read_losses([trainer.step(order.indices(t), plan.learning_rate(t)) for t in range(10)])
        params, state = trainer.export()
        outputs["compiled" if compiled else "eager"] = {
            **{f"trajectory/{name}": losses[:, k].astype(np.float64) for k, name in enumerate(plan.step_loss_names)},
            **{f"final/{k}": v.astype(np.float64) for k, v in params.items()},
            **{f"final_state/{k}": v.astype(np.float64) for k, v in state.items()}}
    rows = parity.compare_outputs(outputs, "float32", plan.variant.name, plan.std_metric.log_epsilon)
    failed = [r for r in rows if not r.ok]
    assert rows and not failed, parity.format_table(failed)
