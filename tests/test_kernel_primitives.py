"""The kernel and linear-algebra primitives of `backends.base.Ops` that weight methods and
the decorrelation loss use, on every backend, against float64 NumPy from their formulas:
per-output-channel kernel moments (in the backend's own kernel layout), `output_channels`,
`matmul` with transposes (batched), `matrix_transpose`, `add_to_diagonal` and
`log_det_spd` with its gradient."""

from __future__ import annotations

import numpy as np
import pytest

KERNELS = {"conv": (3, 3, 2, 5), "dense": (7, 4)}  # canonical HWIO and (in, out)


def _rtol(engine):
    return 1e-12 if engine.dtype == "float64" else 2e-5


def _kernel(engine, array):
    """A canonical kernel in the backend's layout (PyTorch: OIHW)."""
    return engine.import_tree({"k": array})["k"]


def _as_kernel(engine, value):
    """A kept-dims per-channel result or a full kernel -> canonical NumPy of the kernel's shape."""
    return engine.export_tree({"k": value})["k"]


@pytest.mark.parametrize("kind", list(KERNELS))
def test_kernel_moments(engine, rng, kind):
    array = rng.normal(size=KERNELS[kind]) * 0.3 + 0.1
    ops, kernel = engine.ops, _kernel(engine, array)
    mean, var = ops.kernel_moments(kernel)
    axes = tuple(range(array.ndim - 1))
    expected_mean = array.mean(axis=axes, keepdims=True)
    expected_var = ((array - expected_mean) ** 2).mean(axis=axes, keepdims=True)
    # Kept dimensions broadcast against the kernel in its own layout: adding zeros gives
    # kernel-shaped arrays that export to the canonical layout.
    zeros = kernel * 0.0
    np.testing.assert_allclose(_as_kernel(engine, zeros + mean), np.broadcast_to(expected_mean, array.shape), rtol=_rtol(engine), atol=1e-7)
    np.testing.assert_allclose(_as_kernel(engine, zeros + var), np.broadcast_to(expected_var, array.shape), rtol=_rtol(engine))
    np.testing.assert_allclose(_as_kernel(engine, zeros + ops.kernel_mean(kernel * kernel)),
                               np.broadcast_to((array**2).mean(axis=axes, keepdims=True), array.shape), rtol=_rtol(engine))
    assert ops.kernel_count(kernel) == int(np.prod(array.shape[:-1]))


@pytest.mark.parametrize("kind", list(KERNELS))
def test_output_channels_broadcast_per_output_channel(engine, rng, kind):
    array = rng.normal(size=KERNELS[kind])
    vector = rng.uniform(0.5, 2.0, size=array.shape[-1])
    ops, kernel = engine.ops, _kernel(engine, array)
    scaled = kernel * ops.output_channels(engine.import_tree({"v": vector})["v"], kernel)
    np.testing.assert_allclose(_as_kernel(engine, scaled), array * vector, rtol=_rtol(engine))


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("batched", [False, True], ids=["rank2", "rank3"])
def test_matmul(engine, rng, transpose_a, transpose_b, batched):
    lead = (3,) if batched else ()
    a = rng.normal(size=(*lead, *((4, 5) if transpose_a else (5, 4))))
    b = rng.normal(size=(*lead, *((6, 4) if transpose_b else (4, 6))))
    t = lambda x, flag: np.swapaxes(x, -1, -2) if flag else x
    arrays = engine.import_tree({"a": a, "b": b})
    out = engine.to_numpy(engine.ops.matmul(arrays["a"], arrays["b"], transpose_a=transpose_a, transpose_b=transpose_b))
    np.testing.assert_allclose(out, t(a, transpose_a) @ t(b, transpose_b), rtol=_rtol(engine), atol=1e-12 if engine.dtype == "float64" else 1e-5)


