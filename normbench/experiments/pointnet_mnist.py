"""Figure 5's analogue: PointNet with no normalization, batch norm and the standardization
loss, and the speed-up of each over the baseline (Section 4.3, Appendix A.3).

The paper trains the full PointNet on ModelNet40 (1024 points, 40 classes) on a GPU for
tens of thousands of steps; this machine cannot. Here: the small PointNet (every width /4)
on MNIST point clouds (PointNet++'s construction, 512 points), with the paper's optimizer
(Adam, learning rate 1e-3 halved on a schedule, batch 32), batch norm with a scale and
shift, and the standardization loss at weight 1e-3 with a learned scale and shift (both as
Appendix A.3 says). The halving interval and the budget are scaled down (see the spec).
The full-scale configuration is `pointnet-modelnet40` (a bundled spec for a GPU machine
with the user's ModelNet40 files).

The paper's claims, checked on the backend with the most seeds on the mean curves (rule
fixed before the runs): batch norm and the standardization loss each reach the baseline's
best accuracy faster than the baseline (speed-up > 1; the paper: 4.4x and 2.2x), and batch
norm faster than the standardization loss.
"""

from __future__ import annotations

import math

from normbench.experiments import Experiment
from normbench.reporting import speedup

PAPER_SPEEDUP = {"batch-norm": 4.4, "standardization": 2.2}  # Figure 5's table (ModelNet40)
PAPER_STEPS = {"none": "26.6K", "batch-norm": "6.1K", "standardization": "12.1K"}


def _verdicts(table):
    out = speedup.method_verdicts(table, network="PointNet", where="ModelNet40", paper=PAPER_SPEEDUP,
                                  paper_steps=PAPER_STEPS, baseline="none")
    backend = speedup.claims_backend(table)
    mine = table[table.backend == backend].set_index("variant")
    if {"batch-norm", "standardization"} <= set(mine.index):
        bn, std = mine.loc["batch-norm"].speedup, mine.loc["standardization"].speedup
        holds = not math.isnan(bn) and (math.isnan(std) or bn > std)
        out.append(f"Paper: batch norm is faster than the standardization loss (4.4× vs 2.2×). Here ({backend}): "
                   f"{speedup.speedup_text(bn)} vs {speedup.speedup_text(std)}: **{'holds' if holds else 'does not hold'}**.")
    return out


def report(results) -> dict:
    return speedup.against_one_baseline(
        results, "none", paper=PAPER_SPEEDUP, examples="clouds", verdicts=_verdicts,
        scale_note=("The paper's numbers are for the full PointNet on ModelNet40 (Figure 5); these runs are a scaled-down analogue "
                    "(the small PointNet on MNIST point clouds), so only the direction and rough size of each speed-up compare."))


EXPERIMENT = Experiment(
    name="pointnet-mnist", spec="pointnet-mnist", figure="Figure 5",
    title="Speed-up of PointNet (small) on MNIST point clouds: steps to the unnormalized baseline's best test accuracy",
    default_backends=("torch",), report=report,
)
