"""Tests specific to the JAX backend (cross-backend agreement: tests/test_parity.py): the
compiled step and evaluation one program's trainers share.

Everything runs on synthetic MNIST-shaped data, so no download is needed.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from normbench import backends
from normbench.data_order import BatchOrder, seed_streams
from normbench.plan import Plan, resolve
from normbench.spec import PluginSpec

if not backends.is_available("jax"):
    pytest.skip("jax is not installed", allow_module_level=True)

from normbench.backends.jax import engine as jax_engine  # noqa: E402

STEPS = 4


def _data(count, seed=3):
    rng = np.random.default_rng(seed)
    return rng.random((count, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, count)


def _trajectory(engine, plan, seed, images, labels):
    """Losses of STEPS steps of seed's batch order, the final parameters, and the test metrics."""
    trainer = engine.trainer(plan, *plan.initial_parameters(seed), engine.put_images(images), engine.put_labels(labels))
    order = BatchOrder(seed_streams(seed)[1], len(labels), plan.batch_size)
    losses = trainer.read_losses([trainer.step(order.indices(t), plan.learning_rate(t)) for t in range(STEPS)])
    params, _ = trainer.export()
    evaluated = trainer.evaluate(engine.put_images(images), engine.put_labels(labels), len(labels), chunk_size=24)
    return trainer, losses, params, evaluated


