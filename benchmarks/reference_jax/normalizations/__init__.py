"""Hand-written JAX normalization methods, one file per normbench method (contract: benchmarks/_reference.py)."""
