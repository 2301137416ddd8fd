"""Shared test fixtures: one engine per available backend and dtype, small specs and
programs, and independent NumPy references of the model primitives.

Backends are parametrized over `normbench.backends.names()` with ids; a backend whose
adapter or framework is not installed is *skipped with its reason* (shown by `-ra`),
never dropped from the list, so a backend that lands later is covered automatically.
"""

from __future__ import annotations

import importlib.util
import os
import types

# pytest runs the suite in worker processes (pytest-xdist, `-n auto --dist loadfile` in
# pyproject.toml). Each worker's frameworks get an equal share of the cores, fixed
# before any of them is imported; left at their defaults, every worker would start a
# thread per core. Measured with one thread per worker on the 2-core machine: 13.1 min
# against 21.6 in one process. Whole files stay on one worker, so module-level caches
# still hold.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import numpy as np
import pytest

# TensorFlow imported before torch in one process can crash (duplicate protobuf / OpenMP
# runtimes); importing torch first is the known-good order. Only needed when both exist.
if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("tensorflow") is not None:
    import torch  # noqa: F401

# TensorFlow's environment as the engine sets it (backends/tensorflow/__init__.py: oneDNN's
# kernels), before any test module imports TensorFlow; the package imports no framework.
import normbench.backends.tensorflow  # noqa: E402,F401
from normbench import backends, spec as spec_module
from normbench.plan import Plan, resolve

DTYPES = ("float64", "float32")

# Measured peaks (ru_maxrss) of the two workers of `pytest -q` on the 2-core, 24 GiB
# machine: 10.1 GB for the one running tests/test_benchmarks.py (the asv caches), 7.4 GB
# for the other (every framework, the data sets, the point clouds). Workers that need
# more memory than the machine has would be killed, so `-n auto` counts 10 GiB each.
_GIB_PER_WORKER = 10


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, as many as the memory holds at _GIB_PER_WORKER each
    (PYTEST_XDIST_AUTO_NUM_WORKERS overrides)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(len(os.sched_getaffinity(0)), int(memory_gib // _GIB_PER_WORKER)))


def _backend_param(name: str):
    if backends.is_available(name):
        return pytest.param(name, id=name)
    why = "framework not installed" if backends.is_implemented(name) else "adapter not implemented yet"
    return pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"backend {name!r} unavailable: {why}"))


BACKEND_PARAMS = [_backend_param(name) for name in backends.names()]

_ENGINES: dict[tuple[str, str], object] = {}


def get_engine(name: str, dtype: str):
    """One engine per (backend, dtype) for the whole session (creating some is slow)."""
    key = (name, dtype)
    if key not in _ENGINES:
        _ENGINES[key] = backends.get_engine(name, device="cpu", dtype=dtype)
    return _ENGINES[key]


def _backend_gradient(engine, f, array, activation: bool = False):
    """d f(x) / dx by the backend's own autodiff, for a scalar f of one canonical array, in
    the canonical layout: a tree value (a kernel, if rank 4) or, with `activation`, an
    NHWC activation placed as the backend places images."""
    def put(value):
        return engine.put_images(value) if activation else engine.import_tree({"x": value})["x"]

    def take(value):
        return engine.activation_to_numpy(value) if activation else engine.export_tree({"x": value})["x"]

    if engine.name == "torch":
        import torch

        x = put(array).requires_grad_()
        return take(torch.autograd.grad(f(x), x)[0])
    if engine.name == "jax":
        import jax

        return take(jax.grad(f)(put(array)))
    if engine.name == "tensorflow":
        import tensorflow as tf

        x = put(array)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        return take(tape.gradient(y, x))
    pytest.skip(f"no gradient helper for backend {engine.name!r}")


@pytest.fixture
def backend_gradient():
    """`_backend_gradient`: d f(x) / dx through an engine's own autodiff."""
    return _backend_gradient


@pytest.fixture(params=BACKEND_PARAMS)
def backend_name(request) -> str:
    """Every registered backend name; unavailable ones are skipped with the reason."""
    return request.param


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def module_backend_name(request) -> str:
    """`backend_name` for module-scoped fixtures (e.g. one end-to-end run shared by several tests)."""
    return request.param


