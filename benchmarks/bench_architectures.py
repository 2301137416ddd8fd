"""The paper's architectures at their small configurations (each bundled smoke spec's
model and variants, at its batch size): steady-state seconds per training step per
backend; and the host memory one ResNet-50 training step takes at batch 8 on the CPU.

Step time is timed as in bench_step_time (`Stepper.step()`: one update on real data, then
`synchronize()`, inside the timer). Their ratio to the hand-written loop in each framework
is bench_ratios.ArchitectureReferenceRatio.
"""

from . import _harness as h


class ArchitectureStep:
    """Steady-state seconds per step of a small paper architecture, after WARMUP_STEPS
    untimed steps. One step per sample; asv reports the median."""

    params = [h.BACKENDS, h.ARCHITECTURES, h.ARCHITECTURE_VARIANTS, ["cpu"]]
    param_names = ["backend", "architecture", "variant", "device"]
    warmup_time = 0
    repeat = (5, 20, 20.0)
    rounds = 1
    timeout = 600

    def setup(self, backend, architecture, variant, device):
        self.stepper = h.warm_architecture_stepper(backend, architecture, variant, device)

    def time_step(self, backend, architecture, variant, device):
        self.stepper.step()


class ResNet50PeakMemory:
    """Host RSS growth during one ResNet-50 training step at batch 8 (224 x 224 x 3,
    synthetic images, batch norm, SGD), measured after a first step: the step's working set."""

    params = [h.BACKENDS, ["cpu"]]
    param_names = ["backend", "device"]
    number, repeat, warmup_time = 1, 1, 0
    timeout = 1200

    def setup(self, backend, device):
        h.engine(backend, device)  # NotImplementedError (a skip) where the backend is absent

    def track_peak_step_memory(self, backend, device):
        return h.peak_memory_of_one_step(backend, device)

    track_peak_step_memory.unit = "bytes"
