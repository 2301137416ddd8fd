"""The standardization-loss weights of the scaled-down speed-up experiments follow the rule
their specs state: the paper's weight for the full network times the full network's
normalized channels over the small network's, to two significant digits (the loss sums one
KL term per channel; the cross-entropy does not grow with the network)."""

import math

import pytest

from normbench import spec as spec_module
from normbench.architectures import declare, get

# spec, its variant, the full network the paper trained, the paper's weight (Appendix A)
SCALED = [
    ("resnet-fashion", "standardization", "resnet-50", 1e-6),  # A.5
    ("inception-fashion", "standardization", "inception-v2", 1e-5),  # A.4
    ("mobilenet-batch-size", "standardization-b2", "mobilenet-v1", 1e-4),  # A.6
]


def _channels(model: str) -> int:
    return sum(layer.out_shape[-1] for layer in declare(get(model)) if layer.normalized)


def _two_digits(x: float) -> float:
    return round(x, 1 - int(math.floor(math.log10(abs(x)))))


@pytest.mark.parametrize("spec_name, variant, full, paper_weight", SCALED)
def test_scaled_weight_follows_the_channel_rule(spec_name, variant, full, paper_weight):
    spec = spec_module.load(spec_name)
    v = next(v for v in spec.variants if v.name == variant)
    weight = v.auxiliary_loss("standardization").option("weight")
    assert weight == _two_digits(paper_weight * _channels(full) / _channels(spec.model)), (spec_name, weight)
    # where the paper's own weight runs beside it, it runs unscaled
    for paper in (v for v in spec.variants if v.name == f"{variant}-paper-weight"):
        assert paper.auxiliary_loss("standardization").option("weight") == paper_weight


def test_channel_counts_of_the_rule():
    # the numbers the specs' comments quote
    assert _channels("resnet-50") == 26560 and _channels("resnet-small") == 168
    assert _channels("inception-v2") == 9952 and _channels("inception-v2-small") == 1248
    assert _channels("mobilenet-v1") == 10944 and _channels("mobilenet-v1-small") == 2816
