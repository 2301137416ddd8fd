"""Hand-written PyTorch code of each normalization method, one file per method (see benchmarks/_reference.py)."""
