"""Wall-clock time per training step: steady state, and a fresh trainer's first step.

Both time `Stepper.step()`: one update on a batch of 128 real MNIST images followed by
the engine's `synchronize()`, inside the timer.
"""

from . import _harness as h

GRID = [h.BACKENDS, h.MODELS, h.NORMALIZATIONS, h.DEVICES]
GRID_NAMES = ["backend", "model", "normalization", "device"]


class TimeStep:
    """Steady-state seconds per step, after WARMUP_STEPS untimed steps (compilation,
    allocator and kernel selection done). One step per sample; asv reports the median."""

    params, param_names = GRID, GRID_NAMES
    warmup_time = 0  # the explicit warm-up in setup replaces asv's time-based one
    repeat = (10, 50, 20.0)  # per round: at least 10 samples, at most 50 or 20 s
    rounds = 2  # each round is a fresh process

    def setup(self, backend, model, normalization, device):
        # asv re-runs setup before every sample: this fetches the process's warm trainer.
        self.stepper = h.warm_stepper(backend, model, normalization, device)

    def time_step(self, backend, model, normalization, device):
        self.stepper.step()


class TimeFirstStep:
    """Seconds for the first step of a fresh trainer in a fresh process: tracing and
    compilation (jax.jit, tf.function) or eager kernel initialization (torch). Engine
    creation and data placement happen in setup, outside the timer."""

    params, param_names = GRID, GRID_NAMES
    number, repeat, warmup_time = 1, 1, 0  # exactly one timed call per process ...
    rounds = 3  # ... and three processes

    def setup(self, backend, model, normalization, device):
        self.stepper = h.Stepper(backend, h.training_plan(model, normalization), device)

    def time_first_step(self, backend, model, normalization, device):
        self.stepper.step()


class TimeFirstCompiledStep:
    """`TimeFirstStep` of PyTorch with `--compile`: torch.compile's tracing and code
    generation (a C++ compiler on CPU), in a fresh process, so nothing is cached in memory
    (torch's on-disk caches may be warm from earlier processes, as they are for a user)."""

    params, param_names = [["torch"], h.MODELS, h.NORMALIZATIONS, h.DEVICES], GRID_NAMES
    number, repeat, warmup_time = 1, 1, 0
    rounds = 3
    timeout = 600

    def setup(self, backend, model, normalization, device):
        self.stepper = h.Stepper(backend, h.training_plan(model, normalization), device, compile=True)

    def time_first_step(self, backend, model, normalization, device):
        self.stepper.step()
