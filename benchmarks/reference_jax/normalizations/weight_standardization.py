"""Weight standardization: each output channel's kernel standardized (biased variance,
epsilon inside the square root); the slot is `method.then`'s, by its own hand-written file."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ... import _reference

_PACKAGE = __name__.rsplit(".", 2)[0]  # benchmarks.reference_jax


def kernel(kernel, params, method):
    axes = tuple(range(kernel.ndim - 1))  # HWIO or (in, out): every axis but the output channel
    mean = jnp.mean(kernel, axes, keepdims=True)
    var = jnp.var(kernel, axes, keepdims=True)
    standardized = (kernel - mean) * lax.rsqrt(var + method.epsilon)
    then_kernel = getattr(_then(method), "kernel", None)
    return standardized if then_kernel is None else then_kernel(standardized, params, method.then)


def normalize(z, params, state, method):
    return _then(method).normalize(z, params, state, method.then)


def _then(method):
    return _reference.plugin_module(_PACKAGE, "normalizations", method.then.name)
