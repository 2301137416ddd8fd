"""Tests specific to the TensorFlow backend (cross-backend agreement: tests/test_parity.py).

Everything runs on synthetic MNIST-shaped data, so no download is needed.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from normbench import architectures, backends, runner
from normbench import spec as specs
from normbench.backends.base import BackendUnavailable
from normbench.plan import resolve as TrainingProgram

if not backends.is_available("tensorflow"):
    pytest.skip("tensorflow is not installed", allow_module_level=True)

# Through the engine module, so torch is loaded before TensorFlow (see engine.py).
from normbench.backends.tensorflow.engine import Engine  # noqa: E402

import tensorflow as tf  # noqa: E402

NORMALIZATIONS = ("none", "batch_norm_shift", "batch_norm_scale_shift", "standardization_loss")


def smoke_spec(normalization: str = "batch_norm_shift", dtype: str = "float32", **changes) -> specs.ExperimentSpec:
    weight = 1.0 if normalization == "standardization_loss" else 0.0
    variant = {"name": normalization, "normalization": normalization, "standardization_loss_weight": weight}
    fields = {"steps": 5, "eval_every": 5, "seeds": 1, "dtype": dtype, "train_eval_examples": 200, "variants": [variant]}
    return specs.load("smoke").replace(**{**fields, **changes})


def synthetic_data(dtype: str, train: int = 512, test: int = 300, seed: int = 0) -> runner.LoadedData:
    rng = np.random.default_rng(seed)
    images = lambda n: rng.random((n, 28, 28, 1)).astype(dtype)
    labels = lambda n: rng.integers(0, 10, n).astype(np.int64)
    return runner.LoadedData("synthetic", images(train), labels(train), images(test), labels(test), {})


def make_trainer(engine, spec, data, seed: int = 0):
    program = TrainingProgram(spec, spec.variants[0])
    params, state = program.initial_parameters(seed)
    trainer = engine.trainer(program, params, state, engine.put_images(data.train_images), engine.put_labels(data.train_labels))
    return program, trainer


def numpy_conv2d(x, kernel, stride, pads):
    """Reference cross-correlation: NHWC input, HWIO kernel, explicit ((top, bottom), (left, right)) zero padding."""
    (top, bottom), (left, right) = pads
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out


# --- primitives -----------------------------------------------------------------------


@pytest.mark.parametrize("size,kernel_size,stride", [(28, 5, 2), (14, 5, 2), (7, 5, 2), (9, 3, 2), (8, 3, 1), (5, 4, 1)],
                         ids=lambda v: str(v))
def test_conv2d_explicit_padding_matches_numpy_and_tensorflow_same(size, kernel_size, stride):
    rng = np.random.default_rng(size * 100 + kernel_size * 10 + stride)
    x = rng.standard_normal((2, size, size, 3))
    kernel = rng.standard_normal((kernel_size, kernel_size, 3, 4))
    pad, out_size = architectures.conv_padding(size, kernel_size, stride, "same")
    ops = Engine(dtype="float64").ops
    got = ops.conv2d(tf.constant(x), tf.constant(kernel), stride, (pad, pad)).numpy()
    assert got.shape == (2, out_size, out_size, 4)
    np.testing.assert_allclose(got, numpy_conv2d(x, kernel, stride, (pad, pad)), rtol=1e-12, atol=1e-12)
    # The explicit pads reproduce TensorFlow's own SAME alignment (odd pixel at the bottom/right).
    same = tf.nn.conv2d(tf.constant(x), tf.constant(kernel), stride, "SAME").numpy()
    np.testing.assert_allclose(got, same, rtol=1e-12, atol=1e-12)


def test_conv2d_asymmetric_padding_is_not_symmetric():
    # Guards the test above: the same 14x14 output with the odd pixel on the other side
    # (or PyTorch-style symmetric padding 2) would be a different alignment.
    rng = np.random.default_rng(1)
    x, kernel = rng.standard_normal((1, 28, 28, 1)), rng.standard_normal((5, 5, 1, 2))
    ops = Engine(dtype="float64").ops
    got = ops.conv2d(tf.constant(x), tf.constant(kernel), 2, ((1, 2), (1, 2))).numpy()
    for other in (((2, 1), (2, 1)), ((2, 2), (2, 2))):
        reference = numpy_conv2d(x, kernel, 2, other)
        assert reference.shape == got.shape and not np.allclose(got, reference)


@pytest.mark.parametrize("shape", [(16, 5), (4, 6, 6, 3)], ids=["dense", "conv"])
def test_batch_norm_and_moments_match_numpy(shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape) * 3.0 + 5.0
    scale, shift = rng.random(shape[-1]) + 0.5, rng.standard_normal(shape[-1])
    ops = Engine(dtype="float64").ops
    axes = tuple(range(len(shape) - 1))
    mean, var = x.mean(axes), x.var(axes)
    got_mean, got_var = ops.channel_moments(tf.constant(x))
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-13)
    np.testing.assert_allclose(got_var.numpy(), var, rtol=1e-13)
    assert ops.reduced_count(tf.constant(x)) == int(np.prod(shape[:-1]))
    expected = (x - mean) / np.sqrt(var + 1e-3) * scale + shift
    got, got_mean, got_var = ops.batch_norm_train(tf.constant(x), tf.constant(scale), tf.constant(shift), 1e-3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-13)
    np.testing.assert_allclose(got_var.numpy(), var, rtol=1e-13)
    got_shift_only, _, _ = ops.batch_norm_train(tf.constant(x), None, tf.constant(shift), 1e-3)
    np.testing.assert_allclose(got_shift_only.numpy(), (x - mean) / np.sqrt(var + 1e-3) + shift, rtol=1e-12, atol=1e-12)


def test_float32_moments_are_accurate():
    # A single TensorFlow reduction over 25,000 float32 values per channel is off by
    # ~1e-6; batch-norm gradients amplify that, so the backend reduces in two stages.
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((128, 14, 14, 32)) * 0.8 + 2.0).astype(np.float32)
    mean, var = Engine(dtype="float32").ops.channel_moments(tf.constant(x))
    exact = x.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), exact.mean((0, 1, 2)), rtol=5e-7)
    np.testing.assert_allclose(var.numpy(), exact.var((0, 1, 2)), rtol=5e-7)


# --- the edge -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layout_round_trip(dtype):
    rng = np.random.default_rng(4)
    tree = {"conv/kernel": rng.standard_normal((5, 5, 3, 4)), "dense/kernel": rng.standard_normal((12, 10)),
            "dense/bias": rng.standard_normal(10)}
    engine = Engine(dtype=dtype)
    imported = engine.import_tree(tree)
    assert all(v.dtype == engine.tf_dtype for v in imported.values())
    exported = engine.export_tree(imported)
    for name, value in tree.items():
        assert exported[name].shape == value.shape and exported[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(exported[name], value.astype(dtype))
    images = rng.random((3, 28, 28, 1)).astype(dtype)
    np.testing.assert_array_equal(engine.activation_to_numpy(engine.put_images(images)), images)
    labels = engine.put_labels(np.array([3, 1, 4]))
    assert labels.dtype == tf.int64 and engine.to_numpy(labels).tolist() == [3, 1, 4]


def test_trainer_export_is_canonical():
    spec = smoke_spec("batch_norm_scale_shift")
    program, trainer = make_trainer(Engine(), spec, synthetic_data("float32"))
    params, state = program.initial_parameters(0)
    got_params, got_state = trainer.export()
    assert set(got_params) == set(params) and set(got_state) == set(state)
    for name, value in {**params, **state}.items():
        got = {**got_params, **got_state}[name]
        assert got.shape == value.shape
        np.testing.assert_array_equal(got, value.astype(np.float32))


@pytest.mark.parametrize("device", ["gpu:7", "cuda:7"] + ([] if tf.config.list_physical_devices("GPU") else ["gpu", "cuda"]))
def test_absent_gpu_is_a_one_line_error(device):
    with pytest.raises(BackendUnavailable) as info:
        Engine(device=device)
    assert "\n" not in str(info.value) and "cpu" in str(info.value)


def test_unknown_device_is_rejected():
    with pytest.raises(BackendUnavailable, match="unknown device"):
        Engine(device="tpu")


# --- training -------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["none", "batch_norm_shift", "standardization_loss"])
def test_five_step_run_has_finite_metrics(normalization):
    spec = smoke_spec(normalization)
    data = synthetic_data(spec.dtype)
    engine = Engine()
    evaluator = runner._Evaluator(engine, data, spec)
    outcome = runner.execute_run(engine, TrainingProgram(spec, spec.variants[0]), 0, engine.put_images(data.train_images),
                                 engine.put_labels(data.train_labels), evaluator)
    assert outcome["status"] == "ok" and outcome["steps_completed"] == 5
    assert {(row["step"], row["split"]) for row in outcome["rows"]} == {(s, p) for s in (0, 5) for p in ("train", "test")}
    for row in outcome["rows"]:
        assert all(math.isfinite(row[key]) for key in ("cross_entropy", "std_loss", "accuracy"))
        assert 0.0 <= row["accuracy"] <= 1.0


def test_evaluation_aggregates_chunks_exactly():
    spec = smoke_spec("batch_norm_shift", dtype="float64")
    data = synthetic_data("float64")
    engine = Engine(dtype="float64")
    program, trainer = make_trainer(engine, spec, data)
    images, labels = engine.put_images(data.test_images), engine.put_labels(data.test_labels)
    whole = trainer.evaluate(images, labels, 300, chunk_size=300)
    chunked = trainer.evaluate(images, labels, 300, chunk_size=128)  # 128 + 128 + 44: three shapes
    assert whole["accuracy"] == chunked["accuracy"]
    assert math.isclose(whole["cross_entropy"], chunked["cross_entropy"], rel_tol=1e-12)
    for layer, (mean, var) in whole["moments"].items():
        np.testing.assert_allclose(chunked["moments"][layer][0], mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(chunked["moments"][layer][1], var, rtol=1e-10)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_float64_step_applies_sgd_to_the_gradients(normalization):
    spec = smoke_spec(normalization, dtype="float64", optimizer={"name": "sgd", "learning_rate": 0.05, "weight_decay": 4e-5})
    data = synthetic_data("float64")
    engine = Engine(dtype="float64")
    _, trainer = make_trainer(engine, spec, data)
    indices = np.arange(32)
    before, _ = trainer.export()
    grads, intermediates = trainer.gradients(engine.put_images(data.train_images[indices]),
                                             engine.put_labels(data.train_labels[indices]))
    losses = trainer.step_and_read(indices, 0.05)
    after, state = trainer.export()
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses.values())
    # The step reports the differentiated loss; the full objective adds the L2 penalty.
    penalty = 0.5 * 4e-5 * sum(float(np.sum(v * v)) for k, v in before.items() if k.endswith("/kernel"))
    assert math.isclose(losses["loss"] + penalty, float(intermediates["total_loss"]), rel_tol=1e-12)
    for name in before:
        assert after[name].dtype == np.float64
        np.testing.assert_allclose(after[name], before[name] - 0.05 * grads[name], rtol=1e-13, atol=1e-15)
    for name, value in state.items():
        np.testing.assert_allclose(value, intermediates[f"state/{name}"], rtol=1e-13, atol=1e-15)


def test_xla_and_graph_mode_agree_in_float64():
    spec = smoke_spec("standardization_loss", dtype="float64")
    data = synthetic_data("float64")
    results = []
    for jit_compile in (False, True):
        engine = Engine(dtype="float64", jit_compile=jit_compile)
        _, trainer = make_trainer(engine, spec, data)
        results.append(trainer.gradients(engine.put_images(data.train_images[:32]), engine.put_labels(data.train_labels[:32]))[0])
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-11, atol=1e-14)


def test_same_seed_gives_identical_losses():
    spec = smoke_spec("standardization_loss", model="cnn-tiny")
    data = synthetic_data("float32")
    runs = []
    for _ in range(2):
        program, trainer = make_trainer(Engine(), spec, data, seed=3)
        runs.append([trainer.step_and_read(np.arange(k * 32, (k + 1) * 32), program.learning_rate(k)) for k in range(5)])
    assert runs[0] == runs[1]


def test_learning_rate_changes_do_not_retrace():
    spec = smoke_spec("batch_norm_shift")
    _, trainer = make_trainer(Engine(), spec, synthetic_data("float32"))
    for k, lr in enumerate([0.1, 0.05, 0.025, 1e-3]):
        trainer.step(np.arange(k * 32, (k + 1) * 32), lr)
    assert [key[0] for key in trainer._traced] == ["step"]


def test_torch_is_imported_before_tensorflow():
    pytest.importorskip("torch")
    code = ("import sys, normbench.backends.tensorflow.engine; m = list(sys.modules); "
            "print(m.index('torch') < m.index('tensorflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def _engine_in_a_fresh_process(prelude: str, environment: dict) -> subprocess.CompletedProcess:
    import os

    code = (f"{prelude}; import warnings; warnings.simplefilter('error'); "
            "from normbench.backends.tensorflow.engine import Engine; print(Engine().device_description())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in {**os.environ, **environment}.items() if v is not None})


@pytest.mark.skipif(not (sys.platform == "linux" and __import__("platform").machine() == "x86_64"),
                    reason="TensorFlow's oneDNN kernels ship in its Linux x86-64 wheels")
def test_onednn_kernels_run_on_every_host_unless_the_user_says_otherwise():
    """TensorFlow's default turns them on only on CPUs with AVX512_VNNI, AVX512_BF16,
    AVX_VNNI or AMX (backends/tensorflow/__init__.py): the package asks for them, keeps a
    user's own setting, the provenance's device says which ran, and a process that loaded
    TensorFlow first is told why it got Eigen's."""
    default = _engine_in_a_fresh_process("import torch", {"TF_ENABLE_ONEDNN_OPTS": None})
    assert default.stdout.strip().endswith("oneDNN kernels)"), default.stderr[-2000:]
    declined = _engine_in_a_fresh_process("import torch", {"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert declined.stdout.strip().endswith("Eigen kernels)"), declined.stderr[-2000:]
    too_late = _engine_in_a_fresh_process("import torch, tensorflow", {"TF_ENABLE_ONEDNN_OPTS": None})
    if _tensorflow_defaults_to_onednn_here():  # TensorFlow turned them on itself: nothing to warn about
        assert too_late.returncode == 0 and too_late.stdout.strip().endswith("oneDNN kernels)"), too_late.stderr[-2000:]
    else:
        assert too_late.returncode != 0 and "import normbench.backends.tensorflow before tensorflow" in too_late.stderr


def _tensorflow_defaults_to_onednn_here() -> bool:
    """TensorFlow's own default on Linux x86-64: oneDNN on CPUs with any of these (the hosts
    CI draws differ: an AVX2-only one and an AMD EPYC with AVX512_VNNI have both run this)."""
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    return any(flag in flags for flag in ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"))


@pytest.mark.parametrize("onednn,images", [(True, 5000), (False, 750)], ids=["oneDNN", "Eigen"])
def test_evaluation_chunks_are_sized_for_the_kernels_that_run(onednn, images):
    """cnn3's chunks (the Trainer's comment has the measurements): Eigen's kernels fell off
    a cache cliff past ~1000 images, oneDNN's gain up to the largest chunk."""
    engine = Engine()
    engine.onednn = onednn
    spec = specs.load("mnist-cnn").replace(seeds=1)
    data = synthetic_data("float32")
    _, trainer = make_trainer(engine, spec, data)
    assert trainer.default_chunk_size() == images


# (input size, kernel size, stride, pads): the one-channel convolution's kernel gradient
# (ops.py, ONE_CHANNEL_KERNEL_GRADIENT_MIN_TAPS) against TensorFlow's own, in float64.
ONE_CHANNEL_CONVOLUTIONS = {
    "SAME 5x5 stride 2 (named)": (10, 5, 2, ((1, 2), (1, 2))),
    "SAME 6x6 stride 1 (named)": (9, 6, 1, ((2, 3), (2, 3))),
    "7x7 stride 2 padded 3 around (explicit)": (10, 7, 2, ((3, 3), (3, 3))),
    "VALID 5x5 stride 3 leaving rows unread": (10, 5, 3, ((0, 0), (0, 0))),
}


@pytest.mark.parametrize("case", list(ONE_CHANNEL_CONVOLUTIONS))
def test_one_channel_convolution_gradients_are_tensorflows(case):
    from normbench.backends.tensorflow import ops as tf_ops

    size, k, stride, pads = ONE_CHANNEL_CONVOLUTIONS[case]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, size, size, 1)))
    kernel = tf.constant(rng.normal(size=(k, k, 1, 4)))
    (top, bottom), (left, right) = pads
    padding = [[0, 0], [top, bottom], [left, right], [0, 0]]

    def gradients(convolve):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            out = convolve()
            loss = tf.reduce_sum(out * tf.constant(rng.normal(size=out.shape)))
        return out, tape.gradient(loss, [x, kernel])

    rng = np.random.default_rng(1)
    ours = gradients(lambda: tf_ops.Ops("cpu").conv2d(x, kernel, stride, pads))
    rng = np.random.default_rng(1)
    own = gradients(lambda: tf.nn.conv2d(x, kernel, strides=stride, padding=padding))
    np.testing.assert_allclose(ours[0].numpy(), own[0].numpy(), rtol=1e-12, atol=1e-12)
    for a, b in zip(ours[1], own[1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


def test_one_channel_convolution_is_taken_against_eigens_cpu_kernels_only():
    from normbench.backends.tensorflow import ops as tf_ops

    x, kernel = tf.zeros((2, 8, 8, 1)), tf.zeros((5, 5, 1, 4))
    graph = lambda ops: tf.function(lambda: ops.conv2d(x, kernel, 2, ((1, 2), (1, 2)))).get_concrete_function().graph
    op_types = lambda ops: {op.type for op in graph(ops).get_operations()}
    assert "IdentityN" in op_types(tf_ops.Ops("cpu", onednn=False))  # tf.custom_gradient's mark
    assert "IdentityN" not in op_types(tf_ops.Ops("cpu", onednn=True))  # oneDNN's own is faster
    assert "IdentityN" not in op_types(tf_ops.Ops("gpu"))


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="needs Linux's CPU affinity")
def test_the_device_names_the_threads_of_the_cores_the_process_may_use():
    """A worker of `--executor processes` is bound to its share of the cores, and
    TensorFlow sizes its intra-op pool by them: the provenance's device says so, not the
    machine's core count."""
    bound = _engine_in_a_fresh_process("import os, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})", {})
    assert bound.stdout.strip().startswith("cpu (1 threads, "), bound.stderr[-2000:]
