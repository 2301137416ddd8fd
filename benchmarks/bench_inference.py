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
