"""Figure 6's and Table 1's Inception-v2 analogue: the small Inception-v2 on Fashion-MNIST
with no normalization, batch norm and the standardization loss, and the speed-up of each
over the baseline (Section 4.4, Appendix A.4).

The paper trains Inception-v2 on ImageNet on 8 TPU cores, at a learning rate it lowered
until the unnormalized baseline trained stably; this machine cannot. Here: Inception-v2 at
depth multiplier 0.125 on Fashion-MNIST with the paper's optimizer (RMSProp, its lowered
rate scaled to the batch by the linear rule, decayed by 0.98 on a schedule scaled like
resnet-fashion's), batch norm with a shift only, and the standardization loss at the
paper's weight scaled by the networks' channel counts (the spec says how). Run on JAX,
whose compiled step is 3-4x PyTorch's eager one for this 69-layer network on this CPU.
No full-scale (ImageNet) spec is bundled yet (see resnet-fashion).

The paper's claims, checked on the backend with the most seeds on the mean curves (rules
fixed before the runs): batch norm and the standardization loss each reach the baseline's
best accuracy faster than the baseline (speed-up > 1; the paper: 3.7x and 2.8x), and the
standardization loss's speed-up is comparable to batch norm's, read as at least 3/4 of it
(as in resnet-fashion).
"""

from __future__ import annotations

from normbench.experiments import Experiment
from normbench.experiments.resnet_fashion import COMPARABLE
from normbench.reporting import speedup

PAPER_SPEEDUP = {"batch-norm": 3.7, "standardization": 2.8}  # Table 1 (top), Inception-v2 on ImageNet
PAPER_STEPS = {"none": "1972K", "batch-norm": "534K", "standardization": "700K"}


def _verdicts(table):
    return [*speedup.method_verdicts(table, network="Inception-v2", where="ImageNet", paper=PAPER_SPEEDUP,
                                     paper_steps=PAPER_STEPS, baseline="none"),
            *speedup.comparable_verdict(table, "standardization", "batch-norm", PAPER_SPEEDUP, COMPARABLE)]


def report(results) -> dict:
    return speedup.against_one_baseline(
        results, "none", paper=PAPER_SPEEDUP, examples="images", verdicts=_verdicts,
        scale_note=("The paper's numbers are for Inception-v2 on ImageNet (Table 1, top, and Figure 6: the target is the "
                    "baseline's best, 69.5% top-1); these runs are a scaled-down analogue (Inception-v2 at depth multiplier 0.125 "
                    "on Fashion-MNIST), so only the direction and rough size of each speed-up compare."))


EXPERIMENT = Experiment(
    name="inception-fashion", spec="inception-fashion", figure="Figure 6",
    title="Speed-up of the small Inception-v2 on Fashion-MNIST: steps to the unnormalized baseline's best test "
          "accuracy",
    default_backends=("jax",), report=report,
    notes=("The standardization loss's weight is the paper's 1e-5 scaled by Inception-v2's normalized channels "
           "over inception-v2-small's (9952 / 1248): 8.0e-5.",),
)