@pytest.fixture(params=DTYPES)
def engine(backend_name, request):
    """An engine for each available backend, in float64 and in float32."""
    return get_engine(backend_name, request.param)


@pytest.fixture
def engine64(backend_name):
    """An engine for each available backend in float64 (for tight numerical checks)."""
    return get_engine(backend_name, "float64")


@pytest.fixture
def engine32(backend_name):
    """An engine for each available backend in float32 (for checks of float32 precision)."""
    return get_engine(backend_name, "float32")


# ----------------------------------------------------------------------------- specs


def _toml_value(value) -> str:
    if isinstance(value, dict):  # an inline table: a plugin with its options
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def spec_text(*, name="test", model="mlp-tiny", dataset="mnist", dtype="float64", batch_size=8, steps=3, eval_every=1, seeds=1,
              train_eval_examples=64, optimizer=None, schedule=None, batch_norm=None, standardization_loss=None,
              variants=None, **top) -> str:
    """TOML text of a small, valid spec; tables are given as dicts, variants as a list of dicts."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in dict(
        name=name, model=model, dataset=dataset, dtype=dtype, batch_size=batch_size, steps=steps,
        eval_every=eval_every, seeds=seeds, train_eval_examples=train_eval_examples, **top).items()]
    tables = {"optimizer": optimizer or {"name": "sgd", "learning_rate": 0.1}, "schedule": schedule,
              "batch_norm": batch_norm, "standardization_loss": standardization_loss}
    for table, fields in tables.items():
        if fields:
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in fields.items())
    for variant in variants or [{"name": "none", "normalization": "none"}]:
        lines.append("[[variant]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in variant.items())
    return "\n".join(lines) + "\n"


def make_spec(**fields):
    """A validated ExperimentSpec built with `normbench.spec.loads` from `spec_text(**fields)`."""
    return spec_module.loads(spec_text(**fields), source="<test>")


def variant_for(normalization: str, weight: float = 1.0) -> dict:
    out = {"name": normalization, "normalization": normalization}
    if normalization == "standardization_loss":
        out["standardization_loss_weight"] = weight
    return out


def make_program(normalization: str = "none", *, weight: float = 1.0, **fields) -> Plan:
    """The plan of one variant of a small spec (see `spec_text` for the fields)."""
    spec = make_spec(variants=[variant_for(normalization, weight)], **fields)
    return resolve(spec, spec.variants[0])


def legacy_plan(normalization: str = "none", *, arch=None, batch_norm=None, weight: float = 1.0, **fields) -> Plan:
    """The plan of a one-variant spec whose method is written the old way ("batch_norm_shift",
    ...), optionally on an architecture of the test's own (`arch`, not registered)."""
    spec = make_spec(variants=[variant_for(normalization, weight)], batch_norm=batch_norm, **fields)
    return Plan(spec, spec.variants[0], arch=arch)


def init_params(arch, normalization: str, seed: int = 0):
    """Initial (params, state) of `arch` (an Architecture or a registered name) under a legacy method string."""
    from normbench import architectures

    arch = architectures.get(arch) if isinstance(arch, str) else arch
    return legacy_plan(normalization, arch=arch).initial_parameters(seed)


def forward(engine, arch, params, state, images, *, normalization: str, batch_norm=None, training: bool = True):
    """One forward pass of `arch` on a backend from canonical NumPy inputs: the plan's
    ForwardOutput plus `moments` (per-channel mean and biased variance of each pre-activation)."""
    e = engine
    plan = legacy_plan(normalization, arch=arch, batch_norm=batch_norm)
    out = plan.forward(e.ops, e.import_tree(params), e.import_tree(state), e.put_images(images), training=training)
    out.moments = {name: e.ops.channel_moments(z) for name, z in out.preactivations.items()}
    return out


@pytest.fixture(scope="session")
def nets():
    """Helpers for tests of networks: `init_params`, `forward`, `plan` (see their docstrings)."""
    return types.SimpleNamespace(init_params=init_params, forward=forward, plan=legacy_plan)


