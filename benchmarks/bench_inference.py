"""Inference: what a prediction costs with each normalization method. The paper (Discussion,
point 3) notes that a network trained with the standardization loss needs no normalization
at inference, while group and layer norm are computed at every prediction; batch norm's
running statistics fold into the layer before it (normbench.folding).

The grid (`_harness.inference_cases`, one axis of valid cases '<architecture>:<variant>:
<form>'): every variant of `_harness.METHODS_SPEC` on its own network (cnn3) and every
variant of the smoke specs on its small architecture, "unfolded" (the network as trained,
in inference mode) and, where the method folds, "folded" (the plain network, batch norm
and `affine` folded in). Both time `Predictor.predict()`: the backend's compiled inference
forward pass on synthetic inputs, its logits read back to the host.

`InferenceOverhead` puts the paper's claim as a ratio: each case's time over the plain
network's (the same architecture without normalization), the two predictors alternating
in one process. Absolute times of a millisecond drift by a third between processes on a
shared 2-core machine (results/benchmarks/cpu/inference: PyTorch's plain cnn3 read 436 µs
as cnn3-none and 334 µs as cnn3-standardization, the same network, side by side 0.998);
the side-by-side ratio does not carry that drift.
"""

from . import _harness as h

GRID = [h.BACKENDS, h.inference_cases(), h.DEVICES]
GRID_NAMES = ["backend", "case", "device"]


class InferenceLatency:
    """Seconds to predict one image (batch 1), after the warm-up calls; asv reports the median."""

    params, param_names = GRID, GRID_NAMES
    warmup_time = 0  # the explicit warm-up in setup replaces asv's time-based one
    repeat = (10, 50, 10.0)
    rounds = 1
    timeout = 300

    def setup(self, backend, case, device):
        self.predictor = h.warm_predictor(backend, case, h.LATENCY_BATCH, device)

    def time_predict(self, backend, case, device):
        self.predictor.predict()


class InferenceThroughput:
    """Seconds per image of a batch of THROUGHPUT_BATCH: the median call (measured as the
    ratios are, for at least RATIO_ROUNDS calls and RATIO_SECONDS) over the batch size."""

    params, param_names = GRID, GRID_NAMES
    unit = "seconds"
    timeout = 300

    def setup(self, backend, case, device):
        self.predictor = h.warm_predictor(backend, case, h.throughput_batch(), device)

    def track_seconds_per_image(self, backend, case, device):
        return h.seconds_per_image(self.predictor)


class InferenceOverhead:
    """Each case's time per prediction over the plain network's (`_harness.inference_baseline`:
    the same architecture without normalization), alternating in one process: at batch 1
    (latency) and at THROUGHPUT_BATCH (time per image)."""

    params = [h.BACKENDS, h.inference_overhead_cases(), h.DEVICES]
    param_names = GRID_NAMES
    unit = "ratio"
    timeout = 600

    def setup(self, backend, case, device):
        plain = h.inference_baseline(case)
        self.pairs = {batch: (h.warm_predictor(backend, case, batch, device), h.warm_predictor(backend, plain, batch, device))
                      for batch in (h.LATENCY_BATCH, h.throughput_batch())}

    def _ratio(self, batch: int) -> float:
        case, plain = self.pairs[batch]
        mine, theirs = h.side_by_side_medians([case.predict, plain.predict], *h.ratio_rounds())
        return mine / theirs

    def track_latency_vs_plain(self, backend, case, device):
        return self._ratio(h.LATENCY_BATCH)

    def track_per_image_vs_plain(self, backend, case, device):
        return self._ratio(h.throughput_batch())