def _assert_same(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and all(np.array_equal(a[2][k], b[2][k]) for k in a[2])
    assert a[3]["cross_entropy"] == b[3]["cross_entropy"] and a[3]["accuracy"] == b[3]["accuracy"]


def test_the_seeds_of_a_variant_compile_once_and_train_as_they_do_alone(spec_factory):
    """A sweep's next seed reuses the step the first compiled (no compile time), and each
    seed's trajectory, parameters and evaluation are bit for bit those of the seed trained
    by an engine of its own."""
    spec = spec_factory(model="cnn-tiny", batch_size=16, steps=STEPS, seeds=2,
                        variants=[{"name": "batch_norm", "normalization": "batch_norm"}])
    images, labels = _data(64)
    shared = backends.get_engine("jax", dtype="float32")
    first = _trajectory(shared, resolve(spec, spec.variants[0]), 0, images, labels)
    second = _trajectory(shared, resolve(spec, spec.variants[0]), 1, images, labels)
    assert first[0].compile_seconds and not second[0].compile_seconds  # the second found it compiled
    assert second[0].compile(16) == 0.0
    for seed, got in ((0, first), (1, second)):
        alone = _trajectory(backends.get_engine("jax", dtype="float32"), resolve(spec, spec.variants[0]), seed,
                            images, labels)
        _assert_same(got, alone)


def test_another_variant_under_the_same_name_or_another_training_set_gets_its_own(spec_factory):
    """The key is the whole variant, not its name (folding builds the plain network as a
    variant of the same name its spec does not list), and an executable is never handed
    a training set of another size."""
    spec = spec_factory(model="cnn-tiny", batch_size=16, steps=STEPS, seeds=1,
                        variants=[{"name": "v", "normalization": "batch_norm"}])
    plan = resolve(spec, spec.variants[0])
    plain = Plan(spec, dataclasses.replace(plan.variant, normalization=PluginSpec("none")), plan.arch)
    engine = backends.get_engine("jax", dtype="float32")
    assert engine.step_functions(plan) is not engine.step_functions(plain)
    assert engine.step_functions(plan) is engine.step_functions(resolve(spec, spec.variants[0]))
    images, labels = _data(64)
    small = _trajectory(engine, plan, 0, images[:48], labels[:48])
    large = _trajectory(engine, plan, 0, images, labels)
    assert small[0].compile_seconds and large[0].compile_seconds  # one executable per training-set shape
    alone = _trajectory(backends.get_engine("jax", dtype="float32"), plan, 0, images[:48], labels[:48])
    _assert_same(small, alone)


def test_an_engine_keeps_the_last_few_programs_only(spec_factory, monkeypatch):
    monkeypatch.setattr(jax_engine, "STEP_FUNCTIONS_KEPT", 2)
    spec = spec_factory(model="cnn-tiny", batch_size=16, steps=STEPS, seeds=1,
                        variants=[{"name": f"v{k}", "normalization": "none"} for k in range(3)])
    engine = backends.get_engine("jax", dtype="float32")
    plans = [resolve(spec, v) for v in spec.variants]
    kept = [engine.step_functions(p) for p in plans[:2]]
    engine.step_functions(plans[0])  # used again: now the most recent
    engine.step_functions(plans[2])  # evicts v1, the least recently used
    assert engine.step_functions(plans[0]) is kept[0]
    assert engine.step_functions(plans[1]) is not kept[1]


@pytest.mark.parametrize("stride,kernel,size,pads", [
    (2, 5, 14, ((1, 2), (1, 2))),  # cnn3's second layer: TensorFlow SAME, the odd pixel below
    (2, 5, 7, ((2, 2), (2, 2))),  # cnn3's third: symmetric
    (2, 7, 16, ((2, 3), (3, 2))),  # a 7x7 stem, different pads per axis
    (2, 4, 9, ((0, 0), (1, 0))),  # VALID rows: the last input row is read by no window
    (3, 5, 11, ((1, 1), (0, 2))),  # stride 3: the kernel grows to 6, nine phases
    (2, 3, 10, ((0, 1), (0, 1))),  # a cost ratio past the bound: the direct call, for reference
])
def test_the_phase_split_input_gradient_is_xlas_gradient_of_the_strided_convolution(stride, kernel, size, pads):
    """`_phase_input_gradient` (used on CPU for strided convolutions whose kernel grows
    little, `_phase_gradient_pays`) against XLA's own input gradient of the same
    convolution, in float64 (the same sums in another order: only rounding may differ),
    and the kernel gradient of the convolution that uses it against XLA's, too."""
    import jax
    import jax.numpy as jnp

    from normbench.backends.jax import ops as jax_ops

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(stride * 100 + kernel)
    x = jnp.asarray(rng.normal(size=(3, size, size, 4)))
    weights = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)))
    direct = lambda x, k: jax_ops._conv(x, k, stride, pads)
    upstream = jnp.asarray(rng.normal(size=direct(x, weights).shape))
    want_x, want_k = jax.vjp(direct, x, weights)[1](upstream)
    got_x = jax_ops._phase_input_gradient(upstream, weights, x.shape, stride, pads)
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), rtol=0, atol=1e-12 * float(jnp.abs(want_x).max()))
    got_k = jax.vjp(jax_ops._member_convolution(stride, pads, 1, True), x, weights)[1](upstream)[1]
    np.testing.assert_allclose(np.asarray(got_k), np.asarray(want_k), rtol=1e-12)
    ops = jax_ops.Ops("cpu")
    uses_phases = ops.phase_gradients and jax_ops._phase_gradient_pays(weights, stride, 1)
    assert uses_phases == (kernel != 3)  # 3x3 stride 2 grows to 4x4: 1.78x the multiply-adds
    assert not jax_ops.Ops("gpu").phase_gradients