@pytest.fixture
def spec_factory():
    return make_spec


@pytest.fixture
def program_factory():
    return make_program


# ----------------------------------------------------------------------------- NumPy references
# Written independently of normbench.models: canonical layouts (NHWC, HWIO, (in, out)).


def np_conv2d(x, kernel, stride, pads):
    """Cross-correlation of NHWC `x` with an HWIO kernel, explicit ((top, bottom), (left, right)) zero pads."""
    (top, bottom), (left, right) = pads
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, _, cout = kernel.shape
    oh = (xp.shape[1] - kh) // stride + 1
    ow = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, cout), dtype=np.result_type(x, kernel))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
            out += patch @ kernel[i, j]
    return out


def np_conv2d_kernel_grad(x, upstream, kernel_shape, stride, pads):
    """d(sum(upstream * conv(x, K))) / dK for the convolution above."""
    (top, bottom), (left, right) = pads
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = kernel_shape[:2]
    oh, ow = upstream.shape[1:3]
    grad = np.zeros(kernel_shape)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
            grad[i, j] = np.einsum("nhwi,nhwo->io", patch, upstream)
    return grad


def np_conv2d_input_grad(upstream, kernel, input_shape, stride, pads):
    """d(sum(upstream * conv(x, K))) / dx for the convolution above (a transposed convolution)."""
    (top, bottom), (left, right) = pads
    n, h, w, _ = input_shape
    grad = np.zeros((n, h + top + bottom, w + left + right, kernel.shape[2]))
    kh, kw = kernel.shape[:2]
    oh, ow = upstream.shape[1:3]
    for i in range(kh):
        for j in range(kw):
            grad[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :] += upstream @ kernel[i, j].T
    return grad[:, top:top + h, left:left + w, :]


def np_moments(z):
    """Per-channel mean and biased variance over every axis but the last (two-pass)."""
    axes = tuple(range(z.ndim - 1))
    mean = z.mean(axis=axes)
    return mean, ((z - mean) ** 2).mean(axis=axes)


def np_std_loss(activations, eps):
    """Equation (2), summed over channels and layers: 0.5 * sum(mu^2 + var - log(var + eps) - 1)."""
    total = 0.0
    for z in activations:
        mean, var = np_moments(z)
        total += 0.5 * np.sum(mean**2 + var - np.log(var + eps) - 1.0)
    return float(total)


def np_std_loss_grad(z, eps):
    """d(eq. 2)/dz for one layer: (mu + (1 - 1/(var + eps)) (z - mu)) / n, per channel."""
    mean, var = np_moments(z)
    n = z.size // z.shape[-1]
    return (mean + (1.0 - 1.0 / (var + eps)) * (z - mean)) / n


def np_softmax_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def np_forward(arch, params, state, images, *, normalization, bn_epsilon=1e-3, training=True):
    """Reference forward pass of a straight-chain `Architecture` (cnn*, mlp*): (logits,
    {layer: pre-activation}, {layer: pre-BN z}). Layer geometry comes from `arch.layers()`."""
    x, preacts, raw = images, {}, {}
    layers = arch.layers()
    for layer in layers[:-1]:
        name = layer.name
        kernel = params[f"{name}/kernel"]
        if layer.kind == "conv":
            z = np_conv2d(x, kernel, layer.stride, layer.pads)
        else:
            z = x.reshape(x.shape[0], -1) @ kernel
        raw[name] = z
        if normalization.startswith("batch_norm"):
            if training:
                mean, var = np_moments(z)
            else:
                mean, var = state[f"{name}/running_mean"], state[f"{name}/running_var"]
            z = (z - mean) / np.sqrt(var + bn_epsilon)
            if f"{name}/scale" in params:
                z = z * params[f"{name}/scale"]
            z = z + params[f"{name}/shift"]
        else:
            z = z + params[f"{name}/bias"]
        preacts[name] = z
        x = np.maximum(z, 0.0)
    head = layers[-1].name
    logits = x.reshape(x.shape[0], -1) @ params[f"{head}/kernel"] + params[f"{head}/bias"]
    return logits, preacts, raw


