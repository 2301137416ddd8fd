"""Step-time ratios measured side by side (alternating, medians): a method's overhead over
no normalization, and each backend against the hand-written loop in its own framework
(benchmarks/reference_<framework>/). Lower is better for both.

Three grids: the paper's cells (model x the bundled specs' variants, the history since the
first nightly), every normalization method and auxiliary loss (the variants of
`_harness.METHODS_SPEC`, both networks), and the paper's architectures at their small
configurations against the hand-written loops (`ArchitectureReferenceRatio`).

Each ratio is measured in one process; the paper's cells record the median over
`processes` fresh processes (`_harness.RATIO_WORKER_TIMEOUT_S` says why)."""

from . import _harness as h


def _ratio(label: str, ours, theirs, what: str) -> tuple[float, float, float]:
    mine, other = h.side_by_side_medians([ours.step, theirs.step], *h.ratio_rounds())
    print(f"{label}: {mine * 1e3:.2f} ms, {what} {other * 1e3:.2f} ms per step")
    return mine / other, mine, other


class _SideBySide:
    """A ratio of two steppers' median step times: `prepare(*params)` builds them,
    `measure(*params)` times them side by side in this process -> (ratio, both medians).
    With `processes` > 1 (outside quick runs) the recorded ratio is the median over that
    many fresh worker processes, each preparing and measuring its own, and `setup` only
    checks that the case can run here."""

    processes = 1

    def setup(self, *params):
        if h.ratio_processes(self.processes):
            self.check(*params)
        else:
            self.prepare(*params)

    def check(self, *params):
        """asv's skip (NotImplementedError) where `prepare` could not run here: by default
        the backend's engine on the device (every class's first and last parameters)."""
        h.engine(params[0], params[-1])

    def ratio(self, *params) -> float:
        processes = h.ratio_processes(self.processes)
        if not processes:
            return self.measure(*params)[0]
        median, measured = h.median_ratio_in_fresh_processes(type(self), params, processes)
        print(f"{type(self).__name__}{params}: median {median:.3f} of " + ", ".join(
            f"{m['ratio']:.3f} ({m['mine_s'] * 1e3:.2f} / {m['other_s'] * 1e3:.2f} ms)" for m in measured)
            + " in fresh processes")
        return median


