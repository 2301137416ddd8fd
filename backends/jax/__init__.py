"""JAX backend: `ops.Ops` (primitives on NHWC jax arrays) and `engine.Engine` (jit-compiled training)."""
