"""One file per auxiliary loss: its value in TensorFlow from the slot outputs."""
