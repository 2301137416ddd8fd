"""normbench: the standardization loss vs batch norm, benchmarked identically across frameworks."""
__version__ = "0.1.0"