class NormalizationOverhead(_SideBySide):
    """Median step time of a normalization variant / median step time of the same model
    without normalization (same backend, device and batches)."""

    params = [h.BACKENDS, h.MODELS, [n for n in h.NORMALIZATIONS if n != "none"], h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 900  # three fresh processes
    processes = 3

    def prepare(self, backend, model, normalization, device):
        self.baseline = h.warm_stepper(backend, model, "none", device)
        self.variant = h.warm_stepper(backend, model, normalization, device)

    def measure(self, backend, model, normalization, device):
        return _ratio(f"{backend}/{model}/{device}: {normalization}", self.variant, self.baseline, "none")

    def track_overhead_vs_none(self, backend, model, normalization, device):
        return self.ratio(backend, model, normalization, device)


class CompiledOverhead(_SideBySide):
    """`NormalizationOverhead` with the step compiled (`--compile`: torch.compile of the
    loss, forward and backward), both sides compiled. PyTorch only: JAX and TensorFlow
    always compile. The compiled first step is timed by bench_step_time.TimeFirstCompiledStep."""

    params = [["torch"], h.MODELS, [n for n in h.NORMALIZATIONS if n != "none"], h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 1200  # three fresh processes, each compiling both steps
    processes = 3

    def check(self, backend, model, normalization, device):
        h.engine(backend, device, compile=True)

    def prepare(self, backend, model, normalization, device):
        self.baseline = h.warm_stepper(backend, model, "none", device, compile=True)
        self.variant = h.warm_stepper(backend, model, normalization, device, compile=True)

    def measure(self, backend, model, normalization, device):
        return _ratio(f"{backend} compiled/{model}/{device}: {normalization}", self.variant, self.baseline, "none")

    def track_overhead_vs_none(self, backend, model, normalization, device):
        return self.ratio(backend, model, normalization, device)


class ReferenceRatio(_SideBySide):
    """Median backend step time / median step time of the hand-written loop in the same
    framework (same model, normalization, batches, initial weights and device)."""

    params = [h.BACKENDS, h.MODELS, h.NORMALIZATIONS, h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 900  # three fresh processes
    processes = 3

    def prepare(self, backend, model, normalization, device):
        self.stepper = h.warm_stepper(backend, model, normalization, device)
        self.reference = h.ReferenceStepper(backend, self.stepper.program, device)

    def measure(self, backend, model, normalization, device):
        return _ratio(f"{backend}/{model}/{normalization}/{device}: backend", self.stepper, self.reference, "reference")

    def track_ratio_to_reference(self, backend, model, normalization, device):
        return self.ratio(backend, model, normalization, device)


class AlignmentCost(_SideBySide):
    """PyTorch only: median step time of the hand-written loop padded as TensorFlow's SAME
    rule does (what normbench computes: F.pad for the odd pixel of an asymmetric pad) over
    the same loop padded as PyTorch users do (symmetric `padding`, the ReferenceRatio
    yardstick). What exact alignment costs a PyTorch user who writes it by hand."""

    params = [["torch"], h.MODELS, h.NORMALIZATIONS, h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 300

    def prepare(self, backend, model, normalization, device):
        plan = h.warm_stepper(backend, model, normalization, device).program
        self.aligned = h.ReferenceStepper(backend, plan, device, same_alignment=True)
        self.idiom = h.ReferenceStepper(backend, plan, device)

    def measure(self, backend, model, normalization, device):
        return _ratio(f"{backend}/{model}/{normalization}/{device}: SAME-aligned loop", self.aligned, self.idiom,
                      "symmetric-padding loop")

    def track_alignment_cost(self, backend, model, normalization, device):
        return self.ratio(backend, model, normalization, device)


class MethodOverhead(_SideBySide):
    """`NormalizationOverhead` for every variant of the methods grid: its median step time
    over that of the variant without normalization on the same network."""

    params = [h.BACKENDS, h.METHOD_VARIANTS, h.DEVICES]
    param_names = ["backend", "variant", "device"]
    unit = "ratio"
    timeout = 300

    def prepare(self, backend, variant, device):
        baseline = h.method_baseline(variant)
        if baseline == variant:
            raise NotImplementedError(f"{variant} is the baseline of its network")
        self.baseline = h.warm_method_stepper(backend, baseline, device)
        self.variant = h.warm_method_stepper(backend, variant, device)

    def measure(self, backend, variant, device):
        return _ratio(f"{backend}/{variant}/{device}", self.variant, self.baseline, "none")

    def track_overhead_vs_none(self, backend, variant, device):
        return self.ratio(backend, variant, device)


class MethodReferenceRatio(_SideBySide):
    """`ReferenceRatio` for every variant of the methods grid."""

    params = [h.BACKENDS, h.METHOD_VARIANTS, h.DEVICES]
    param_names = ["backend", "variant", "device"]
    unit = "ratio"
    timeout = 300

    def prepare(self, backend, variant, device):
        self.stepper = h.warm_method_stepper(backend, variant, device)
        self.reference = h.ReferenceStepper(backend, self.stepper.program, device)

    def measure(self, backend, variant, device):
        return _ratio(f"{backend}/{variant}/{device}: backend", self.stepper, self.reference, "reference")

    def track_ratio_to_reference(self, backend, variant, device):
        return self.ratio(backend, variant, device)


class ArchitectureReferenceRatio(_SideBySide):
    """`ReferenceRatio` for the paper's architectures at their small configurations (the
    grid of bench_architectures.ArchitectureStep: each smoke spec's model, batch and
    compared variants), both sides trained with plain SGD at the spec's learning rate (the
    loops' optimizer; ArchitectureStep times the spec's own). The hand-written loops run
    the same `build` function as normbench, each word of the vocabulary written in the
    framework's idiom (benchmarks/_reference.py)."""

    params = [h.BACKENDS, h.ARCHITECTURES, h.ARCHITECTURE_VARIANTS, h.DEVICES]
    param_names = ["backend", "architecture", "variant", "device"]
    unit = "ratio"
    timeout = 600

    def prepare(self, backend, architecture, variant, device):
        self.stepper = h.warm_architecture_stepper(backend, architecture, variant, device, plain_sgd=True)
        self.reference = h.ReferenceStepper(backend, self.stepper.program, device)

    def measure(self, backend, architecture, variant, device):
        return _ratio(f"{backend}/{architecture}/{variant}/{device}: backend", self.stepper, self.reference, "reference")

    def track_ratio_to_reference(self, backend, architecture, variant, device):
        return self.ratio(backend, architecture, variant, device)