@pytest.mark.parametrize("batched", [False, True], ids=["rank2", "rank3"])
def test_matrix_transpose_and_add_to_diagonal(engine, rng, batched):
    matrix = rng.normal(size=((3,) if batched else ()) + (4, 4)).astype(engine.dtype)  # held exactly
    m = engine.import_tree({"m": matrix})["m"]
    np.testing.assert_array_equal(engine.to_numpy(engine.ops.matrix_transpose(m)), np.swapaxes(matrix, -1, -2))
    np.testing.assert_allclose(engine.to_numpy(engine.ops.add_to_diagonal(m, -1.5)), matrix - 1.5 * np.eye(4),
                               rtol=_rtol(engine), atol=1e-12)


def _spd(rng, lead=()):
    x = rng.normal(size=(*lead, 12, 4))
    return np.swapaxes(x, -1, -2) @ x / 12 + 0.05 * np.eye(4)


@pytest.mark.parametrize("shift", [0.0, 1e-2])
@pytest.mark.parametrize("batched", [False, True], ids=["rank2", "rank3"])
def test_log_det_spd(engine, rng, shift, batched):
    matrix = _spd(rng, (3,) if batched else ())
    value = engine.to_numpy(engine.ops.log_det_spd(engine.import_tree({"m": matrix})["m"], shift))
    sign, expected = np.linalg.slogdet(matrix + shift * np.eye(4))
    assert np.all(sign > 0)
    np.testing.assert_allclose(value, expected, rtol=_rtol(engine) * 10, atol=1e-12)


def _gradient(engine, f, array):
    """d f(x) / dx by the backend's own autodiff, for a scalar f of one array, in the
    array's canonical layout."""
    if engine.name == "torch":
        import torch

        x = engine.import_tree({"x": array})["x"].requires_grad_()
        return engine.export_tree({"x": torch.autograd.grad(f(x), x)[0]})["x"]
    if engine.name == "jax":
        import jax

        return np.asarray(jax.grad(f)(engine.import_tree({"x": array})["x"]))
    if engine.name == "tensorflow":
        import tensorflow as tf

        x = engine.import_tree({"x": array})["x"]
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        return tape.gradient(y, x).numpy()
    pytest.skip(f"no gradient helper for backend {engine.name!r}")


def test_log_det_spd_gradient(engine64, rng):
    """d log det(A + s I) / dA = (A + s I)^-1 for a symmetric A (Cholesky's gradient reads
    one triangle, so compare the symmetrized gradient: the directional derivative along
    any symmetric perturbation is what the loss uses)."""
    matrix, shift = _spd(rng), 1e-3
    grad = _gradient(engine64, lambda m: engine64.ops.log_det_spd(m, shift), matrix)
    symmetric = 0.5 * (grad + grad.T)
    np.testing.assert_allclose(symmetric, np.linalg.inv(matrix + shift * np.eye(4)), rtol=1e-9, atol=1e-12)


def test_kernel_moments_gradient(engine64, rng):
    """The standardized kernel's gradient, against central differences of the NumPy formula."""
    array = rng.normal(size=KERNELS["conv"]) * 0.3
    upstream = rng.normal(size=array.shape)
    axes = tuple(range(array.ndim - 1))

    def reference(k):
        mean = k.mean(axis=axes, keepdims=True)
        var = ((k - mean) ** 2).mean(axis=axes, keepdims=True)
        return float(np.sum(upstream * (k - mean) / np.sqrt(var + 1e-5)))

    ops = engine64.ops
    up = _kernel(engine64, upstream)

    def f(k):
        mean, var = ops.kernel_moments(k)
        return ops.sum(up * (k - mean) * ops.rsqrt(var + 1e-5))

    grad = _gradient(engine64, f, array)
    expected = np.zeros_like(array)
    h = 1e-6
    for index in np.ndindex(array.shape):
        step = np.zeros_like(array)
        step[index] = h
        expected[index] = (reference(array + step) - reference(array - step)) / (2 * h)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)
