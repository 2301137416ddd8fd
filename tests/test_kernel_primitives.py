"""The kernel and linear-algebra primitives of `backends.base.Ops` that weight methods and
the decorrelation loss use, on every backend, against float64 NumPy from their formulas:
per-output-channel kernel moments (in the backend's own kernel layout), `output_channels`,
`matmul` with transposes (batched), `matrix_transpose`, `add_to_diagonal` and
`log_det_gram` with its gradient and its float32 precision where V^T V is singular."""

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


@pytest.mark.parametrize("shift", [0.0, 1e-2])
@pytest.mark.parametrize("batched", [False, True], ids=["rank2", "rank3"])
def test_log_det_gram(engine, rng, shift, batched):
    values = rng.normal(size=((3,) if batched else ()) + (12, 4)) / 12**0.5
    value = engine.to_numpy(engine.ops.log_det_gram(engine.import_tree({"v": values})["v"], shift))
    sign, expected = np.linalg.slogdet(np.swapaxes(values, -1, -2) @ values + shift * np.eye(4))
    assert np.all(sign > 0)
    np.testing.assert_allclose(value, expected, rtol=_rtol(engine) * 10, atol=1e-12)


def _rank_deficient(rng, rows=4000, channels=32, rank=25, norm=10.0):
    """float32 values V (rows, channels) of the given rank with ||V^T V|| ~ `norm`, the shape
    of a convolution making more channels than it has inputs per output (cnn3's conv1 after
    batch norm)."""
    values = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, channels))
    values *= (norm / np.linalg.norm(values.T @ values, 2)) ** 0.5
    return values.astype(np.float32)


def test_log_det_gram_float32_where_the_gram_matrix_is_singular(engine32, rng):
    """log det(V^T V + 1e-5 I) with 7 of 32 directions of V^T V exactly null: float32 must
    resolve them at the shift's scale. Measured on such matrices: every backend within 4.1e-6
    of float64; a float32 Cholesky of the float32 product V^T V (what this primitive
    replaced) 3.2e-3 to 5.8e-2 off, because that product's rounding (~6e-7) is not small
    beside the shift."""
    shift = 1e-5
    for _ in range(3):
        values = _rank_deficient(rng)
        exact = values.astype(np.float64)
        sign, expected = np.linalg.slogdet(exact.T @ exact + shift * np.eye(32))
        assert sign > 0
        value = float(engine32.to_numpy(engine32.ops.log_det_gram(engine32.import_tree({"v": values})["v"], shift)))
        assert abs(value - expected) <= 5e-4, (value, expected)


@pytest.mark.parametrize("rows,dead", [(12, False), (2000, True)], ids=["small", "tall-dead-channel"])
def test_log_det_gram_gradient(engine64, rng, rows, dead, backend_gradient):
    """d log det(V^T V + s I) / dV = 2 V (V^T V + s I)^-1; also for a tall V (which a backend
    may factor in blocks) with a zero column, a dead channel's centred values."""
    values, shift = rng.normal(size=(rows, 4)), 1e-3
    if dead:
        values[:, 2] = 0.0
    grad = backend_gradient(engine64, lambda v: engine64.ops.log_det_gram(v, shift), values)
    np.testing.assert_allclose(grad, 2 * values @ np.linalg.inv(values.T @ values + shift * np.eye(4)), rtol=1e-9, atol=1e-12)


def test_kernel_moments_gradient(engine64, rng, backend_gradient):
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

    grad = backend_gradient(engine64, f, array)
    expected = np.zeros_like(array)
    h = 1e-6
    for index in np.ndindex(array.shape):
        step = np.zeros_like(array)
        step[index] = h
        expected[index] = (reference(array + step) - reference(array - step)) / (2 * h)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)
