"""Hand-written PyTorch code of each auxiliary loss, one file per loss (see benchmarks/_reference.py)."""
