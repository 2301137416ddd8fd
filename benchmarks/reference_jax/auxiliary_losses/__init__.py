"""Hand-written JAX auxiliary losses, one file per normbench loss (contract: benchmarks/_reference.py)."""