@pytest.mark.parametrize("stride,kernel,groups,shared", [
    (2, 5, 1, None),  # cnn3's layers: the phase-split input gradient
    (1, 3, 1, None),  # XLA's own gradients
    (2, 3, 4, None),  # depthwise (MobileNet): feature groups within each member
    (2, 5, 1, "x"),  # a vectorized evaluation's first layer: the images are every member's
    (1, 3, 1, "kernel"),  # one kernel for every member: XLA's batching, not the loop
])
def test_a_vmapped_convolution_is_each_members_own(stride, kernel, groups, shared):
    """Under jax.vmap (vectorized groups) a CPU convolution with a kernel per member runs
    one member at a time (`_one_member_at_a_time`), forward and backward: its values and
    both gradients are each member's alone, to float64 rounding, and the vmapped gradient
    holds no convolution grouped over the members."""
    import jax
    import jax.numpy as jnp

    from normbench.backends.jax import ops as jax_ops

    jax.config.update("jax_enable_x64", True)
    members, channels, out = 3, 4, 4 if groups > 1 else 5
    rng = np.random.default_rng(stride * 10 + kernel + groups)
    x = jnp.asarray(rng.normal(size=(members, 2, 9, 9, channels)))
    weights = jnp.asarray(rng.normal(size=(members, kernel, kernel, channels // groups, out)))
    pads = ((1, 2), (1, 2)) if stride == 2 else ((1, 1), (1, 1))
    x_axis, k_axis = (None if shared == "x" else 0), (None if shared == "kernel" else 0)
    x, weights = (x[0] if x_axis is None else x), (weights[0] if k_axis is None else weights)
    ops = jax_ops.Ops("cpu")

    def loss(x, k):
        y = ops.conv2d(x, k, stride, pads, groups)
        return jnp.sum(y * jnp.cos(y))  # an upstream gradient that differs per position and member

    vmapped = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(x_axis, k_axis))
    values, (grad_x, grad_k) = vmapped(x, weights)
    for m in range(members):
        alone_x, alone_k = (x if x_axis is None else x[m]), (weights if k_axis is None else weights[m])
        value, (want_x, want_k) = jax.value_and_grad(loss, argnums=(0, 1))(alone_x, alone_k)
        np.testing.assert_allclose(float(values[m]), float(value), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad_x[m]), np.asarray(want_x), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(np.asarray(grad_k[m]), np.asarray(want_k), rtol=1e-11, atol=1e-12)
    hlo = jax.jit(vmapped).lower(x, weights).as_text()
    counts = [int(n) for n in re.findall(r"(?:feature|batch)_group_count = (\d+)", hlo)]
    assert counts and set(counts) <= {1, groups}, f"convolutions grouped {sorted(set(counts))} ways, {members} members"


def test_inference_on_cpu_takes_the_fusion_option_only_where_jaxlib_accepts_it(monkeypatch):
    jax_engine._inference_options.cache_clear()
    monkeypatch.setattr(jax_engine, "CPU_INFERENCE_COMPILER_OPTIONS", {"xla_cpu_no_such_option_anywhere": True})
    assert jax_engine._inference_options("cpu") == {}  # refused: XLA's defaults
    jax_engine._inference_options.cache_clear()
    monkeypatch.undo()
    assert jax_engine._inference_options("gpu") == {}
    assert jax_engine._inference_options("cpu") in ({}, jax_engine.CPU_INFERENCE_COMPILER_OPTIONS)
    jax_engine._inference_options.cache_clear()


@pytest.mark.parametrize("model,normalization", [("cnn-tiny", "none"), ("cnn-tiny", "batch_norm"),
                                                 ("cnn-tiny", "layer_norm"), ("mlp-tiny", "layer_norm")])
def test_evaluation_with_the_fusion_option_is_evaluation_with_xlas_defaults(spec_factory, monkeypatch, model,
                                                                           normalization):
    """The inference compiler options change how the forward pass is scheduled, not what it
    computes: every evaluated quantity agrees with XLA's defaults to float32 rounding
    (convolutions, matrix products and per-example reductions among the fused ops)."""
    if not jax_engine._inference_options("cpu"):
        pytest.skip("this jaxlib refuses CPU_INFERENCE_COMPILER_OPTIONS: evaluation compiles with XLA's defaults")
    spec = spec_factory(model=model, batch_size=16, steps=STEPS, seeds=1,
                        variants=[{"name": normalization, "normalization": normalization}])
    images, labels = _data(64)
    evaluated = {}
    for name, options in (("defaults", lambda platform: {}), ("fused", jax_engine._inference_options)):
        monkeypatch.setattr(jax_engine, "_inference_options", options)
        evaluated[name] = _trajectory(backends.get_engine("jax", dtype="float32"), resolve(spec, spec.variants[0]), 0,
                                      images, labels)[3]
    a, b = evaluated["defaults"], evaluated["fused"]
    assert a["accuracy"] == b["accuracy"]
    np.testing.assert_allclose(a["cross_entropy"], b["cross_entropy"], rtol=1e-6)
    for layer, (mean, var) in a["moments"].items():
        np.testing.assert_allclose(b["moments"][layer][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["moments"][layer][1], var, rtol=1e-5, atol=1e-6)
