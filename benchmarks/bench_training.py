"""Metrics of real training runs: steps to the speed-up target, final test error, host
RSS growth and device peak memory.

Each backend trains every model x normalization x device once (the bundled mnist-cnn /
mnist-mlp spec: 1000 SGD steps, lr 1e-3, batch 128, seed 0, test-set evaluation every
50 steps, and on a geometric grid that resolves steps to 5%), each run in a fresh worker
process, inside its asv `setup_cache`; the track_ methods only read that cache.

Steps to target is the paper's speed-up reading (Section 4.3): the target is the best test
accuracy of the model's unnormalized baseline within the same budget, shared by every
method, so a method's speed-up is the baseline's value over its own. A method that never
reaches the target is skipped (n/a, with a note), never reported as the budget.

asv keys a setup_cache by its *defining function* (module and line), not by the class
that uses it. So:
- each backend's class defines its own `setup_cache` (distinct lines -> distinct caches;
  a setup_cache inherited from `_TrainingRun` would make all backends share one);
- each backend's device-memory class assigns the *same function* as its training class
  (same key -> asv runs it once and feeds both classes: no second training pass).
The device-memory metric lives in its own class only so that its setup can skip where
the device exposes no counter (CPU) without skipping the other metrics.
"""

from . import _harness as h

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented  # a skip raised inside a benchmark body
except ImportError:  # imported without asv (the tests): the same kind of exception
    SkipNotImplemented = NotImplementedError


class _TrainingRun:
    params = [h.MODELS, h.NORMALIZATIONS, h.DEVICES]
    param_names = ["model", "normalization", "device"]
    backend = ""

    def setup(self, cache, model, normalization, device):
        self.run = h.training_result(cache, model, normalization, device)


class _TrainingMetrics(_TrainingRun):
    def track_steps_to_target(self, cache, model, normalization, device):
        reading = h.steps_to_target(cache, model, normalization, device)
        if reading["steps"] is None:
            print(f"note: {self.backend}/{model}/{normalization}/{device} did not reach the baseline's best test accuracy "
                  f"({reading['target']:.2%}) within {reading['budget']} steps (final {reading['final_accuracy']:.2%})")
            raise SkipNotImplemented("target not reached within the budget")
        return reading["steps"]

    track_steps_to_target.unit = "steps"

    def track_final_test_error(self, cache, model, normalization, device):
        return self.run["final_test_error"]

    track_final_test_error.unit = "fraction"

    def track_host_rss_growth(self, cache, model, normalization, device):
        return self.run["host_rss_growth_bytes"]

    track_host_rss_growth.unit = "bytes"


class _DeviceMemoryMetric(_TrainingRun):
    def setup(self, cache, model, normalization, device):
        super().setup(cache, model, normalization, device)
        if self.run["device_peak_bytes"] is None:
            raise NotImplementedError(f"{self.backend} exposes no peak-memory counter for {device!r}")

    def track_device_peak_memory(self, cache, model, normalization, device):
        return self.run["device_peak_bytes"]

    track_device_peak_memory.unit = "bytes"


class TorchTraining(_TrainingMetrics):
    backend = "torch"

    def setup_cache(self):
        return h.train_all("torch")

    setup_cache.timeout = h.SETUP_CACHE_TIMEOUT_S


class TorchDeviceMemory(_DeviceMemoryMetric):
    backend = "torch"
    setup_cache = TorchTraining.setup_cache  # shared on purpose: see the module docstring


class JaxTraining(_TrainingMetrics):
    backend = "jax"

    def setup_cache(self):
        return h.train_all("jax")

    setup_cache.timeout = h.SETUP_CACHE_TIMEOUT_S


class JaxDeviceMemory(_DeviceMemoryMetric):
    backend = "jax"
    setup_cache = JaxTraining.setup_cache


class TensorflowTraining(_TrainingMetrics):
    backend = "tensorflow"

    def setup_cache(self):
        return h.train_all("tensorflow")

    setup_cache.timeout = h.SETUP_CACHE_TIMEOUT_S


class TensorflowDeviceMemory(_DeviceMemoryMetric):
    backend = "tensorflow"
    setup_cache = TensorflowTraining.setup_cache
