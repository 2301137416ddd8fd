"""The TensorFlow backend. Importing this package sets TensorFlow's environment before
TensorFlow is loaded (its modules and the reference loops import it first; so does the
test suite's conftest), so that every process runs the same kernels:

- TF_ENABLE_ONEDNN_OPTS=1. TensorFlow's Linux x86 wheels turn oneDNN on by default only
  on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (`DefaultOneDnnPolicy` in
  tensorflow/core/util/util.cc); elsewhere its CPU convolutions are Eigen's. So the same
  code ran different kernels, in different rounding, at different speeds on two hosts of
  one machine name: on an AVX2-only host, cnn3's training step took 12.6 ms with Eigen
  and 9.0 with oneDNN, its evaluation of 10,000 images 417 and 266 ms (four alternating
  processes each). A user's own setting is kept; `Engine.device_description`, which run
  provenance records, says which kernels ran.
- TF_CPP_MIN_LOG_LEVEL=2: no INFO or WARNING lines from TensorFlow's C++ runtime."""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
