"""Step-time ratios measured side by side in one process (alternating, medians): a
method's overhead over no normalization, and each backend against the hand-written loop
in its own framework (benchmarks/reference_<framework>/). Lower is better for both.

Three grids: the paper's cells (model x the bundled specs' variants, the history since the
first nightly), every normalization method and auxiliary loss (the variants of
`_harness.METHODS_SPEC`, both networks), and the paper's architectures at their small
configurations against the hand-written loops (`ArchitectureReferenceRatio`)."""

from . import _harness as h


def _ratio(label: str, ours, theirs, what: str) -> float:
    mine, other = h.side_by_side_medians([ours.step, theirs.step], *h.ratio_rounds())
    print(f"{label}: {mine * 1e3:.2f} ms, {what} {other * 1e3:.2f} ms per step")
    return mine / other


class NormalizationOverhead:
    """Median step time of a normalization variant / median step time of the same model
    without normalization (same backend, device and batches)."""

    params = [h.BACKENDS, h.MODELS, [n for n in h.NORMALIZATIONS if n != "none"], h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 300

    def setup(self, backend, model, normalization, device):
        self.baseline = h.warm_stepper(backend, model, "none", device)
        self.variant = h.warm_stepper(backend, model, normalization, device)

    def track_overhead_vs_none(self, backend, model, normalization, device):
        return _ratio(f"{backend}/{model}/{device}: {normalization}", self.variant, self.baseline, "none")


class CompiledOverhead:
    """`NormalizationOverhead` with the step compiled (`--compile`: torch.compile of the
    loss, forward and backward), both sides compiled. PyTorch only: JAX and TensorFlow
    always compile. The compiled first step is timed by bench_step_time.TimeFirstCompiledStep."""

    params = [["torch"], h.MODELS, [n for n in h.NORMALIZATIONS if n != "none"], h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 600

    def setup(self, backend, model, normalization, device):
        self.baseline = h.warm_stepper(backend, model, "none", device, compile=True)
        self.variant = h.warm_stepper(backend, model, normalization, device, compile=True)

    def track_overhead_vs_none(self, backend, model, normalization, device):
        return _ratio(f"{backend} compiled/{model}/{device}: {normalization}", self.variant, self.baseline, "none")


class ReferenceRatio:
    """Median backend step time / median step time of the hand-written loop in the same
    framework (same model, normalization, batches, initial weights and device)."""

    params = [h.BACKENDS, h.MODELS, h.NORMALIZATIONS, h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 300

    def setup(self, backend, model, normalization, device):
        self.stepper = h.warm_stepper(backend, model, normalization, device)
        self.reference = h.ReferenceStepper(backend, self.stepper.program, device)

    def track_ratio_to_reference(self, backend, model, normalization, device):
        return _ratio(f"{backend}/{model}/{normalization}/{device}: backend", self.stepper, self.reference, "reference")


class AlignmentCost:
    """PyTorch only: median step time of the hand-written loop padded as TensorFlow's SAME
    rule does (what normbench computes: F.pad for the odd pixel of an asymmetric pad) over
    the same loop padded as PyTorch users do (symmetric `padding`, the ReferenceRatio
    yardstick). What exact alignment costs a PyTorch user who writes it by hand."""

    params = [["torch"], h.MODELS, h.NORMALIZATIONS, h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 300

    def setup(self, backend, model, normalization, device):
        plan = h.warm_stepper(backend, model, normalization, device).program
        self.aligned = h.ReferenceStepper(backend, plan, device, same_alignment=True)
        self.idiom = h.ReferenceStepper(backend, plan, device)

    def track_alignment_cost(self, backend, model, normalization, device):
        return _ratio(f"{backend}/{model}/{normalization}/{device}: SAME-aligned loop", self.aligned, self.idiom,
                      "symmetric-padding loop")


class MethodOverhead:
    """`NormalizationOverhead` for every variant of the methods grid: its median step time
    over that of the variant without normalization on the same network."""

    params = [h.BACKENDS, h.METHOD_VARIANTS, h.DEVICES]
    param_names = ["backend", "variant", "device"]
    unit = "ratio"
    timeout = 300

    def setup(self, backend, variant, device):
        baseline = h.method_baseline(variant)
        if baseline == variant:
            raise NotImplementedError(f"{variant} is the baseline of its network")
        self.baseline = h.warm_method_stepper(backend, baseline, device)
        self.variant = h.warm_method_stepper(backend, variant, device)

    def track_overhead_vs_none(self, backend, variant, device):
        return _ratio(f"{backend}/{variant}/{device}", self.variant, self.baseline, "none")


class MethodReferenceRatio:
    """`ReferenceRatio` for every variant of the methods grid."""

    params = [h.BACKENDS, h.METHOD_VARIANTS, h.DEVICES]
    param_names = ["backend", "variant", "device"]
    unit = "ratio"
    timeout = 300

    def setup(self, backend, variant, device):
        self.stepper = h.warm_method_stepper(backend, variant, device)
        self.reference = h.ReferenceStepper(backend, self.stepper.program, device)

    def track_ratio_to_reference(self, backend, variant, device):
        return _ratio(f"{backend}/{variant}/{device}: backend", self.stepper, self.reference, "reference")


class ArchitectureReferenceRatio:
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

    def setup(self, backend, architecture, variant, device):
        self.stepper = h.warm_architecture_stepper(backend, architecture, variant, device, plain_sgd=True)
        self.reference = h.ReferenceStepper(backend, self.stepper.program, device)

    def track_ratio_to_reference(self, backend, architecture, variant, device):
        return _ratio(f"{backend}/{architecture}/{variant}/{device}: backend", self.stepper, self.reference, "reference")
