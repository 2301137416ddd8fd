"""Step-time ratios measured side by side in one process (alternating, medians):
a normalization's overhead over no normalization, and each backend against the
minimal hand-written loop in its own framework (benchmarks/reference_<framework>.py).
Lower is better for both."""

from . import _harness as h


class NormalizationOverhead:
    """Median step time of a normalization variant / median step time of the same model
    without normalization (same backend, device and batches)."""

    params = [h.BACKENDS, h.MODELS, ["batch_norm_shift", "standardization_loss"], h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 300

    def setup(self, backend, model, normalization, device):
        self.baseline = h.warm_stepper(backend, model, "none", device)
        self.variant = h.warm_stepper(backend, model, normalization, device)

    def track_overhead_vs_none(self, backend, model, normalization, device):
        variant, baseline = h.side_by_side_medians([self.variant.step, self.baseline.step], *h.ratio_rounds())
        print(f"{backend}/{model}/{device}: {normalization} {variant * 1e3:.2f} ms, none {baseline * 1e3:.2f} ms per step")
        return variant / baseline


class ReferenceRatio:
    """Median backend step time / median step time of the hand-written loop in the same
    framework (same model, normalization, batch size and device). Skipped where the
    reference module is missing."""

    params = [h.BACKENDS, h.MODELS, h.NORMALIZATIONS, h.DEVICES]
    param_names = ["backend", "model", "normalization", "device"]
    unit = "ratio"
    timeout = 300

    def setup(self, backend, model, normalization, device):
        self.stepper = h.warm_stepper(backend, model, normalization, device)
        module = h.reference_module(backend)
        spec, _ = h.training_spec(model, normalization)
        step, self.synchronize = module.make_reference_step(model, normalization, batch_size=spec.batch_size,
                                                              device=h.reference_device(backend, device))
        self.reference_step, self.count = step, 0
        for _ in range(h.warmup_steps()):
            self._reference()

    def _reference(self):
        self.reference_step(self.count)
        self.synchronize()
        self.count += 1

    def track_ratio_to_reference(self, backend, model, normalization, device):
        ours, reference = h.side_by_side_medians([self.stepper.step, self._reference], *h.ratio_rounds())
        print(f"{backend}/{model}/{normalization}/{device}: backend {ours * 1e3:.2f} ms, reference {reference * 1e3:.2f} ms per step")
        return ours / reference