def np_objective(program, params, images, labels):
    """Reference total training loss of a program: CE + L2 weight decay + weight * eq. (2)."""
    spec = program.spec
    method = program.method
    normalization = "batch_norm" if method.name == "batch_norm" else method.name
    logits, preacts, _ = np_forward(program.arch, params, {}, images, normalization=normalization,
                                    bn_epsilon=getattr(method, "epsilon", 1e-3), training=True)
    total = np_softmax_cross_entropy(logits, labels)
    total += 0.5 * spec.optimizer.weight_decay * sum(np.sum(v * v) for k, v in params.items() if k.endswith("/kernel"))
    if program.std_loss_weight > 0:
        total += program.std_loss_weight * np_std_loss(preacts.values(), program.std_metric.log_epsilon)
    return total


def np_chain_objective(plan, params, images, labels, normalize):
    """Cross entropy of `plan`'s straight-chain network (cnn*, mlp*) with
    `normalize(z, params, layer)` in every normalization slot, then ReLU."""
    x = images
    for layer in plan.layers:
        kernel = params[f"{layer.name}/kernel"]
        z = np_conv2d(x, kernel, layer.stride, layer.pads) if layer.kind == "conv" else x.reshape(len(x), -1) @ kernel
        if f"{layer.name}/bias" in params:
            z = z + params[f"{layer.name}/bias"]
        if not layer.normalized:
            break
        x = np.maximum(normalize(z, params, layer.name), 0.0)
    return np_softmax_cross_entropy(z, labels)


def check_gradients(grads, objective, params, rng, *, coordinates=6, h=1e-6, rtol=1e-6, atol=1e-8, order=2):
    """Backend gradients against central differences of a float64 NumPy `objective(params)`
    at a few random coordinates of every parameter. `order=4` uses the fourth-order
    stencil, for objectives whose curvature makes the second-order truncation error
    (h^2 times the third derivative) visible."""
    assert set(grads) == set(params)
    for name, value in params.items():
        flat = value.reshape(-1)
        for index in rng.choice(flat.size, size=min(coordinates, flat.size), replace=False):
            def at(step):
                moved = flat.copy()
                moved[index] += step
                return objective({**params, name: moved.reshape(value.shape)})
            if order == 4:
                expected = (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)
            else:
                expected = (at(h) - at(-h)) / (2 * h)
            actual = grads[name].reshape(-1)[index]
            # Central differences of an O(1) objective with h = 1e-6 carry ~1e-9 of rounding.
            assert abs(actual - expected) <= rtol * abs(expected) + atol, (name, index, actual, expected)


def perturb_scales_and_shifts(params, rng):
    """Non-trivial method scales and shifts (in place), so that a dropped one shows."""
    for key in params:
        if key.endswith("/scale"):
            params[key] = rng.uniform(0.5, 2.0, size=params[key].shape)
        elif key.endswith("/shift"):
            params[key] = rng.normal(size=params[key].shape) * 0.3


def put_activation(e, z):
    """A canonical activation onto a backend: images travel NHWC -> backend layout; (N, C) as is."""
    return e.put_images(z) if z.ndim == 4 else e.import_tree({"z": z})["z"]


REFERENCE = types.SimpleNamespace(
    conv2d=np_conv2d, conv2d_kernel_grad=np_conv2d_kernel_grad, conv2d_input_grad=np_conv2d_input_grad, moments=np_moments, std_loss=np_std_loss,
    std_loss_grad=np_std_loss_grad, softmax_cross_entropy=np_softmax_cross_entropy, forward=np_forward,
    objective=np_objective, chain_objective=np_chain_objective, check_gradients=check_gradients,
    put_activation=put_activation, perturb_scales_and_shifts=perturb_scales_and_shifts,
)


@pytest.fixture(scope="session")
def ref():
    """Independent NumPy references (conv, moments, eq. 2 and its gradient, forward, objective)."""
    return REFERENCE


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id, so every test has its own fixed data."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def tolerance():
    """(rtol, atol) per dtype for comparing a backend against a float64 NumPy reference."""
    return {"float64": (1e-10, 1e-12), "float32": (2e-5, 2e-6)}
