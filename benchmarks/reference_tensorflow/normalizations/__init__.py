"""One file per normalization method: its training forward in TensorFlow (NHWC / NC)."""
